//! The reconciler loop: a consumer-group member over the flows' fan-out topics, co-partitioned (the
//! range assignor gives one member partition p of every step topic, since they have equal partition
//! counts). Per batch: count the events into their instances' states and fire the deadlines the
//! watermarks passed (see [`super::absorb`]). What was counted is written (see [`super::write`])
//! while the next batches are read: the outcomes sent to `helios.reconciliation` and acknowledged,
//! then states, results and resolutions in one transaction (fenced by the instance's claims, with
//! how far event time had come on each topic-partition, which a restarted or newly assigned
//! instance takes over), and only then the offsets committed. A crash before the transaction
//! re-does the work (its outcome records may be sent twice; the rows are written once); a crash
//! after it finds every event already counted and changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;

use super::backlog::Backlog;
use super::clock::Clock;
use super::clock::{CaughtUp, Held, ReconContext};
use super::engine::OutcomeKind;
use super::pending::{add_us, Pending, Writing};
use super::store::ReconStore;
use crate::config::KafkaSettings;
use crate::pipeline::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::topology::{Flow, Topology};

/// Default records per batch.
pub const DEFAULT_BATCH: usize = 2000;

/// What a reconciler needs.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub kafka: KafkaSettings,
    pub topology: Topology,
    pub group: String,
    pub batch_size: usize,
    /// A partition with nothing new for this long advances on wall-clock time.
    pub idle_after: Duration,
    /// Instances unchanged for this long are deleted (keep it ≥ the raw topics' retention, so
    /// a replay always finds the events it re-emits already counted).
    pub state_retention: Duration,
    /// An instance with no partition for this long joins its group again, then less and less often (see
    /// `watch_unassigned`); [`DEFAULT_REJOIN_AFTER`] unless a test needs it sooner.
    pub rejoin_after: Duration,
    /// How often the processor group's raw backlog is looked at ([`DEFAULT_BACKLOG_EVERY`]).
    pub backlog_every: Duration,
}

/// Default interval between looks at the raw backlog.
pub const DEFAULT_BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// Watermarks are written for `helios status` at most this often.
pub(super) const MARKS_EVERY: Duration = Duration::from_secs(2);
/// Outcomes left unpublished (a crash after their transaction) are looked for this often.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

pub use crate::kafka::DEFAULT_REJOIN_AFTER;

/// Counters the tests and `/metrics` read.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    pub events: AtomicU64,
    pub skipped: AtomicU64,
    pub already_counted: AtomicU64,
    /// Records on a partition other than their key's (another producer or partitioner).
    pub misplaced: AtomicU64,
    pub outcomes: AtomicU64,
    pub batches: AtomicU64,
    /// Reads or writes that failed and were retried.
    pub retries: AtomicU64,
    /// Topic-partitions assigned now.
    pub assigned: AtomicU64,
    /// Times this instance, left without partitions, joined its group again.
    pub rejoins: AtomicU64,
    /// Where the time goes (µs, summed over batches): waiting for records, reading states,
    /// looking for due deadlines, sending outcomes, writing the transaction.
    pub poll_us: AtomicU64,
    pub load_us: AtomicU64,
    pub due_us: AtomicU64,
    pub send_us: AtomicU64,
    pub save_us: AtomicU64,
    /// Time the loop waited for a write on its way (sending and saving overlap the reading).
    pub wait_us: AtomicU64,
    /// Instances found among those written last (no read), and instances read from the store.
    pub recent_hits: AtomicU64,
    pub state_reads: AtomicU64,
}

/// Longest time counted work waits to be written while records keep coming (when no write
/// is on its way).
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// While a write is on its way, reading goes on up to this many batches' worth of instances.
const MAX_PENDING_BATCHES: usize = 8;

/// A running reconciler.
pub struct Reconciler {
    pub(super) cfg: ReconcilerConfig,
    pub(super) flows: Vec<Flow>,
    /// Step topics of each flow (same order as `flows`).
    pub(super) flow_topics: Vec<Vec<String>>,
    /// Fan-out topic → (flow index) of the flows it is a step of.
    pub(super) by_topic: HashMap<String, Vec<usize>>,
    /// Fan-out topic → the `match` fields of its flows, and the strictest `max_clock_skew`.
    pub(super) fields_by_topic: HashMap<String, Vec<String>>,
    pub(super) skew_by_topic: HashMap<String, Duration>,
    /// The processor group's raw backlog (started by `run`).
    pub(super) backlog: Option<Backlog>,
    /// Per (flow, partition): what holds the watermark, and the watermarks last written.
    pub(super) held: HashMap<(usize, i32), Held>,
    pub(super) marks_written: HashMap<(usize, i32), DateTime<Utc>>,
    pub(super) last_marks: Instant,
    pub(super) last_sweep: Instant,
    /// Partitions whose outbox mark (`published_through`) must not move until the sweep has
    /// published what is above it: just claimed (an earlier owner may have left outcomes
    /// unpublished), or a publication failed.
    pub(super) unswept: std::collections::HashSet<i32>,
    /// The instances written last, as stored (their next step needs no read).
    pub(super) recent: super::recent::Recent,
    /// Partition counts of every flow topic at start-up (a change stops the instance).
    pub(super) partition_counts: HashMap<String, usize>,
    /// A rebalance since the partition counts were last checked.
    pub(super) recheck: bool,
    /// Why this instance must stop (co-partitioning broken).
    pub(super) fatal: Option<String>,
    /// Open instances per (flow, partition): counted at claim and every prune, plus the new
    /// ones since (the cap `max_open_per_partition` is checked against it).
    pub(super) open: HashMap<(usize, i32), u64>,
    /// Which instances may be stored, per claimed partition (first sightings of the others
    /// need no read).
    pub(super) known: super::known::Known,
    /// (flow, partition)s whose cap was hit since the last prune (warned once).
    pub(super) cap_warned: HashSet<(usize, i32)>,
    pub(super) store: ReconStore,
    pub(super) consumer: StreamConsumer<ReconContext>,
    /// Asks the broker for high watermarks (never joins the group).
    pub(super) meta: Arc<rdkafka::consumer::BaseConsumer>,
    pub(super) producer: FutureProducer,
    pub(super) clock: Clock,
    pub(super) caught_up: CaughtUp,
    /// Per (flow, partition): the watermark so far (it never goes back), and up to which
    /// deadline the stored instances were fetched.
    pub(super) watermarks: HashMap<(usize, i32), DateTime<Utc>>,
    pub(super) due_checked: HashMap<(usize, i32), DateTime<Utc>>,
    /// Messages received while paused for a retry: the next batch starts with them.
    pub(super) stash: Vec<rdkafka::message::OwnedMessage>,
    pub(super) pending: Pending,
    /// The write on its way, if any.
    pub(super) writing: Option<Writing>,
    /// Per assigned topic-partition: the generation this instance claimed it with (every write
    /// is refused once another instance claimed it since).
    pub(super) claims: HashMap<(String, i32), i64>,
    /// Rebalances served so far (see [`ReconContext`]).
    pub(super) rebalances_seen: u64,
    pub stats: Arc<ReconcileStats>,
    pub(super) last_prune: Instant,
    /// Stretches without partitions (see `watch_unassigned`).
    pub(super) unassigned: crate::kafka::RejoinWatch,
}

impl Reconciler {
    pub fn new(cfg: ReconcilerConfig, store: ReconStore) -> anyhow::Result<Self> {
        let flows = cfg.topology.flows()?;
        if flows.is_empty() {
            anyhow::bail!(
                "the topology declares no flows: add one under `flows:` (see topology.yaml) for helios reconcile to follow"
            );
        }
        let flow_topics: Vec<Vec<String>> = flows
            .iter()
            .map(|f| {
                f.event_types()
                    .iter()
                    .map(|t| cfg.topology.event_topic(t))
                    .collect()
            })
            .collect();
        let mut by_topic: HashMap<String, Vec<usize>> = HashMap::new();
        let mut fields_by_topic: HashMap<String, Vec<String>> = HashMap::new();
        let mut skew_by_topic: HashMap<String, Duration> = HashMap::new();
        for (i, topics) in flow_topics.iter().enumerate() {
            for t in topics {
                by_topic.entry(t.clone()).or_default().push(i);
                let fields = fields_by_topic.entry(t.clone()).or_default();
                for f in &flows[i].match_fields {
                    if !fields.contains(f) {
                        fields.push(f.clone());
                    }
                }
                let skew = skew_by_topic
                    .entry(t.clone())
                    .or_insert(flows[i].max_clock_skew);
                *skew = (*skew).min(flows[i].max_clock_skew);
            }
        }
        let mut c = cfg.kafka.member_config();
        for (k, v) in [
            ("client.id", "helios-reconciler"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "15000"),
            // Per partition, and a flow reads a partition of each step topic.
            ("queued.max.messages.kbytes", "4096"),
            // Outcomes wait for deadlines of minutes: a longer wait for a fetch to fill costs
            // nothing there and spares the broker and this instance round trips that bring
            // little (−15 % CPU per event in the benchmark, +10 % rate, measured 2026-12-03).
            ("fetch.wait.max.ms", "100"),
            // How often the watermarks learn which partitions are read to their end.
            ("statistics.interval.ms", "500"),
        ] {
            if !cfg.kafka.properties.contains_key(k) {
                c.set(k, v);
            }
        }
        // Co-partitioning: the range assignor gives a member the same partition numbers of
        // every topic with the same partition count. Not overridable.
        c.set("partition.assignment.strategy", "range");
        c.set("group.id", &cfg.group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("isolation.level", "read_committed");
        let caught_up: CaughtUp = Arc::default();
        let consumer: StreamConsumer<ReconContext> = c.create_with_context(ReconContext {
            caught_up: caught_up.clone(),
            rebalances: Default::default(),
            assigns: Default::default(),
            progress: crate::kafka::progress::PartitionProgress::new("helios_reconcile"),
        })?;
        let mut p = cfg.kafka.durable_producer_config()?;
        for (k, v) in [
            ("client.id", "helios-reconciler"),
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
        ] {
            if !crate::config::property_set(&cfg.kafka.properties, k) {
                p.set(k, v);
            }
        }
        let producer: FutureProducer = p.create()?;
        // High watermarks are asked by a client outside the group (the member itself reads
        // the group's committed offsets).
        let meta = Arc::new(crate::kafka::reader(&cfg.kafka, "reconcile-meta")?);
        for f in &flows {
            for k in OutcomeKind::ALL {
                metrics::counter!("helios_reconcile_outcomes_total", "flow" => f.name.clone(), "outcome" => k.as_str())
                    .increment(0);
            }
            metrics::counter!("helios_reconcile_events_total", "flow" => f.name.clone())
                .increment(0);
            metrics::counter!("helios_reconcile_already_counted_total", "flow" => f.name.clone())
                .increment(0);
            metrics::counter!("helios_reconcile_untrusted_clock_total", "flow" => f.name.clone())
                .increment(0);
            metrics::gauge!("helios_reconcile_event_time_lag_seconds", "flow" => f.name.clone())
                .set(0.0);
            metrics::gauge!("helios_reconcile_open_instances", "flow" => f.name.clone()).set(0.0);
            metrics::gauge!("helios_reconcile_open_instances_fullest", "flow" => f.name.clone())
                .set(0.0);
        }
        metrics::counter!("helios_reconcile_skipped_total", "reason" => "instance_cap")
            .increment(0);
        metrics::counter!("helios_reconcile_copartition_violations_total").increment(0);
        metrics::counter!("helios_reconcile_misplaced_records_total").increment(0);
        // Exported from start-up (alerts compare them with zero).
        metrics::counter!("helios_reconcile_rejoins_total").increment(0);
        metrics::gauge!("helios_reconcile_assigned_partitions").set(0.0);
        let n_flows = flows.len();
        let unassigned = crate::kafka::RejoinWatch::new(cfg.rejoin_after);
        Ok(Reconciler {
            cfg,
            flows,
            flow_topics,
            by_topic,
            fields_by_topic,
            skew_by_topic,
            backlog: None,
            held: HashMap::new(),
            marks_written: HashMap::new(),
            last_marks: Instant::now(),
            last_sweep: Instant::now(),
            unswept: Default::default(),
            recent: Default::default(),
            partition_counts: HashMap::new(),
            recheck: false,
            fatal: None,
            open: HashMap::new(),
            known: Default::default(),
            cap_warned: HashSet::new(),
            store,
            consumer,
            meta,
            producer,
            clock: Clock::default(),
            caught_up,
            watermarks: HashMap::new(),
            due_checked: HashMap::new(),
            stash: vec![],
            pending: Pending::new(n_flows),
            writing: None,
            claims: HashMap::new(),
            rebalances_seen: 0,
            stats: Arc::default(),
            last_prune: Instant::now(),
            unassigned,
        })
    }

    /// Checks the step topics' partition counts on the broker (equal, or co-partitioning
    /// breaks), then follows the flows until shutdown.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        let result = self.run_until(shutdown).await;
        // The raw-backlog looker's consumer is gone before the reconciler returns.
        if let Some(b) = self.backlog.take() {
            b.stop().await;
        }
        result
    }

    async fn run_until(&mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        let topics: Vec<String> = {
            let mut t: Vec<String> = self.by_topic.keys().cloned().collect();
            t.sort();
            t
        };
        if !self.wait_partitions_checked(&shutdown).await? {
            return Ok(());
        }
        let raw: Vec<String> = crate::source::Source::ALL
            .iter()
            .map(|s| self.cfg.topology.raw_topic(*s))
            .collect();
        self.backlog = Some(Backlog::start(
            &self.cfg.kafka,
            &self.cfg.topology.consumer_group,
            raw,
            self.cfg.backlog_every,
        )?);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&names)?;
        tracing::info!(flows = self.flows.len(), topics = ?topics, group = %self.cfg.group, "reconciler started");
        let mut backoff = Backoff::default();
        let mut write_backoff = Backoff::default();
        while !shutdown.is_triggered() {
            let polled = Instant::now();
            crate::liveness::progress();
            let (batch, caught_up) = {
                let _waiting = crate::liveness::waiting();
                tokio::select! {
                    b = self.poll_batch() => b,
                    _ = shutdown.clone().wait() => break,
                }
            };
            add_us(&self.stats.poll_us, polled);
            if let Some(why) = self.fatal.take() {
                metrics::counter!("helios_reconcile_copartition_violations_total").increment(1);
                anyhow::bail!("{why}");
            }
            if self.recheck {
                if !self.wait_partitions_checked(&shutdown).await? {
                    break;
                }
                self.recheck = false;
            }
            // Reading states and due deadlines may fail (PostgreSQL away): the batch is taken
            // again, nothing of it was kept.
            loop {
                match self.absorb(&batch).await {
                    Ok(()) => {
                        backoff = Backoff::default();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation batch not read; retrying");
                        self.retried();
                        if !self.wait_polling(backoff.next_wait(), &shutdown).await {
                            self.flush_retrying(&shutdown).await;
                            return Ok(());
                        }
                    }
                }
            }
            let due = caught_up
                || self.pending.work.len() >= self.cfg.batch_size * 4
                || self
                    .pending
                    .since
                    .is_some_and(|t| t.elapsed() >= FLUSH_EVERY);
            // The write on its way lands when it is done (reading goes on meanwhile, so the
            // next write takes everything counted since), or when what is pending reached its
            // bound.
            let full = self.pending.work.len() >= self.cfg.batch_size * MAX_PENDING_BATCHES;
            if self.writing.as_ref().is_some_and(|w| w.finished() || full) {
                if let Err(e) = self.land().await {
                    tracing::warn!(error = %e, "reconciliation not written; retrying");
                    self.retried();
                    if !self
                        .wait_polling(write_backoff.next_wait(), &shutdown)
                        .await
                    {
                        break;
                    }
                    self.refresh_assignment();
                    continue;
                }
                write_backoff = Backoff::default();
            }
            let marks_due = self.last_marks.elapsed() >= MARKS_EVERY;
            if (due || marks_due) && self.writing.is_none() {
                self.start_write();
            }
            if self.writing.is_none() && self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.publish_unpublished().await;
            }
            self.prune(Utc::now()).await;
        }
        // Stopping: what was counted is written (a few attempts), so a restart need not count
        // it again.
        self.flush_retrying(&shutdown).await;
        tracing::info!("reconciler stopped");
        Ok(())
    }

    fn retried(&self) {
        crate::liveness::progress();
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("helios_reconcile_retries_total").increment(1);
    }

    /// Flushes until it succeeds; false when shutdown came first.
    async fn flush_retrying(&mut self, shutdown: &Shutdown) -> bool {
        let mut backoff = Backoff::default();
        for attempt in 0.. {
            match self.flush().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "reconciliation not written; retrying");
                    self.retried();
                    if attempt >= 3 && shutdown.is_triggered() {
                        return false;
                    }
                    if !self.wait_polling(backoff.next_wait(), shutdown).await && attempt >= 3 {
                        return false;
                    }
                    // Polling may have brought a rebalance: never write for partitions now
                    // owned by another instance.
                    self.refresh_assignment();
                }
            }
        }
        false
    }
}
