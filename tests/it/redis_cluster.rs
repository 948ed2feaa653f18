//! Dedup on a Redis Cluster of 3 primaries and 3 replicas on loopback, started by
//! `scripts/redis-cluster.sh`: duplicates are caught across processor instances, and a primary
//! killed mid-stream (its replica promoted) loses no event and stores none twice.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");

/// A cluster of this test's own (stopped when dropped).
struct Cluster {
    dir: PathBuf,
    url: String,
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Cluster {
    fn start() -> Cluster {
        let dir = scratch_dir("redis-cluster");
        // Six ports in a row, and their cluster-bus ports (+10000), all free.
        let base = (0..200)
            .map(|_| 20_000 + (rand_u16() % 30_000))
            .find(|b| (0..6).all(|i| bindable(b + i) && bindable(b + i + 10_000)))
            .expect("six free ports in a row");
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(&dir)
            .arg(base.to_string())
            .output()
            .expect("run redis-cluster.sh");
        assert!(
            out.status.success(),
            "redis-cluster.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(url.contains(','), "{url}");
        Cluster { dir, url }
    }

    /// (port, pid) of each primary now.
    fn primaries(&self) -> Vec<(u16, u32)> {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("primaries")
            .arg(&self.dir)
            .output()
            .expect("run redis-cluster.sh");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (p, pid) = l.split_once(' ')?;
                Some((p.parse().ok()?, pid.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

fn rand_u16() -> u16 {
    uuid::Uuid::new_v4().as_bytes()[0] as u16 * 256 + uuid::Uuid::new_v4().as_bytes()[1] as u16
}

fn keys_on(port: u16) -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "dbsize"])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

async fn send(app: &TestApp, ids: impl Iterator<Item = usize>) {
    // Ten events per request: the direct endpoint takes an array.
    let ids: Vec<usize> = ids.collect();
    for chunk in ids.chunks(10) {
        let body: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| {
                json!({"event_type": "OrderPlaced", "event_id": format!("rc-{i}"),
                    "occurred_at": "2026-12-04T10:00:00Z",
                    "data": {"order_id": format!("O-{i}"), "customer_id": "C-1", "amount": 1.0}})
            })
            .collect();
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .body(serde_json::Value::Array(body).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
}

#[tokio::test]
async fn dedup_on_a_redis_cluster_catches_duplicates_across_instances_and_a_failover_loses_nothing()
{
    let cluster = Cluster::start();
    let app = spawn_app(|_| {}).await;
    let opts = ProcOpts {
        redis_url: cluster.url.clone(),
        batch_records: 20,
        ..ProcOpts::default()
    };

    // Instance A: 300 events; their marks spread over every primary (hash buckets).
    let a = spawn_processor_with(&app.topology, opts.clone()).await;
    send(&app, 0..300).await;
    expect_count(&a.pool, "SELECT count(*) FROM events", 300).await;
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    for (port, _) in &primaries {
        assert!(keys_on(*port) > 0, "no mark on the primary at :{port}");
    }
    a.stop().await;

    // Instance B: every one of them again (duplicates across instances) and 300 new, with a
    // primary killed halfway.
    let b = spawn_processor_with(&app.topology, opts.clone()).await;
    send(&app, (0..150).chain(300..450)).await;
    expect_count(&b.pool, "SELECT count(*) FROM events", 450).await;
    let (port, pid) = primaries[1];
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill {pid} (primary :{port})");
    send(&app, (150..300).chain(450..600)).await;
    expect_count(&b.pool, "SELECT count(*) FROM events", 600).await;

    // The replica took over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.primaries().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no replica was promoted: {:?}",
            cluster.primaries()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing lost, nothing twice: 600 rows, one fan-out record each, 300 duplicates counted
    // (by their marks, or by the store for a mark the failover lost).
    let ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_all(&b.pool)
        .await
        .unwrap();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), distinct.len()), (600, 600));
    let topic = app.topology.event_topic("OrderPlaced");
    let fanned = read_exactly(&app.kafka.bootstrap_servers, &topic, 600).await;
    let fan_ids: HashSet<Vec<u8>> = fanned.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(fan_ids.len(), 600, "one fan-out record per event");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, _, dups, dlq) = b.stats.snapshot();
        assert_eq!(dlq, 0);
        if dups == 300 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{dups} duplicates counted, 300 sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await;
    app.stop().await;
}
