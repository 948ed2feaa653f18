#!/usr/bin/env bash
# The fault-injection harness on its own, long form: HTTP load over the four sources, faults on a
# timeline (processors killed and stopped, PostgreSQL taken away during a stop, the broker and
# Redis restarted, a member joining and leaving, the ingress killed, a delivery that panics),
# then the ledger check (tests/it/chaos). The suite runs the short form (80 s, every fault once) of both scenarios.
#
#   bash scripts/chaos.sh                       # both strategies, 600 s each, a random seed
#   bash scripts/chaos.sh --seed 42 --seconds 300 --strategy cooperative-sticky
#   bash scripts/chaos.sh --rate 60             # events a second (default 30)
#   bash scripts/chaos.sh --faults term-during-pg-outage,restart-broker   # only these (names in tests/it/chaos/mod.rs)
#
# A failure prints the seed and the timeline; the same seed replays the same faults in the same
# order (timing still depends on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=600 seed="" strategy="" rate="" faults=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --strategy) strategy=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --faults) faults=$2; shift 2 ;;
    *) echo "unknown option $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
done
filter="chaos::"
case "$strategy" in
  "") ;;
  range|roundrobin) filter="chaos::chaos_scenario_with_eager_rebalancing" ;;
  cooperative-sticky) filter="chaos::chaos_scenario_with_cooperative_rebalancing" ;;
  *) echo "--strategy: range, roundrobin or cooperative-sticky" >&2; exit 2 ;;
esac
export HELIOS_CHAOS_SECONDS=$seconds HELIOS_CHAOS_SEED=$seed HELIOS_CHAOS_STRATEGY=$strategy HELIOS_CHAOS_RATE=$rate HELIOS_CHAOS_FAULTS=$faults
exec bash scripts/test.sh --test it -- "$filter" --nocapture --test-threads 1
