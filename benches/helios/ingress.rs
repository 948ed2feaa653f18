//! `ingress`: requests/s and latency percentiles of the ingress (acks=all to a real
//! broker) at N concurrent connections, measured in the same run and with the same load against
//! a bare HTTP server that does nothing (the ceiling on this machine).

use std::time::{Duration, Instant};

use axum::routing::post;

use helios::config::KafkaArgs;
use helios::ingress::IngressConfig;
use helios::shutdown::Shutdown;

/// Results of one load run.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

const SAMPLE: &str = r#"{"version":"0","id":"6a7e8feb-b491-4cf7-a9f1-bf3703467718","detail-type":"OrderPlaced","source":"com.example.orders","account":"111122223333","time":"2026-11-22T18:43:48Z","region":"us-west-1","resources":[],"detail":{"order_id":"O-1001","customer_id":"C-42","amount":129.5,"currency":"EUR","items":[{"sku":"SKU-1","qty":2}]}}"#;

/// Sends POSTs of `body` to `url` from `connections` workers for `duration`.
pub async fn load(
    url: &str,
    body: &'static str,
    connections: usize,
    duration: Duration,
) -> LoadResult {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("reqwest client");
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..connections {
        let c = client.clone();
        let u = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = c
                    .post(&u)
                    .header("content-type", "application/json; charset=utf-8")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i] as f64 / 1000.0
    };
    LoadResult {
        requests: all.len() as u64,
        errors,
        elapsed,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    }
}

/// What a row measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Bare,
    Ingress,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Bare => "bare HTTP server (ceiling)",
            Target::Ingress => "helios ingress -> Kafka",
        }
    }
}

/// One target measured at one connection count: the load's result and what the CPU did
/// meanwhile (this process holds the load generator and the server under test).
struct Row {
    target: Target,
    connections: usize,
    load: LoadResult,
    /// Share of both cores busy (every process), %.
    busy_pct: f64,
    /// CPU µs per request: the whole machine, this process (load generator and server), the broker.
    box_us: f64,
    self_us: f64,
    broker_us: f64,
}

/// Runs the load against `url` and reads the CPU spent meanwhile, from /proc.
async fn measure(target: Target, url: &str, connections: usize, duration: Duration) -> Row {
    let (box0, self0, shared0) = (
        crate::process::machine_cpu_micros(),
        crate::process::cpu_micros(),
        crate::process::SharedCpu::now(),
    );
    let load = load(url, SAMPLE, connections, duration).await;
    let n = load.requests.max(1) as f64;
    let box_us = crate::process::machine_cpu_micros().saturating_sub(box0) as f64;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    Row {
        target,
        connections,
        busy_pct: 100.0 * box_us / (load.elapsed.as_micros() as f64 * cores),
        box_us: box_us / n,
        self_us: crate::process::cpu_micros().saturating_sub(self0) as f64 / n,
        broker_us: crate::process::SharedCpu::now()
            .per_event_since(&shared0, load.requests)
            .broker,
        load,
    }
}

/// The ingress against a bare HTTP server, at each of `connections` for `seconds` each.
pub async fn run(kafka: &KafkaArgs, connections: &[usize], seconds: u64) -> anyhow::Result<()> {
    let (topology, settings, _) = crate::scratch_topology(kafka)?;
    helios::kafka::apply_topology(&settings, &topology, false).await?;
    let duration = Duration::from_secs(seconds);
    let warmup = Duration::from_secs(2);
    let mut rows = vec![];

    // The ceiling: a server that reads the body and answers, nothing else.
    let bare = axum::Router::new().route(
        "/bare",
        post(|body: bytes::Bytes| async move {
            axum::Json(serde_json::json!({"status": "accepted", "bytes": body.len()}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bare_addr = listener.local_addr()?;
    let (bare_stop, bare_shutdown) = Shutdown::new();
    let bare_task = tokio::spawn(async move {
        axum::serve(listener, bare)
            .with_graceful_shutdown(bare_shutdown.wait())
            .await
    });
    let bare_url = format!("http://{bare_addr}/bare");
    for &c in connections {
        load(&bare_url, SAMPLE, c, warmup).await;
        rows.push(measure(Target::Bare, &bare_url, c, duration).await);
    }
    bare_stop.trigger();
    let _ = bare_task.await;

    let mut cfg = IngressConfig::new(settings.clone(), topology.clone());
    cfg.port = 0;
    let (stop, shutdown) = Shutdown::new();
    let running = helios::ingress::start(cfg, shutdown).await?;
    let url = format!("http://{}/api/v1/webhooks/aws/eventbridge", running.addr);
    // Wait for the first acknowledged record before measuring.
    let wait_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < wait_until {
        if load(&url, SAMPLE, 1, Duration::from_millis(200))
            .await
            .requests
            > 0
        {
            break;
        }
    }
    for &c in connections {
        load(&url, SAMPLE, c, warmup).await;
        rows.push(measure(Target::Ingress, &url, c, duration).await);
    }
    stop.trigger();
    running.wait().await?;

    println!(
        "\nHELIOS ingress benchmark: {seconds} s per target and connection count, {}-byte EventBridge event, acks=all to {}",
        SAMPLE.len(),
        settings.bootstrap_servers
    );
    println!(
        "{:<28} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7} {:>7}",
        "target",
        "conns",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "busy%",
        "box us",
        "self us",
        "broker"
    );
    for r in &rows {
        let l = &r.load;
        println!(
            "{:<28} {:>5} {:>8.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>6.0} {:>7.1} {:>7.1} {:>7.1}",
            r.target.label(), r.connections, l.rps(), l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.errors,
            r.busy_pct, r.box_us, r.self_us, r.broker_us
        );
    }
    for &c in connections {
        let rps = |t: Target| {
            rows.iter()
                .find(|r| r.connections == c && r.target == t)
                .map_or(f64::NAN, |r| r.load.rps())
        };
        println!(
            "ingress / ceiling at {c} connections: {:.1} %",
            100.0 * rps(Target::Ingress) / rps(Target::Bare).max(1e-9)
        );
    }
    println!("(busy%: both cores, every process; box/self/broker us: CPU per request of the whole machine, of this process — load generator and server — and of the broker)");
    Ok(())
}
