//! `latency`: freshness. Unique EventBridge events are pushed through the ingress at a steady
//! rate; a processor in the same process (as `helios run`) writes them to PostgreSQL. The
//! latency of an event is `processed_at − ingested_at` of its row: from the ingress receiving
//! the request to the transaction that stored it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use helios::config::KafkaArgs;
use helios::db::PgStore;
use helios::ingress::IngressConfig;
use helios::pipeline::processor::{Processor, ProcessorConfig};
use helios::shutdown::Shutdown;

/// One run's settings.
pub struct Opts {
    pub rate: u64,
    pub connections: usize,
    pub seconds: u64,
    /// The consumer's `fetch.wait.max.ms`; `None`: the processor's default.
    pub fetch_wait_ms: Option<u64>,
}

/// One run's numbers.
pub struct Row {
    pub fetch_wait: String,
    pub sent_per_s: f64,
    pub errors: u64,
    pub measured: i64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn event(i: u64) -> String {
    serde_json::json!({"version": "0", "id": format!("lat-{i}"), "detail-type": "OrderPlaced",
        "source": "com.example.orders", "account": "111122223333", "time": "2026-11-22T09:15:02Z",
        "region": "eu-west-1", "resources": [], "detail": {"order_id": format!("O-{i}"),
        "customer_id": "C-42", "amount": 129.5, "currency": "EUR"}})
    .to_string()
}

/// Sends `rate` requests/s in all from `connections` workers until `until`, numbering events
/// from `next`. Returns (accepted, errors).
async fn load(
    url: &str,
    rate: u64,
    connections: usize,
    until: Instant,
    next: Arc<AtomicU64>,
) -> (u64, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("reqwest client");
    let period = Duration::from_secs_f64(connections as f64 / rate.max(1) as f64);
    let mut tasks = vec![];
    for w in 0..connections {
        let (c, u, next) = (client.clone(), url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            // Workers start spread over one period, each on its own fixed schedule.
            let mut due =
                tokio::time::Instant::now() + period.mul_f64(w as f64 / connections as f64);
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < until {
                tokio::time::sleep_until(due).await;
                due += period;
                let i = next.fetch_add(1, Ordering::Relaxed);
                let sent = c
                    .post(&u)
                    .header("content-type", "application/json")
                    .body(event(i))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => errors += 1,
                }
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        if let Ok((o, e)) = t.await {
            ok += o;
            errors += e;
        }
    }
    (ok, errors)
}

/// Fresh topics, schema and dedup prefix; the ingress and a processor; warm-up, then the
/// measured load; waits until every accepted event is stored, then reads the latencies.
pub async fn run_once(
    kafka: &KafkaArgs,
    o: &Opts,
    database_url: &str,
    redis_url: &str,
) -> anyhow::Result<Row> {
    let (topology, mut settings, tag) = crate::scratch_topology(kafka)?;
    helios::kafka::apply_topology(&settings, &topology, false).await?;
    let (schema, pool, dedup) = crate::scratch_stores(database_url, redis_url, &tag).await?;
    let (stop, shutdown) = Shutdown::new();
    let running = helios::ingress::start(
        IngressConfig::new(settings.clone(), topology.clone()),
        shutdown.clone(),
    )
    .await?;
    if let Some(ms) = o.fetch_wait_ms {
        settings
            .properties
            .insert("fetch.wait.max.ms".into(), ms.to_string());
    }
    let processor = Processor::new(
        ProcessorConfig::new(settings, topology),
        dedup,
        PgStore::new(pool.clone()),
    )?;
    let task = tokio::spawn(processor.run(shutdown));
    let url = format!("http://{}/api/v1/webhooks/aws/eventbridge", running.addr);
    let next = Arc::new(AtomicU64::new(0));

    eprintln!("[bench] warm-up ...");
    let warm = load(
        &url,
        o.rate,
        o.connections,
        Instant::now() + Duration::from_secs(3),
        next.clone(),
    )
    .await;
    let first_measured = next.load(Ordering::Relaxed);
    eprintln!("[bench] {} requests/s for {} s ...", o.rate, o.seconds);
    let t0 = Instant::now();
    let (ok, errors) = load(
        &url,
        o.rate,
        o.connections,
        Instant::now() + Duration::from_secs(o.seconds),
        next.clone(),
    )
    .await;
    let sent_per_s = ok as f64 / t0.elapsed().as_secs_f64();
    let expected = (warm.0 + ok) as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await?;
        if n >= expected {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {n} of {expected} accepted events were stored within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.trigger();
    task.await??;
    running.wait().await?;
    // Only the measured events: ids numbered from the end of the warm-up.
    let (measured, p50, p90, p99, max): (i64, f64, f64, f64, f64) = sqlx::query_as(
        "SELECT count(*),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.9) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                max(ms)
         FROM (SELECT extract(epoch FROM processed_at - ingested_at)::float8 * 1000 AS ms
               FROM events WHERE substr(event_id, 5)::int8 >= $1) l",
    )
    .bind(first_measured as i64)
    .fetch_one(&pool)
    .await?;
    crate::drop_schema(&pool, &schema).await?;
    Ok(Row {
        fetch_wait: o
            .fetch_wait_ms
            .map_or("default".into(), |ms| format!("{ms} ms")),
        sent_per_s,
        errors,
        measured,
        p50_ms: p50,
        p90_ms: p90,
        p99_ms: p99,
        max_ms: max,
    })
}

/// Prints the results table.
pub fn print(rate: u64, connections: usize, rows: &[Row]) {
    println!("\nHELIOS freshness benchmark: ingress + processor in one process, {rate} requests/s asked, {connections} connections, Tansu memory engine");
    println!(
        "{:<18} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "fetch.wait.max.ms", "sent/s", "errors", "events", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in rows {
        println!(
            "{:<18} {:>10.0} {:>8} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            r.fetch_wait,
            r.sent_per_s,
            r.errors,
            r.measured,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms
        );
    }
}
