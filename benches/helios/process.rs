//! `process`: one processor instance on a backlog of realistic raw records (mixed
//! clouds, ~5 % duplicates, ~2 % invalid) into PostgreSQL and the fan-out topics; compared in the
//! same run, on the same broker and backlog, with a plain librdkafka consume-and-produce
//! pass-through (the ceiling of any Kafka processor here).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use helios::config::{KafkaArgs, KafkaSettings};
use helios::db::{EventStore, PgStore, PgWrite};
use helios::model::{CanonicalEvent, Normalized, RawRecord};
use helios::pipeline::dedup::DedupKey;
use helios::pipeline::normalize::normalize;
use helios::pipeline::processor::{DeliveryMode, Processor, ProcessorConfig};
use helios::pipeline::sinks::kafka::output_producer;
use helios::shutdown::Shutdown;
use helios::source::Source;
use helios::topology::Topology;

/// One run's numbers.
#[derive(Debug, Clone)]
pub struct Row {
    pub records: usize,
    /// Deliveries at once.
    pub in_flight: usize,
    pub passthrough_rps: f64,
    pub events_per_s: f64,
    pub cpu_us_per_event: f64,
    /// The whole machine's CPU per event (see [`machine_cpu_micros`]).
    pub box_us_per_event: f64,
    /// CPU per event of the shared parts, each on its own (see [`SharedCpu`]).
    pub shared_us_per_event: SharedCpu,
    pub rss_before_mb: f64,
    pub rss_peak_mb: f64,
    pub outcome: (u64, u64, u64, u64),
    /// The same events written by the processor's statement (COPY into staging, INSERT …
    /// SELECT … ON CONFLICT) and batch size into an empty table, nothing else running.
    pub pg_alone_per_s: f64,
    /// The same, with the earlier `INSERT … SELECT FROM UNNEST(…) ON CONFLICT` statement.
    pub pg_unnest_per_s: f64,
    /// The same rows, plain binary COPY into `events` in one transaction: PostgreSQL's ceiling.
    pub pg_copy_ceiling_per_s: f64,
    /// The batched Python processor on the same backlog (`--peer`).
    pub peer: Option<Peer>,
}

/// What `benches/peer/processor.py` printed.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Peer {
    pub records: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub stored: u64,
    pub duplicates: u64,
    pub dlq: u64,
}

impl Peer {
    pub fn per_s(&self) -> f64 {
        self.records as f64 / self.seconds.max(1e-9)
    }
}

/// Runs the Python peer (`HELIOS_BENCH_PYTHON`, default `python3`, with confluent-kafka,
/// redis and psycopg: `scripts/bench.sh process --peer` installs them) on the backlog, with a
/// consumer group, schema and Redis prefix of its own.
async fn run_peer(
    settings: &KafkaSettings,
    topology: &Topology,
    n: usize,
    database_url: &str,
    redis_url: &str,
    tag: &str,
    partitioned: bool,
) -> anyhow::Result<Peer> {
    let peer_tag = format!("{tag}peer");
    let (schema, pool, _dedup) = crate::scratch_stores(database_url, redis_url, &peer_tag).await?;
    if partitioned {
        crate::partition_events(&pool).await?;
    }
    let raw: Vec<String> = Source::ALL.iter().map(|s| topology.raw_topic(*s)).collect();
    let event_topic = topology.event_topic("OrderPlaced");
    let prefix = event_topic
        .strip_suffix("OrderPlaced")
        .unwrap_or(&event_topic)
        .to_string();
    let python = std::env::var("HELIOS_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = std::process::Command::new(python);
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peer/processor.py"
    ))
    .args(["--bootstrap", &settings.bootstrap_servers])
    .args(["--raw-topics", &raw.join(",")])
    .args(["--dlq-topic", &topology.dlq_topic()])
    .args(["--event-topic-prefix", &prefix])
    .args(["--group", &format!("{}peer", topology.topic_prefix)])
    .args(["--database-url", database_url])
    .args(["--schema", &schema])
    .args(["--redis-url", redis_url])
    .args(["--redis-prefix", &format!("bench:{peer_tag}:")])
    .args(["--records", &n.to_string()])
    .stderr(std::process::Stdio::inherit());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    crate::drop_schema(&pool, &schema).await?;
    if !out.status.success() {
        anyhow::bail!("the Python peer failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let peer: Peer = serde_json::from_str(line.trim().lines().last().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("the Python peer printed `{}`: {e}", line.trim()))?;
    Ok(peer)
}

/// (utime + stime) of this process in microseconds, from /proc.
pub fn cpu_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100 on Linux
}

/// CPU time the whole machine spent (every process: HELIOS, the broker, PostgreSQL, Redis), in
/// µs, from /proc/stat: on a saturated box the cost per event that decides the rate.
pub fn machine_cpu_micros() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or("");
    // cpu  user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| *v)
        .sum();
    busy * 10_000 // USER_HZ = 100 on Linux
}

/// CPU time of the shared parts on this machine, in µs: PostgreSQL (every `postgres` process,
/// with what the backends that ended meanwhile spent: the postmaster's reaped-children time),
/// Redis (`redis-server`) and the broker (`tansu`), from /proc/<pid>/stat.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedCpu {
    pub postgres: f64,
    pub redis: f64,
    pub broker: f64,
}

impl SharedCpu {
    pub fn now() -> Self {
        let mut c = SharedCpu::default();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return c;
        };
        for e in dir.flatten() {
            if !e
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let f: Vec<u64> = stat[close + 1..]
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            // utime, stime, cutime, cstime: fields 14-17 (11-14 after the state).
            let ticks: u64 = f.get(11..15).map_or(0, |x| x.iter().sum());
            let us = (ticks * 10_000) as f64; // USER_HZ = 100 on Linux
            match comm {
                "postgres" => c.postgres += us,
                "redis-server" => c.redis += us,
                "tansu" => c.broker += us,
                _ => {}
            }
        }
        c
    }

    /// What was spent since `before`, per event.
    pub fn per_event_since(&self, before: &SharedCpu, events: u64) -> SharedCpu {
        let n = events.max(1) as f64;
        SharedCpu {
            postgres: (self.postgres - before.postgres).max(0.0) / n,
            redis: (self.redis - before.redis).max(0.0) / n,
            broker: (self.broker - before.broker).max(0.0) / n,
        }
    }
}

/// Resident set size in MiB, from /proc.
pub fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The `i`-th raw record: (source, endpoint, body, extra headers).
fn raw_record(i: usize) -> (Source, &'static str, Vec<u8>, Vec<(&'static str, String)>) {
    // ~5 % duplicates (an earlier record again), ~2 % invalid (a rule violation).
    let dup = i % 20 == 19 && i > 100;
    let id = if dup { i - 97 } else { i };
    let invalid = !dup && i % 50 == 23;
    let customer = if invalid {
        serde_json::Value::Null
    } else {
        serde_json::json!(format!("C-{}", id % 977))
    };
    let order = format!("O-{id}");
    match id % 4 {
        0 => {
            let body = serde_json::json!({"version": "0", "id": format!("eb-{id}"), "detail-type": "OrderPlaced",
                "source": "com.example.orders", "account": "111122223333", "time": "2026-11-22T09:15:02Z",
                "region": "eu-west-1", "resources": [], "detail": {"order_id": order, "customer_id": customer,
                "amount": 129.5, "currency": "EUR", "items": [{"sku": "SKU-1", "qty": 2}]}});
            (
                Source::Aws,
                "eventbridge",
                body.to_string().into_bytes(),
                vec![],
            )
        }
        1 => {
            let data =
                serde_json::json!({"order_id": order, "customer_id": customer, "amount": 42.0});
            let body = serde_json::json!({"message": {"data": base64::engine::general_purpose::STANDARD.encode(data.to_string()),
                "attributes": {"eventType": "OrderPlaced"}, "messageId": format!("ps-{id}"), "message_id": format!("ps-{id}"),
                "publishTime": "2026-11-22T09:15:02.123Z", "publish_time": "2026-11-22T09:15:02.123Z"},
                "subscription": "projects/p/subscriptions/helios"});
            (Source::Gcp, "pubsub", body.to_string().into_bytes(), vec![])
        }
        2 => {
            let body = serde_json::json!([{"id": format!("eg-{id}"), "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.EventGrid/topics/orders",
                "subject": format!("orders/{order}"), "eventType": "Contoso.Orders.OrderPlaced", "eventTime": "2026-11-22T09:15:02.9584103Z",
                "data": {"orderId": order, "customerId": customer, "amount": 10}, "dataVersion": "1", "metadataVersion": "1"}]);
            (
                Source::Azure,
                "eventgrid",
                body.to_string().into_bytes(),
                vec![
                    ("aeg-event-type", "Notification".into()),
                    ("aeg-subscription-name", "HELIOS".into()),
                ],
            )
        }
        _ => {
            let body = serde_json::json!({"event_type": "OrderPlaced", "event_id": format!("d-{id}"),
                "data": {"order_id": order, "customer_id": customer, "amount": 7}});
            (
                Source::Direct,
                "ingest",
                body.to_string().into_bytes(),
                vec![],
            )
        }
    }
}

async fn produce_backlog(
    settings: &KafkaSettings,
    topology: &Topology,
    n: usize,
) -> anyhow::Result<()> {
    let mut cfg = settings.client_config();
    cfg.set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000");
    let producer: FutureProducer = cfg.create()?;
    let now = chrono::Utc::now().to_rfc3339();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let (source, endpoint, body, extra) = raw_record(i);
        let rid = format!("bench-{i}");
        let mut h = helios::http::landing::event_record_headers(source, endpoint, &rid, &now);
        for (k, v) in &extra {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
        let topic = topology.raw_topic(source);
        let rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&topic).payload(body.as_slice()).headers(h);
        enqueue(&producer, &mut pending, rec).await?;
    }
    drain(&mut pending).await
}

/// Queues a record of a backlog; waits for what is in flight when the local queue is full,
/// and every 10,000 records.
pub async fn enqueue<K, P>(
    producer: &FutureProducer,
    pending: &mut Vec<rdkafka::producer::DeliveryFuture>,
    mut rec: FutureRecord<'_, K, P>,
) -> anyhow::Result<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(rec) {
            Ok(f) => {
                pending.push(f);
                break;
            }
            Err((_, back)) => {
                drain(pending).await?;
                rec = back;
            }
        }
    }
    if pending.len() >= 10_000 {
        drain(pending).await?;
    }
    Ok(())
}

pub async fn drain(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    for f in pending.drain(..) {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("backlog produce: {e}"),
            Err(_) => anyhow::bail!("backlog produce canceled"),
        }
    }
    Ok(())
}

/// Consumes every raw record and produces it unchanged (acks=all) to one topic: the ceiling.
async fn passthrough(
    settings: &KafkaSettings,
    topology: &Topology,
    n: usize,
    out_topic: &str,
) -> anyhow::Result<f64> {
    let mut c = settings.client_config();
    c.set("group.id", format!("{}passthrough", topology.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true");
    let consumer: StreamConsumer = c.create()?;
    let topics: Vec<String> = Source::ALL.iter().map(|s| topology.raw_topic(*s)).collect();
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let producer = output_producer(
        settings,
        &DeliveryMode::AtLeastOnce,
        &helios::limits::SizeLimits::default(),
    )?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(2000);
    let mut seen = 0;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("pass-through stalled at {seen}/{n}"))??;
        let mut h = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            for x in hs.iter() {
                h = h.insert(Header {
                    key: x.key,
                    value: x.value,
                });
            }
        }
        let rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(out_topic)
            .payload(m.payload().unwrap_or_default())
            .headers(h);
        match producer.send_result(rec) {
            Ok(f) => pending.push(f),
            Err((e, _)) => anyhow::bail!("pass-through produce: {e}"),
        }
        seen += 1;
        if pending.len() >= 2000 {
            for f in pending.drain(..) {
                let _ = f.await;
            }
        }
    }
    for f in pending.drain(..) {
        let _ = f.await;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One backlog size: fresh topics, pass-through, then the processor.
/// How one processor run is set up.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub batch_size: usize,
    /// Deliveries at once.
    pub in_flight: usize,
    pub partitioned: bool,
    /// Also run the Python peer on the backlog.
    pub peer: bool,
    /// Measure PostgreSQL alone (the PG columns); off: the processor's own numbers only.
    pub pg_columns: bool,
}

pub async fn run_once(
    kafka: &KafkaArgs,
    n: usize,
    database_url: &str,
    redis_url: &str,
    o: RunOptions,
) -> anyhow::Result<Row> {
    let RunOptions {
        batch_size,
        in_flight,
        partitioned,
        peer,
        ..
    } = o;
    let (mut topology, settings, tag) = crate::scratch_topology(kafka)?;
    for spec in [
        &mut topology.raw_topics.aws,
        &mut topology.raw_topics.gcp,
        &mut topology.raw_topics.azure,
        &mut topology.raw_topics.direct,
    ] {
        spec.partitions = 4;
        spec.config.clear();
    }
    helios::kafka::apply_topology(&settings, &topology, false).await?;
    let out_topic = format!("{}passthrough-out", topology.topic_prefix);
    {
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            settings.client_config().create()?;
        let t = rdkafka::admin::NewTopic::new(
            &out_topic,
            4,
            rdkafka::admin::TopicReplication::Fixed(1),
        );
        admin
            .create_topics([&t], &rdkafka::admin::AdminOptions::new())
            .await?;
    }
    eprintln!("[bench] producing a backlog of {n} raw records ...");
    produce_backlog(&settings, &topology, n).await?;
    eprintln!("[bench] pass-through ...");
    let passthrough_rps = passthrough(&settings, &topology, n, &out_topic).await?;

    eprintln!("[bench] processor ...");
    let (schema, pool, dedup) = crate::scratch_stores(database_url, redis_url, &tag).await?;
    if partitioned {
        crate::partition_events(&pool).await?;
    }
    let mut cfg = ProcessorConfig::new(settings.clone(), topology.clone());
    cfg.batch.records = batch_size;
    cfg.deliveries_in_flight = in_flight;
    let p = Processor::new(cfg, dedup, helios::db::PgStore::new(pool.clone()))?;
    let stats = p.stats();
    let (stop, shutdown) = Shutdown::new();
    let rss_before_mb = rss_mb();
    let cpu0 = cpu_micros();
    let box0 = machine_cpu_micros();
    let shared0 = SharedCpu::now();
    let started = Instant::now();
    let task = tokio::spawn(p.run(shutdown));
    let mut rss_peak_mb = rss_before_mb;
    let mut last = (0, Instant::now());
    while stats.raw_records.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak_mb = rss_peak_mb.max(rss_mb());
        let done = stats.raw_records.load(Ordering::Relaxed);
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("processor stalled at {done}/{n}");
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_micros().saturating_sub(cpu0);
    let box_cpu = machine_cpu_micros().saturating_sub(box0);
    let shared1 = SharedCpu::now();
    stop.trigger();
    task.await??;
    let (_, units, out, dups, dlq) = stats.snapshot();
    let shared_us_per_event = shared1.per_event_since(&shared0, units);
    crate::drop_schema(&pool, &schema).await?;
    let peer = if peer {
        eprintln!("[bench] the Python peer ...");
        Some(
            run_peer(
                &settings,
                &topology,
                n,
                database_url,
                redis_url,
                &tag,
                partitioned,
            )
            .await?,
        )
    } else {
        None
    };
    let (pg_alone_per_s, pg_unnest_per_s, pg_copy_ceiling_per_s) = if o.pg_columns {
        pg_columns(database_url, &schema, &topology, n, batch_size, partitioned).await?
    } else {
        (0.0, 0.0, 0.0)
    };
    Ok(Row {
        records: n,
        in_flight,
        passthrough_rps,
        events_per_s: units as f64 / elapsed.as_secs_f64(),
        cpu_us_per_event: cpu as f64 / units.max(1) as f64,
        box_us_per_event: box_cpu as f64 / units.max(1) as f64,
        shared_us_per_event,
        rss_before_mb,
        rss_peak_mb,
        outcome: (units, out, dups, dlq),
        pg_alone_per_s,
        pg_unnest_per_s,
        pg_copy_ceiling_per_s,
        peer,
    })
}

/// PostgreSQL alone on the backlog's events: the processor's write path, the UNNEST statement,
/// the one-transaction COPY ceiling (rows/s each).
async fn pg_columns(
    database_url: &str,
    schema: &str,
    topology: &Topology,
    n: usize,
    batch_size: usize,
    partitioned: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    eprintln!("[bench] PostgreSQL alone ...");
    let events = bench_events(topology, n);
    let copy = pg_alone(
        database_url,
        schema,
        &events,
        batch_size,
        PgWrite::Copy,
        partitioned,
    )
    .await?;
    let unnest = pg_alone(
        database_url,
        schema,
        &events,
        batch_size,
        PgWrite::Unnest,
        partitioned,
    )
    .await?;
    let ceiling = pg_copy_ceiling(database_url, schema, &events, partitioned).await?;
    Ok((copy, unnest, ceiling))
}

/// The backlog's events as the processor would store them: normalized, duplicates and invalid
/// ones left out.
fn bench_events(topology: &Topology, n: usize) -> Vec<CanonicalEvent> {
    let now = chrono::Utc::now().to_rfc3339();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (source, endpoint, body, extra) = raw_record(i);
        let mut headers: Vec<(String, Vec<u8>)> = helios::http::landing::event_record_headers(
            source,
            endpoint,
            &format!("bench-{i}"),
            &now,
        )
        .iter()
        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
        .collect();
        headers.extend(
            extra
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_bytes())),
        );
        let raw = RawRecord {
            topic: topology.raw_topic(source),
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            key: None,
            value: body,
            headers,
        };
        if let Normalized::Events { events, .. } = normalize(&raw) {
            for e in events.into_iter().flatten() {
                if e.customer_id.is_some() && seen.insert(DedupKey::of(&e)) {
                    out.push(e);
                }
            }
        }
    }
    out
}

/// Writes `events` with `method` in batches of `batch_size` into a fresh schema, timing only
/// the writes: the rate PostgreSQL alone sustains on this machine with that statement.
async fn pg_alone(
    database_url: &str,
    schema: &str,
    events: &[CanonicalEvent],
    batch_size: usize,
    method: PgWrite,
    partitioned: bool,
) -> anyhow::Result<f64> {
    let schema = format!("{schema}_{method:?}").to_lowercase();
    let pool = helios::db::connect(database_url, Some(&schema)).await?;
    helios::db::migrate(&pool).await?;
    if partitioned {
        crate::partition_events(&pool).await?;
    }
    let store = PgStore::new(pool.clone()).with_method(method);
    let (mut rows, mut spent) = (0u64, Duration::ZERO);
    for chunk in events.chunks(batch_size.max(1)) {
        let t = Instant::now();
        rows += store.insert_events(chunk).await?;
        spent += t.elapsed();
    }
    crate::drop_schema(&pool, &schema).await?;
    Ok(rows as f64 / spent.as_secs_f64().max(1e-9))
}

/// The same rows, plain binary `COPY` into the `events` table (all its indexes) in one
/// transaction, nothing else running: the most PostgreSQL takes here.
async fn pg_copy_ceiling(
    database_url: &str,
    schema: &str,
    events: &[CanonicalEvent],
    partitioned: bool,
) -> anyhow::Result<f64> {
    let schema = format!("{schema}_copy");
    let pool = helios::db::connect(database_url, Some(&schema)).await?;
    helios::db::migrate(&pool).await?;
    if partitioned {
        crate::partition_events(&pool).await?;
    }
    let refs: Vec<&CanonicalEvent> = events.iter().collect();
    let t = Instant::now();
    let mut tx = pool.begin().await?;
    let mut copy_in = tx.copy_in_raw(helios::db::COPY_INTO_EVENTS).await?;
    copy_in.send(helios::db::copy_encode(&refs)).await?;
    let rows = copy_in.finish().await?;
    tx.commit().await?;
    let spent = t.elapsed();
    crate::drop_schema(&pool, &schema).await?;
    Ok(rows as f64 / spent.as_secs_f64().max(1e-9))
}

/// Prints the results table.
pub fn print(rows: &[Row], partitioned: bool) {
    println!("\nHELIOS processor benchmark (one instance, Tansu memory engine, PostgreSQL + Redis on loopback)");
    if partitioned {
        println!("events table: partitioned daily, 90 days retention (98 partitions + default)");
    }
    println!(
        "{:>9} {:>3} {:>11} {:>10} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>9} {:>10} {:>10} {:>10}   events in = out + dup + dlq",
        "records",
        "fly",
        "passthru/s",
        "events/s",
        "% pass",
        "CPU us/ev",
        "box us/ev",
        "PG us",
        "Redis",
        "broker",
        "RSS MiB",
        "peak MiB",
        "PG alone/s",
        "PG unnest/s",
        "COPY ceil/s"
    );
    for r in rows {
        println!(
            "{:>9} {:>3} {:>11.0} {:>10.0} {:>6.1}% {:>8.1} {:>8.1} {:>6.1} {:>6.1} {:>6.1} {:>8.1} {:>9.1} {:>10.0} {:>10.0} {:>10.0}   {} = {} + {} + {}",
            r.records,
            r.in_flight,
            r.passthrough_rps,
            r.events_per_s,
            100.0 * r.events_per_s / r.passthrough_rps.max(1e-9),
            r.cpu_us_per_event,
            r.box_us_per_event,
            r.shared_us_per_event.postgres,
            r.shared_us_per_event.redis,
            r.shared_us_per_event.broker,
            r.rss_before_mb,
            r.rss_peak_mb,
            r.pg_alone_per_s,
            r.pg_unnest_per_s,
            r.pg_copy_ceiling_per_s,
            r.outcome.0,
            r.outcome.1,
            r.outcome.2,
            r.outcome.3
        );
    }
    if rows.iter().any(|r| r.peer.is_some()) {
        println!("\nThe batched Python peer (benches/peer/processor.py) on the same backlogs, right after each processor run:");
        println!(
            "{:>9} {:>3} {:>10} {:>10} {:>9} {:>8} {:>9}   stored + dup + dlq",
            "records", "fly", "events/s", "peer/s", "HELIOS x", "CPU us/ev", "peak MiB"
        );
        for r in rows {
            if let Some(p) = &r.peer {
                println!(
                    "{:>9} {:>3} {:>10.0} {:>10.0} {:>8.2}x {:>8.1} {:>9.1}   {} + {} + {}",
                    r.records,
                    r.in_flight,
                    r.events_per_s,
                    p.per_s(),
                    r.events_per_s / p.per_s().max(1e-9),
                    1e6 * p.cpu_seconds / p.records.max(1) as f64,
                    p.peak_rss_mib,
                    p.stored,
                    p.duplicates,
                    p.dlq
                );
            }
        }
    }
}
