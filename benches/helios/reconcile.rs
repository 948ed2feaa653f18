//! `reconcile`: one reconciler on a backlog of fan-out events (orders with one to three steps,
//! some paid twice, some payments without an order), measured as events/s, CPU µs per event and
//! peak RSS, with the outcomes it reported and the orders left open.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use helios::config::{KafkaArgs, KafkaSettings};
use helios::model::{CanonicalEvent, RawRef};
use helios::reconcile::{ReconStore, Reconciler, ReconcilerConfig};
use helios::shutdown::Shutdown;
use helios::source::Source;
use helios::topology::Topology;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::process::{cpu_micros, drain, enqueue, machine_cpu_micros, rss_mb};

pub struct Row {
    events: usize,
    orders: usize,
    events_per_s: f64,
    cpu_us_per_event: f64,
    /// The whole machine's CPU per event (HELIOS, the broker, PostgreSQL).
    box_us_per_event: f64,
    /// Orders seen again whose state came from the instances written last / from PostgreSQL.
    recent_hits: u64,
    state_reads: u64,
    rss_before_mb: f64,
    rss_peak_mb: f64,
    outcomes: Vec<(String, i64)>,
    /// The outcomes equal what the backlog must give.
    correct: bool,
    open: i64,
    /// Writes landed (transactions of states, results and progress).
    writes: u64,
    /// Share of the run spent in each phase: poll, load, due, send, save (%), and waiting for
    /// a write (send and save run beside the reading; the loop waits only for `wait`).
    phases: [f64; 6],
}

/// The events of order `i` (type, cloud, seconds after its start): every order is placed;
/// 90 % are paid (3 % of those twice, through another cloud), 80 % reserved; 2 % are payments
/// whose order never comes.
fn order(i: usize) -> Vec<(&'static str, Source, i64)> {
    let h = (i.wrapping_mul(2_654_435_761)) % 100;
    if h < 2 {
        return vec![("PaymentProcessed", Source::Gcp, 30)];
    }
    let mut v = vec![("OrderPlaced", Source::Aws, 0)];
    if h < 92 {
        v.push(("PaymentProcessed", Source::Azure, 60));
        if h < 5 {
            v.push(("PaymentProcessed", Source::Gcp, 65));
        }
    }
    if h < 82 {
        v.push(("InventoryReserved", Source::Gcp, 120));
    }
    v
}

/// Event time of order `i`'s start (50 ms apart).
fn start_of(t0: DateTime<Utc>, i: usize) -> DateTime<Utc> {
    t0 + chrono::Duration::milliseconds(i as i64 * 50)
}

/// The outcomes `orders` orders must have once event time reached `watermark`, with the
/// default flow (15m, 30m): none is late or out of order.
fn expected(t0: DateTime<Utc>, orders: usize, watermark: DateTime<Utc>) -> Vec<(String, i64)> {
    let mut c: std::collections::BTreeMap<&str, i64> = Default::default();
    let passed = |at: DateTime<Utc>, mins: i64| at + chrono::Duration::minutes(mins) <= watermark;
    for i in 0..orders {
        let steps = order(i);
        let start = start_of(t0, i);
        let has = |t: &str| steps.iter().filter(|s| s.0 == t).count();
        if has("OrderPlaced") == 0 {
            let first = start + chrono::Duration::seconds(steps[0].2);
            if passed(first, 30) {
                *c.entry("orphan").or_default() += 1;
            }
            continue;
        }
        if has("PaymentProcessed") > 1 {
            *c.entry("duplicate_step").or_default() += 1;
        }
        if has("PaymentProcessed") == 0 && passed(start, 15) {
            *c.entry("missing").or_default() += 1;
        }
        if has("InventoryReserved") == 0 && passed(start, 30) {
            *c.entry("missing").or_default() += 1;
        }
        if has("PaymentProcessed") > 0 && has("InventoryReserved") > 0 {
            *c.entry("completed").or_default() += 1;
        }
    }
    c.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Fan-out records of whole orders until at least `n` events: an order starts every 50 ms of
/// event time, so the 15-minute and 30-minute deadlines pass while the backlog is read.
/// Returns (events, orders, the start of event time, the clock records' event time).
async fn produce(
    settings: &KafkaSettings,
    topology: &Topology,
    n: usize,
) -> anyhow::Result<(usize, usize, DateTime<Utc>, DateTime<Utc>)> {
    let mut cfg = settings.client_config();
    cfg.set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000");
    let producer: FutureProducer = cfg.create()?;
    let t0: DateTime<Utc> = Utc::now() - chrono::Duration::days(2);
    let (mut produced, mut orders, mut newest) = (0, 0, t0);
    let mut pending = Vec::with_capacity(10_000);
    for i in 0.. {
        if produced >= n {
            break;
        }
        orders += 1;
        let key = format!("B-{i}");
        for (j, (ty, source, at)) in order(i).into_iter().enumerate() {
            let e = CanonicalEvent {
                event_id: format!("{key}-{j}"),
                event_type: ty.into(),
                source,
                occurred_at: start_of(t0, i) + chrono::Duration::seconds(at),
                ingested_at: Utc::now(),
                order_id: Some(key.clone()),
                customer_id: Some("C-1".into()),
                data: serde_json::json!({"order_id": key, "customer_id": "C-1", "amount": 10}),
                metadata: Default::default(),
                raw: RawRef {
                    topic: format!("helios.raw.{}", source.as_str()),
                    partition: 0,
                    offset: i as i64,
                    index: 0,
                },
            };
            newest = newest.max(e.occurred_at);
            let topic = topology.event_topic(ty);
            let payload = helios::pipeline::fanout::json_payload(&e);
            let headers = helios::pipeline::fanout::headers(&e, "application/json", None, None);
            let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                .key(key.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            enqueue(&producer, &mut pending, rec).await?;
            produced += 1;
        }
    }
    drain(&mut pending).await?;
    // Then every input (each cloud on each topic-partition: event time is the slowest input's)
    // is clocked an hour past the newest event, so every deadline of the backlog passes.
    let clock = newest + chrono::Duration::hours(1);
    for p in 0..topology.event_topics.partitions {
        for (ty, source) in [
            ("OrderPlaced", Source::Aws),
            ("PaymentProcessed", Source::Azure),
            ("PaymentProcessed", Source::Gcp),
            ("InventoryReserved", Source::Gcp),
        ] {
            let key = format!("clock-{p}-{ty}-{}", source.as_str());
            let e = CanonicalEvent {
                event_id: key.clone(),
                event_type: ty.into(),
                source,
                occurred_at: clock,
                ingested_at: Utc::now(),
                order_id: Some(key.clone()),
                customer_id: Some("C-1".into()),
                data: serde_json::json!({"order_id": key, "customer_id": "C-1", "amount": 10}),
                metadata: Default::default(),
                raw: RawRef {
                    topic: format!("helios.raw.{}", source.as_str()),
                    partition: 0,
                    offset: 0,
                    index: 0,
                },
            };
            let topic = topology.event_topic(ty);
            let payload = helios::pipeline::fanout::json_payload(&e);
            let headers = helios::pipeline::fanout::headers(&e, "application/json", None, None);
            let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic)
                .key(key.as_str())
                .partition(p)
                .payload(payload.as_slice())
                .headers(headers);
            enqueue(&producer, &mut pending, rec).await?;
            produced += 1;
        }
    }
    drain(&mut pending).await?;
    Ok((produced, orders, t0, clock))
}

pub async fn run_once(
    kafka: &KafkaArgs,
    n: usize,
    database_url: &str,
    batch_size: usize,
) -> anyhow::Result<Row> {
    let (mut topology, settings, tag) = crate::scratch_topology(kafka)?;
    topology.event_topics.partitions = 4;
    topology.event_topics.config.clear();
    topology.reconciler_group = format!("bench-{tag}.helios-reconciler");
    helios::kafka::apply_topology(&settings, &topology, false).await?;
    eprintln!("[bench] producing a backlog of {n} fan-out events ...");
    let (n, orders, t0, newest) = produce(&settings, &topology, n).await?;
    // Once everything is read, event time stands at the clock records minus the lateness.
    let lateness = topology.flows()?[0].allowed_lateness;
    let want = expected(t0, orders, newest - chrono::Duration::from_std(lateness)?);
    let schema = format!("bench_{tag}");
    let pool = helios::db::connect(database_url, Some(&schema)).await?;
    helios::db::migrate(&pool).await?;
    eprintln!("[bench] reconciler ...");
    let r = Reconciler::new(
        ReconcilerConfig {
            kafka: settings.clone(),
            group: topology.reconciler_group.clone(),
            topology: topology.clone(),
            batch_size,
            idle_after: Duration::from_secs(3600),
            state_retention: Duration::from_secs(8 * 86_400),
            rejoin_after: helios::reconcile::DEFAULT_REJOIN_AFTER,
            backlog_every: helios::reconcile::DEFAULT_BACKLOG_EVERY,
        },
        ReconStore::Pg(pool.clone()),
    )?;
    let stats = r.stats.clone();
    let store = pool.clone();
    let (stop, shutdown) = Shutdown::new();
    let rss_before_mb = rss_mb();
    let cpu0 = cpu_micros();
    let box0 = machine_cpu_micros();
    let started = Instant::now();
    let task = tokio::spawn(r.run(shutdown));
    let mut rss_peak_mb = rss_before_mb;
    let read = || {
        stats.events.load(Ordering::Relaxed)
            + stats.skipped.load(Ordering::Relaxed)
            + stats.already_counted.load(Ordering::Relaxed)
    };
    let mut last = (0, Instant::now());
    while read() < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak_mb = rss_peak_mb.max(rss_mb());
        let done = read();
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("reconciler stalled at {done}/{n}");
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_micros().saturating_sub(cpu0);
    let box_cpu = machine_cpu_micros().saturating_sub(box0);
    // The deadlines the last records passed fire once the partitions count as read to the end.
    let counts = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT outcome, count(*) FROM reconciliation_results GROUP BY outcome ORDER BY outcome",
        )
        .fetch_all(&store)
        .await
    };
    let settle = Instant::now() + Duration::from_secs(30);
    while counts().await? != want && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let share = |c: &std::sync::atomic::AtomicU64| {
        100.0 * c.load(Ordering::Relaxed) as f64 / elapsed.as_micros() as f64
    };
    let phases = [
        share(&stats.poll_us),
        share(&stats.load_us),
        share(&stats.due_us),
        share(&stats.send_us),
        share(&stats.save_us),
        share(&stats.wait_us),
    ];
    stop.trigger();
    task.await??;
    let outcomes: Vec<(String, i64)> = counts().await?;
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM flow_state WHERE next_due IS NOT NULL")
            .fetch_one(&pool)
            .await?;
    crate::drop_schema(&pool, &schema).await?;
    Ok(Row {
        events: n,
        orders,
        events_per_s: n as f64 / elapsed.as_secs_f64(),
        cpu_us_per_event: cpu as f64 / n.max(1) as f64,
        box_us_per_event: box_cpu as f64 / n.max(1) as f64,
        recent_hits: stats.recent_hits.load(Ordering::Relaxed),
        state_reads: stats.state_reads.load(Ordering::Relaxed),
        rss_before_mb,
        rss_peak_mb,
        correct: outcomes == want,
        outcomes,
        open,
        writes: stats.batches.load(Ordering::Relaxed),
        phases,
    })
}

pub fn print(rows: &[Row]) {
    println!(
        "\nHELIOS reconciler benchmark (one instance, Tansu memory engine, PostgreSQL on loopback)"
    );
    println!(
        "{:>9} {:>8} {:>10} {:>9} {:>9} {:>8} {:>9} {:>8} {:>7} {:>15}  {:<34}  outcomes",
        "events",
        "orders",
        "events/s",
        "CPU us/ev",
        "box us/ev",
        "RSS MiB",
        "peak MiB",
        "open",
        "writes",
        "kept/read",
        "% poll/load/due/send/save/wait"
    );
    for r in rows {
        let outcomes: Vec<String> = r.outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!(
            "{:>9} {:>8} {:>10.0} {:>9.1} {:>9.1} {:>8.1} {:>9.1} {:>8} {:>7} {:>15}  {:<34}  {}",
            r.events,
            r.orders,
            r.events_per_s,
            r.cpu_us_per_event,
            r.box_us_per_event,
            r.rss_before_mb,
            r.rss_peak_mb,
            r.open,
            r.writes,
            format!("{}/{}", r.recent_hits, r.state_reads),
            r.phases
                .iter()
                .map(|p| format!("{p:.0}"))
                .collect::<Vec<_>>()
                .join("/"),
            outcomes.join(", ")
        );
        if !r.correct {
            println!("          MISMATCH: these are not the outcomes the backlog must give");
        }
    }
}
