//! Dedup claims on one Redis and on a Redis Cluster, side by side in one run: batches of fresh
//! marks claimed the way the processor claims them (`RedisDedup::claim`), then the same marks
//! again (every one a duplicate). Reported per event: wall time, HELIOS's CPU, and the CPU of
//! every Redis node (`INFO cpu`, summed), so the cluster's cost is counted whole.

use std::time::{Duration, Instant};

use helios::pipeline::dedup::{DedupKey, DedupStore, MarkOwner, RedisDedup, RedisTarget};

use super::process::cpu_micros;

pub struct Row {
    target: String,
    nodes: usize,
    pass: &'static str,
    events: usize,
    per_s: f64,
    helios_us: f64,
    redis_us: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The addresses of every node behind a target (a cluster's from `CLUSTER NODES`).
async fn nodes(target: &RedisTarget) -> anyhow::Result<Vec<String>> {
    Ok(match target {
        RedisTarget::Single(u) => vec![u.clone()],
        RedisTarget::Cluster(seeds) => {
            let mut c = redis::Client::open(seeds[0].as_str())?
                .get_multiplexed_async_connection()
                .await?;
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut c)
                .await?;
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter_map(|a| a.split('@').next())
                .map(|a| format!("redis://{a}"))
                .collect()
        }
    })
}

/// used_cpu_user + used_cpu_sys of every node, in µs.
async fn redis_cpu(nodes: &[String]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for n in nodes {
        let mut c = redis::Client::open(n.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await?;
        for l in info.lines() {
            if let Some(v) = l
                .strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
            {
                sum += v.trim().parse::<f64>().unwrap_or(0.0) * 1e6;
            }
        }
    }
    Ok(sum)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run_once(
    name: &str,
    url: &str,
    events: usize,
    batch: usize,
) -> anyhow::Result<Vec<Row>> {
    let target = RedisTarget::parse(url);
    let nodes = nodes(&target).await?;
    let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
    let dedup = RedisDedup::connect(url, &prefix, Duration::from_secs(900))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let items: Vec<(DedupKey, MarkOwner)> = (0..events)
        .map(|i| {
            (
                DedupKey(format!("direct:bench-{i}")),
                MarkOwner(format!("helios.raw.direct/0/{i}/0")),
            )
        })
        .collect();
    // Warm-up: connections opened, slots known.
    dedup
        .peek(&[DedupKey("direct:warm".into())])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut rows = vec![];
    for pass in ["new marks", "duplicates"] {
        let (r0, c0, t0) = (redis_cpu(&nodes).await?, cpu_micros(), Instant::now());
        let mut lat = vec![];
        for chunk in items.chunks(batch) {
            let t = Instant::now();
            let claims = dedup
                .claim(chunk)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            lat.push(t.elapsed());
            assert_eq!(claims.len(), chunk.len());
        }
        let wall = t0.elapsed();
        let (c1, r1) = (cpu_micros(), redis_cpu(&nodes).await?);
        lat.sort();
        rows.push(Row {
            target: name.to_string(),
            nodes: nodes.len(),
            pass,
            events,
            per_s: events as f64 / wall.as_secs_f64(),
            helios_us: (c1 - c0) as f64 / events as f64,
            redis_us: (r1 - r0) / events as f64,
            p50_ms: pct(&lat, 0.5),
            p99_ms: pct(&lat, 0.99),
        });
    }
    Ok(rows)
}

pub fn print(batch: usize, rows: &[Row]) {
    println!("dedup claims, batches of {batch} (one processor's batch), one client task");
    println!(
        "{:<8} {:>5} {:<11} {:>8} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "target",
        "nodes",
        "pass",
        "events",
        "events/s",
        "HELIOS us/ev",
        "Redis us/ev",
        "p50 ms",
        "p99 ms"
    );
    for r in rows {
        println!(
            "{:<8} {:>5} {:<11} {:>8} {:>10.0} {:>12.2} {:>12.2} {:>10.2} {:>10.2}",
            r.target,
            r.nodes,
            r.pass,
            r.events,
            r.per_s,
            r.helios_us,
            r.redis_us,
            r.p50_ms,
            r.p99_ms
        );
    }
}
