//! The fault-injection harness (README, Guarantees, "The harness"): HTTP load of unique events
//! over the four sources with a client that retries like the clouds, faults on a timeline
//! (steady → inject → heal → recover) against real processes on a private broker, Redis and a
//! PostgreSQL schema of the scenario's own, and a ledger check afterwards ([`check`]).
//!
//! Seeded and reproducible: the seed picks the order of the faults, which processor each one
//! hits, and the load's sources. The suite runs the short form (80 s, every fault once) twice (eager and
//! cooperative-sticky assignment); `scripts/chaos.sh` runs long ones
//! (`HELIOS_CHAOS_SECONDS`, `HELIOS_CHAOS_SEED`, `HELIOS_CHAOS_STRATEGY`).

mod check;
mod load;
mod rig;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rig::Rig;

/// SplitMix64: small, seedable, good enough to pick faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// A fault of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL a processor, start it again.
    KillProcessor,
    /// SIGTERM a processor (it finishes or gives up its batch), start it again.
    TermProcessor,
    /// PostgreSQL's `events` table gone; SIGTERM a processor while its batch retries; the table
    /// back; the processor started again.
    TermDuringPgOutage,
    /// The broker killed and started again on the same data.
    RestartBroker,
    /// Redis killed and started again, empty (every dedup mark lost).
    RestartRedis,
    /// A third processor joins the group, then leaves it (SIGTERM).
    JoinAndLeave,
    /// The ingress killed; the clouds retry until it is back.
    KillIngress,
    /// A processor started again with a delivery that panics once.
    PanicDelivery,
}

impl Fault {
    /// The faults named in `names` (comma separated, as [`Fault::name`] spells them).
    fn menu(names: &str) -> Vec<Fault> {
        let known: Vec<_> = ALL_FAULTS.iter().map(|f| f.name()).collect();
        names
            .split(',')
            .map(|n| match ALL_FAULTS.iter().find(|f| f.name() == n.trim()) {
                Some(f) => *f,
                None => panic!("HELIOS_CHAOS_FAULTS: unknown fault {n:?} (known: {known:?})"),
            })
            .collect()
    }

    /// Its name in `HELIOS_CHAOS_FAULTS` (scripts/chaos.sh `--faults`).
    fn name(self) -> &'static str {
        match self {
            Fault::KillProcessor => "kill-processor",
            Fault::TermProcessor => "term-processor",
            Fault::TermDuringPgOutage => "term-during-pg-outage",
            Fault::RestartBroker => "restart-broker",
            Fault::RestartRedis => "restart-redis",
            Fault::JoinAndLeave => "join-and-leave",
            Fault::KillIngress => "kill-ingress",
            Fault::PanicDelivery => "panic-delivery",
        }
    }
}

const ALL_FAULTS: [Fault; 8] = [
    Fault::KillProcessor,
    Fault::TermProcessor,
    Fault::TermDuringPgOutage,
    Fault::RestartBroker,
    Fault::RestartRedis,
    Fault::JoinAndLeave,
    Fault::KillIngress,
    Fault::PanicDelivery,
];

/// How a scenario runs.
struct Scenario {
    seed: u64,
    strategy: String,
    /// How long the load and the faults go on.
    seconds: u64,
    /// Events a second.
    rate: f64,
    /// The menu of faults (all of them unless `HELIOS_CHAOS_FAULTS` names some).
    faults: Vec<Fault>,
}

impl Scenario {
    /// The short form (the suite), overridden by `HELIOS_CHAOS_*` (scripts/chaos.sh).
    fn from_env(default_strategy: &str) -> Scenario {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Scenario {
            seed: env("HELIOS_CHAOS_SEED")
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| {
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap();
                    t.as_nanos() as u64
                }),
            strategy: env("HELIOS_CHAOS_STRATEGY").unwrap_or_else(|| default_strategy.into()),
            seconds: env("HELIOS_CHAOS_SECONDS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(80),
            rate: env("HELIOS_CHAOS_RATE")
                .and_then(|s| s.parse().ok())
                .unwrap_or(30.0),
            faults: env("HELIOS_CHAOS_FAULTS").map_or(ALL_FAULTS.to_vec(), |n| Fault::menu(&n)),
        }
    }
}

/// Applies one fault (inject, hold, heal) and returns what it did, for the report.
async fn apply(rig: &mut Rig, fault: Fault, rng: &mut Rng) -> String {
    let hold = Duration::from_millis(1500 + rng.below(2500));
    let i = rng.below(2) as usize;
    match fault {
        Fault::KillProcessor => {
            rig.processors[i].kill();
            tokio::time::sleep(hold).await;
            rig.processors[i].start();
            format!("SIGKILL processor-{i}, back after {hold:?}")
        }
        Fault::TermProcessor => {
            let clean = rig.processors[i].terminate();
            tokio::time::sleep(hold).await;
            rig.processors[i].start();
            format!("SIGTERM processor-{i} (stopped by itself: {clean}), back after {hold:?}")
        }
        Fault::TermDuringPgOutage => {
            rig.events_table(false).await;
            // Long enough for a batch to be retrying when the signal comes.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let clean = rig.processors[i].terminate();
            tokio::time::sleep(hold).await;
            rig.events_table(true).await;
            rig.processors[i].start();
            format!("PostgreSQL table away, SIGTERM processor-{i} during it (stopped by itself: {clean}), table back after {hold:?}")
        }
        Fault::RestartBroker => {
            rig.broker.stop();
            tokio::time::sleep(hold).await;
            rig.broker.restart();
            format!("broker killed, back after {hold:?}")
        }
        Fault::RestartRedis => {
            rig.redis.stop();
            tokio::time::sleep(hold).await;
            rig.redis.restart();
            format!("Redis killed, back empty after {hold:?}")
        }
        Fault::JoinAndLeave => {
            let extra = rig.processors.len() - 1;
            rig.processors[extra].start();
            tokio::time::sleep(hold * 3).await;
            let clean = rig.processors[extra].terminate();
            format!(
                "processor-{extra} joined for {:?}, then left (stopped by itself: {clean})",
                hold * 3
            )
        }
        Fault::KillIngress => {
            rig.ingress.kill();
            tokio::time::sleep(hold).await;
            rig.ingress.start();
            rig.wait_ingress_ready().await;
            format!("ingress killed, back after {hold:?}")
        }
        Fault::PanicDelivery => {
            rig.processors[i].kill();
            rig.processors[i].start_with(&[("HELIOS_FAILPOINTS", "deliver.after_store=1*panic")]);
            tokio::time::sleep(hold).await;
            format!("processor-{i} restarted with a delivery that panics once")
        }
    }
}

/// Runs a scenario: steady load, every fault of the menu once in the seed's order (more rounds
/// when the run is longer), heal, recover, then the ledger check.
async fn run(default_strategy: &str) {
    // One scenario at a time: each runs a broker, Redis, an ingress and up to three processors
    // of its own, and two at once beside the rest of the suite starve the shared broker's
    // heartbeats (sessions time out, which the other tests do not expect).
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    crate::common::init_logs();
    let sc = Scenario::from_env(default_strategy);
    let mut rng = Rng::new(sc.seed);
    let menu: Vec<_> = sc.faults.iter().map(|f| f.name()).collect();
    let menu = menu.join(",");
    let reproduce = format!(
        "bash scripts/chaos.sh --seed {} --strategy {} --seconds {} --rate {} --faults {menu}",
        sc.seed, sc.strategy, sc.seconds, sc.rate
    );
    eprintln!(
        "chaos: seed {} strategy {} for {} s at {} events/s, faults {menu} (reproduce: {reproduce})",
        sc.seed, sc.strategy, sc.seconds, sc.rate
    );
    let mut rig = Rig::start(&format!("{:x}", sc.seed & 0xffff), 2, 1, &sc.strategy).await;
    let ledger = Arc::new(Mutex::new(load::Ledger::default()));
    let started = Instant::now();
    let stop_load = started + Duration::from_secs(sc.seconds);
    let give_up = stop_load + Duration::from_secs(60);
    let load = tokio::spawn(load::run(
        rig.ingress_url.clone(),
        format!("c{:x}", sc.seed & 0xfffff),
        Rng::new(sc.seed ^ 0x5eed),
        sc.rate,
        8,
        stop_load,
        give_up,
        ledger.clone(),
    ));
    let mut samples = vec![];
    let mut timeline = vec![];
    // Steady.
    sample_for(&rig, Duration::from_secs(8), &mut samples).await;
    // Every fault of the menu once, in the seed's order; then more rounds while the load runs.
    let mut faults = sc.faults.clone();
    rng.shuffle(&mut faults);
    while !faults.is_empty() || Instant::now() + Duration::from_secs(12) < stop_load {
        if faults.is_empty() {
            faults = sc.faults.clone();
            rng.shuffle(&mut faults);
        }
        let fault = faults.remove(0);
        let at = started.elapsed().as_secs_f32();
        let before = rig.stored().await;
        let what = apply(&mut rig, fault, &mut rng).await;
        eprintln!("chaos[{}]: {at:6.1}s  {what}", sc.strategy);
        // Recover: the pipeline must move again after every heal (a stall fails the run).
        let healed = Instant::now();
        loop {
            sample_for(&rig, Duration::from_millis(500), &mut samples).await;
            let now = rig.stored().await;
            let waiting = ledger.lock().unwrap().acked().count() as i64 > now;
            if now > before.max(0) || !waiting {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(120),
                "no progress for 120 s after: {what} (reproduce: {reproduce})"
            );
        }
        let moved = healed.elapsed().as_secs_f32();
        eprintln!(
            "chaos[{}]: {:6.1}s  moving again {moved:.1}s after the heal",
            sc.strategy,
            started.elapsed().as_secs_f32()
        );
        timeline.push(format!("{at:.1}s {what}; moving again after {moved:.1}s"));
    }
    while Instant::now() < stop_load {
        sample_for(&rig, Duration::from_millis(500), &mut samples).await;
    }
    load.await.unwrap();
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    let result = check::verify(&rig, &ledger, &samples, Duration::from_secs(180)).await;
    let unacked = ledger.events.values().filter(|s| !s.acked).count();
    let retried = ledger.events.values().filter(|s| s.attempts > 1).count();
    match result {
        Ok(o) => eprintln!(
            "chaos: seed {} strategy {}: PASS — {} faults, {} events sent, {} acknowledged ({} after retries, {} never), {} rows, {} fan-out records ({} re-sent copies of the same raw record), {} order pairs checked, {} commit samples checked",
            sc.seed, sc.strategy, timeline.len(), o.sent, o.acked, retried, unacked, o.rows, o.fanout_records, o.fanout_copies, o.order_pairs_checked, o.commit_samples
        ),
        Err(e) => panic!(
            "chaos: seed {} strategy {} FAILED: {e}\ntimeline:\n  {}\nreproduce: {reproduce}",
            sc.seed,
            sc.strategy,
            timeline.join("\n  ")
        ),
    }
}

/// Takes commit samples for `d` (one a second).
async fn sample_for(rig: &Rig, d: Duration, samples: &mut Vec<check::CommitSample>) {
    let end = Instant::now() + d;
    loop {
        samples.extend(check::sample_commits(rig).await);
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scenario_with_eager_rebalancing() {
    run("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scenario_with_cooperative_rebalancing() {
    run("cooperative-sticky").await;
}
