//! The reconciler loop: a consumer-group member over the flows' fan-out topics, co-partitioned
//! (the range assignor gives one member partition p of every step topic, since they have equal
//! partition counts). Per batch: count the events into their instances' states and fire the
//! deadlines the watermarks passed. What was counted is written (see [`super::write`]) while
//! the next batches are read: the outcomes sent to `helios.reconciliation` and acknowledged,
//! then states, results and resolutions in one transaction (fenced by the instance's claims,
//! with how far event time had come on each topic-partition, which a restarted or newly
//! assigned instance takes over), and only then the offsets committed. A crash before the
//! transaction re-does the work (its outcome records may be sent twice; the rows are written
//! once); a crash after it finds every event already counted and changes nothing.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;

use super::backlog::Backlog;
use super::clock::Clock;
use super::clock::{CaughtUp, Held, ReconContext};
use super::engine::{self, Effects, FlowState, OutcomeKind};
use super::input::{self, Seen};
use super::pending::{add_us, Pending, Working, Writing};
use super::store::{ReconStore, Resolution, ResultRow};
use crate::config::KafkaSettings;
use crate::pipeline::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::topology::{Flow, Topology};

/// Default records per batch.
pub const DEFAULT_BATCH: usize = 2000;
/// Instances fetched per flow per look for due deadlines.
const DUE_LIMIT: i64 = 5000;

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
    /// An instance with no partition for this long joins its group again, once (see
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

    /// Counts a batch into the pending states and fires the deadlines the watermarks passed.
    /// The reads (states not pending yet, instances due) come first: if one fails, nothing of
    /// the batch was kept and it is taken again.
    async fn absorb(&mut self, batch: &[rdkafka::message::OwnedMessage]) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut seen: Vec<(usize, Seen)> = vec![];
        let mut skips: Vec<input::Skip> = vec![];
        for m in batch {
            use rdkafka::Message;
            let fields = self
                .fields_by_topic
                .get(m.topic())
                .map(Vec::as_slice)
                .unwrap_or_default();
            match input::read(m, now, fields) {
                Ok(s) => {
                    if let Some(flows) = self.by_topic.get(&s.sighting.topic) {
                        for &f in flows {
                            seen.push((f, s.clone()));
                        }
                    }
                }
                Err(skip) => skips.push(skip),
            }
        }
        // Partitions assigned since the last look are claimed before any of their states is
        // read (a write on its way from their earlier owner is refused from now on, or it was
        // committed before and is read here); the event time reached before is taken over.
        let mut clock = self.clock.clone();
        let fresh = clock.unclaimed();
        let fresh_parts: HashSet<i32> = fresh.iter().map(|t| t.1).collect();
        let mut claimed = HashMap::new();
        let mut floors: HashMap<(usize, i32), DateTime<Utc>> = HashMap::new();
        let mut opens: HashMap<(usize, i32), u64> = HashMap::new();
        let mut built: Vec<(i32, Vec<(String, String)>)> = vec![];
        if !fresh.is_empty() {
            let stored = self.store.claim(&self.cfg.group, &fresh).await?;
            let sources = self.store.sources(&self.cfg.group, &fresh).await?;
            for tp in &fresh {
                let generation = stored.get(tp).map_or(0, |x| x.1);
                clock.claimed(
                    tp,
                    sources.get(tp).map(Vec::as_slice).unwrap_or_default(),
                    now,
                );
                claimed.insert(tp.clone(), generation);
            }
            // The watermarks reached before (never back; never past the wall clock).
            let parts: HashSet<i32> = fresh.iter().map(|t| t.1).collect();
            let list: Vec<i32> = parts.iter().copied().collect();
            for p in &list {
                if !built.iter().any(|(q, _)| q == p) {
                    let t = Instant::now();
                    let keys = self.store.keys_of(*p).await?;
                    add_us(&self.stats.load_us, t);
                    built.push((*p, keys));
                }
            }
            for ((flow, part), n) in self.store.open_counts(&list).await? {
                if let Some(f) = self.flows.iter().position(|x| x.name == flow) {
                    opens.insert((f, part), n);
                }
            }
            for (flow, part, wm, _, _) in self.store.watermarks(&self.cfg.group).await? {
                if let Some(f) = self.flows.iter().position(|x| x.name == flow) {
                    if parts.contains(&part) {
                        floors.insert((f, part), wm.min(now));
                    }
                }
            }
        }
        // States of this batch's instances that are not pending already, as stored: written
        // last by this instance (kept), else read.
        let mut cached: Vec<((usize, String), (i32, FlowState))> = vec![];
        for (f, s) in &seen {
            let k = (*f, s.order_id.clone());
            if !self.pending.work.contains_key(&k)
                && !self
                    .writing
                    .as_ref()
                    .is_some_and(|w| w.work.contains_key(&k))
            {
                if let Some(x) = self.recent.take(&k) {
                    cached.push((k, x));
                }
            }
        }
        let hit: HashSet<&(usize, String)> = cached.iter().map(|(k, _)| k).collect();
        let keys: Vec<(String, String)> = {
            let set: HashSet<(String, String)> = seen
                .iter()
                .filter(|(f, s)| {
                    let k = (*f, s.order_id.clone());
                    !self.pending.work.contains_key(&k)
                        && !hit.contains(&k)
                        && !self
                            .writing
                            .as_ref()
                            .is_some_and(|w| w.work.contains_key(&k))
                        && (fresh_parts.contains(&s.sighting.partition)
                            || self
                                .known
                                .may_be_stored(s.sighting.partition, *f, &s.order_id))
                })
                .map(|(f, s)| (self.flows[*f].name.clone(), s.order_id.clone()))
                .collect();
            set.into_iter().collect()
        };
        drop(hit);
        let t = Instant::now();
        let stored = self.store.load(&keys).await?;
        add_us(&self.stats.load_us, t);
        if !cached.is_empty() {
            self.stats
                .recent_hits
                .fetch_add(cached.len() as u64, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_state_cache_hits_total")
                .increment(cached.len() as u64);
        }
        if !keys.is_empty() {
            self.stats
                .state_reads
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_state_reads_total").increment(keys.len() as u64);
        }
        // The watermarks with this batch's event times, and the stored instances they make due.
        for (_, s) in &seen {
            let skew = self
                .skew_by_topic
                .get(&s.sighting.topic)
                .copied()
                .unwrap_or(crate::topology::DEFAULT_MAX_CLOCK_SKEW);
            clock.record(
                &s.sighting.topic,
                s.sighting.partition,
                &s.sighting.source,
                s.trust(skew).occurred_at,
            );
        }
        let bound = self.backlog.as_ref().and_then(|b| b.view().bound);
        // The statistics that count a partition as read to its end may predate records
        // written since (before the records just read that move event time on): check those
        // partitions against the broker's high watermark now.
        self.confirm_caught_up(&mut clock).await;
        let mut wms: Vec<BTreeMap<i32, DateTime<Utc>>> = vec![];
        let mut helds: HashMap<(usize, i32), Held> = HashMap::new();
        let mut due_rows = vec![];
        let mut checked = self.due_checked.clone();
        for (f, flow) in self.flows.iter().enumerate() {
            let topics = &self.flow_topics[f];
            // Watermarks never go back (a topic read again holds back only what comes next).
            let w: BTreeMap<i32, DateTime<Utc>> = clock
                .partitions(topics)
                .into_iter()
                .filter_map(|p| {
                    let new = clock.watermark(flow, topics, p, self.cfg.idle_after, now, bound);
                    if let Some((_, h)) = &new {
                        helds.insert((f, p), h.clone());
                    }
                    let old = self
                        .watermarks
                        .get(&(f, p))
                        .copied()
                        .max(floors.get(&(f, p)).copied());
                    new.map(|n| n.0).max(old).map(|w| (p, w))
                })
                .collect();
            if batch.is_empty() {
                tracing::debug!(flow = %flow.name, watermarks = ?w, clock = ?clock, "event time while idle");
            }
            // Stored instances due since the last look (earlier ones were fetched then and
            // are pending or written with a later deadline).
            let list: Vec<super::store::DueWindow> = w
                .iter()
                .map(|(p, t)| (*p, checked.get(&(f, *p)).copied(), *t))
                .filter(|(_, lo, hi)| lo.is_none_or(|lo| lo < *hi))
                .collect();
            if !list.is_empty() {
                let t = Instant::now();
                let rows = self.store.due(&flow.name, &list, DUE_LIMIT).await?;
                add_us(&self.stats.due_us, t);
                let cut = (rows.len() as i64 >= DUE_LIMIT)
                    .then(|| rows.iter().map(|r| r.3).max())
                    .flatten();
                for (p, _, hi) in &list {
                    // Cut by the limit: the rest (from the last deadline returned, ties
                    // included) next time.
                    let upto = match cut {
                        Some(c) => (*hi).min(c - chrono::Duration::milliseconds(1)),
                        None => *hi,
                    };
                    checked.insert((f, *p), upto);
                }
                for (key, part, state, _) in rows {
                    due_rows.push((f, key, part, state));
                }
            }
            wms.push(w);
        }
        // Nothing below fails: the batch is now part of the pending work.
        self.clock = clock;
        self.claims.extend(claimed);
        if !fresh.is_empty() {
            // Outcomes an earlier owner wrote and did not publish go out now, before this
            // instance publishes its own there (no write on its way holds outcomes of a
            // partition just claimed: it would be refused). Left for the next sweep if it fails.
            self.unswept.extend(fresh_parts.iter().copied());
            let mut parts: Vec<i32> = fresh_parts.iter().copied().collect();
            parts.sort_unstable();
            self.sweep(&parts).await;
        }
        self.due_checked = checked;
        self.held.extend(helds);
        self.open.extend(opens);
        for (p, keys) in built {
            let flows = &self.flows;
            let index: Vec<(usize, &str)> = keys
                .iter()
                .filter_map(|(f, k)| {
                    flows
                        .iter()
                        .position(|x| &x.name == f)
                        .map(|i| (i, k.as_str()))
                })
                .collect();
            self.known.build(p, index.into_iter());
        }
        for (f, flow) in self.flows.iter().enumerate() {
            let oldest = wms[f].values().min();
            if let Some(w) = oldest {
                let lag = (now - *w).num_milliseconds() as f64 / 1000.0;
                metrics::gauge!("helios_reconcile_event_time_lag_seconds", "flow" => flow.name.clone())
                    .set(lag.max(0.0));
            }
        }
        for (f, w) in wms.iter().enumerate() {
            for (p, t) in w {
                self.watermarks.insert((f, *p), *t);
            }
        }
        let flow_index: HashMap<&str, usize> = self
            .flows
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i))
            .collect();
        let p = &mut self.pending;
        p.since.get_or_insert_with(Instant::now);
        p.skips.extend(skips);
        let mut misplaced = 0u64;
        for m in batch {
            use rdkafka::Message;
            if let (Some(k), Some(n)) = (m.key(), self.partition_counts.get(m.topic())) {
                if crate::kafka::key_partition(k, *n as i32) != m.partition() {
                    misplaced += 1;
                }
            }
            let e = p
                .offsets
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        if misplaced > 0 {
            // Not fatal (a producer with another partitioner may still co-partition its keys
            // its own way), but an order's events may then meet on no single instance.
            self.stats.misplaced.fetch_add(misplaced, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_misplaced_records_total").increment(misplaced);
        }
        // Instances of the write on its way: its version is the newest (the stored row is older
        // until it lands) — those seen again, those whose deadline the watermark passed, and
        // stored ones found due.
        let writing = self.writing.as_ref();
        let from_write = |k: &(usize, String)| {
            writing.and_then(|w| w.work.get(k)).map(|x| Working {
                part: x.part,
                state: x.state.clone(),
                changed: false,
            })
        };
        for (f, s) in &seen {
            let k = (*f, s.order_id.clone());
            if let Entry::Vacant(e) = p.work.entry(k) {
                if let Some(x) = from_write(e.key()) {
                    e.insert(x);
                }
            }
        }
        for (f, key, part, due) in writing.map(|w| w.due.as_slice()).unwrap_or_default() {
            let k = (*f, key.clone());
            if wms[*f].get(part).is_some_and(|wm| due <= wm) && !p.work.contains_key(&k) {
                if let Some(x) = from_write(&k) {
                    p.work.insert(k, x);
                }
            }
        }
        for (k, (part, state)) in cached {
            p.work.entry(k).or_insert(Working {
                part,
                state,
                changed: false,
            });
        }
        for ((flow, key), (part, state)) in stored {
            if let Some(&i) = flow_index.get(flow.as_str()) {
                p.work.entry((i, key)).or_insert(Working {
                    part,
                    state,
                    changed: false,
                });
            }
        }
        for (f, key, part, state) in due_rows {
            // A pending state, or one on its way, is newer than the stored one.
            let k = (f, key);
            self.recent.take(&k);
            let w = from_write(&k).unwrap_or(Working {
                part,
                state,
                changed: false,
            });
            p.work.entry(k).or_insert(w);
        }
        for (_, s) in &seen {
            let skew = self
                .skew_by_topic
                .get(&s.sighting.topic)
                .copied()
                .unwrap_or(crate::topology::DEFAULT_MAX_CLOCK_SKEW);
            let at = s.trust(skew).occurred_at;
            p.newest
                .entry((s.sighting.topic.clone(), s.sighting.partition))
                .or_default()
                .entry(s.sighting.source.clone())
                .and_modify(|n| *n = (*n).max(at))
                .or_insert(at);
        }
        for (f, s) in seen {
            let flow = &self.flows[f];
            let sighting = s.trust(flow.max_clock_skew);
            if sighting.untrusted_occurred_at.is_some() {
                metrics::counter!("helios_reconcile_untrusted_clock_total", "flow" => flow.name.clone())
                    .increment(1);
                tracing::warn!(flow = %flow.name, event_id = %crate::model::text::bounded(&sighting.event_id, 128),
                    occurred_at = ?sighting.untrusted_occurred_at, ingested_at = %s.ingested_at,
                    "occurred_at too far ahead of its reception: counted at its reception time");
            }
            let k = (f, s.order_id.clone());
            if !p.work.contains_key(&k) {
                // A new order: within the partition's cap of open instances, or skipped.
                let open = self.open.entry((f, s.sighting.partition)).or_insert(0);
                if *open >= flow.max_open_per_partition {
                    p.skips.push(input::Skip::InstanceCap);
                    if self.cap_warned.insert((f, s.sighting.partition)) {
                        tracing::warn!(flow = %flow.name, partition = s.sighting.partition, cap = flow.max_open_per_partition,
                            "open instances at max_open_per_partition: events of new orders are skipped (helios_reconcile_skipped_total{{reason=\"instance_cap\"}})");
                    }
                    continue;
                }
                *open += 1;
                self.known.insert(s.sighting.partition, f, &s.order_id);
            }
            let w = p.work.entry(k).or_insert(Working {
                part: s.sighting.partition,
                state: FlowState::default(),
                changed: false,
            });
            w.part = s.sighting.partition;
            let fx = engine::apply(flow, &mut w.state, sighting);
            if fx.already_counted {
                p.counted[f].1 += 1;
                continue;
            }
            w.changed = true;
            p.counted[f].0 += 1;
            collect(
                flow,
                &s.order_id,
                w.part,
                fx,
                &mut p.results,
                &mut p.resolved,
            );
        }
        // Deadlines of every pending instance (stored ones were fetched above when due).
        for ((f, key), w) in p.work.iter_mut() {
            let Some(wm) = wms[*f].get(&w.part) else {
                continue;
            };
            let flow = &self.flows[*f];
            if engine::next_due(flow, &w.state).is_none_or(|d| d > *wm) {
                continue;
            }
            let fx = engine::due(flow, &mut w.state, *wm);
            if !fx.outcomes.is_empty() {
                w.changed = true;
                collect(flow, key, w.part, fx, &mut p.results, &mut p.resolved);
            }
        }
        Ok(())
    }
}

fn collect(
    flow: &Flow,
    key: &str,
    part: i32,
    fx: Effects,
    results: &mut Vec<ResultRow>,
    resolved: &mut Vec<Resolution>,
) {
    for o in fx.outcomes {
        results.push(ResultRow {
            flow: flow.name.clone(),
            key: key.to_string(),
            outcome: o.kind,
            step: o.step,
            event_time: o.event_time,
            duration_ms: o.duration_ms,
            detail: o.detail,
            part,
        });
    }
    for (outcome, step) in fx.resolved {
        resolved.push(Resolution {
            flow: flow.name.clone(),
            key: key.to_string(),
            outcome,
            step,
        });
    }
}
