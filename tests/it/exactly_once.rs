//! Exactly-once mode against librdkafka's mock cluster (Tansu 0.6.0 has no transactions):
//! a processor killed mid-stream and restarted; nothing lost, nothing written twice by one
//! instance, and nothing the killed instance committed written again. (The mock shows aborted
//! transactions to read_committed consumers, so their invisibility is Kafka's part, not shown here.)

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use serde_json::json;

use crate::common::*;

/// Runs a mock cluster on its own thread (it is not Send) until the returned sender is dropped.
fn mock_cluster(topics: Vec<(String, i32)>) -> (String, mpsc::Sender<()>) {
    let (tx_addr, rx_addr) = mpsc::channel();
    let (tx_stop, rx_stop) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let cluster = MockCluster::new(1).expect("mock cluster");
        for (t, p) in &topics {
            cluster.create_topic(t, *p, 1).expect("mock topic");
        }
        tx_addr.send(cluster.bootstrap_servers()).unwrap();
        let _ = rx_stop.recv(); // until the test drops the sender
        drop(cluster);
    });
    (rx_addr.recv().unwrap(), tx_stop)
}

fn spawn_eos(
    bootstrap: &str,
    topology: &helios::topology::Topology,
    schema: &str,
    prefix: &str,
) -> std::process::Child {
    helios_process_command(bootstrap, topology, schema, prefix)
        .env("HELIOS_EXACTLY_ONCE", "true")
        // The mock cluster does not abort a fenced predecessor's open transaction at once (a real
        // cluster does, in init_transactions): a short timeout bounds how long it blocks readers.
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", "10000")
        .env(
            "HELIOS_TRANSACTIONAL_ID",
            format!("{}eos-test", topology.topic_prefix),
        )
        .spawn()
        .expect("start helios process --exactly-once")
}

#[tokio::test]
async fn exactly_once_across_a_crash_on_the_mock_cluster() {
    let topology = test_topology();
    let topics: Vec<(String, i32)> = topology
        .planned_topics()
        .into_iter()
        .map(|t| (t.name, 2))
        .collect();
    let (bootstrap, _stop) = mock_cluster(topics);
    let n = 1500;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("x-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect();
    produce_direct_to(&bootstrap, &topology, &bodies).await;

    let (schema, prefix, pool) = scratch_store().await;
    let mut first = spawn_eos(&bootstrap, &topology, &schema, &prefix);
    let seen = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        200,
        Duration::from_secs(90),
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let killed_at_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        seen >= 200,
        "the first processor made no progress ({seen} rows)"
    );
    let at_kill: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        at_kill < n as i64,
        "finished before the kill; the test proves nothing"
    );

    let restarted_at_ms = chrono::Utc::now().timestamp_millis();
    let mut second = spawn_eos(&bootstrap, &topology, &schema, &prefix);
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        n as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(rows, n as i64, "PostgreSQL: every event exactly once");
    // The last transaction commits right after the rows: read until every event is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = read_records(
            &bootstrap,
            &topology.event_topic("OrderPlaced"),
            3 * n,
            Duration::from_secs(5),
        )
        .await;
        let ids: HashSet<&str> = out.iter().filter_map(|r| r.header("ce_id")).collect();
        if ids.len() >= n || std::time::Instant::now() > deadline {
            break out;
        }
    };
    second.kill().unwrap();
    second.wait().unwrap();

    // Who wrote what: the killed instance's records were created before the kill, the restarted
    // instance's after its start.
    let (mut by_first, mut by_second) = (
        HashMap::<String, Vec<&Record>>::new(),
        HashMap::<String, Vec<&Record>>::new(),
    );
    for r in &out {
        let id = r.header("ce_id").expect("ce_id header").to_string();
        let ts = r.timestamp.expect("record timestamp");
        if ts < killed_at_ms {
            by_first.entry(id).or_default().push(r);
        } else {
            assert!(
                ts >= restarted_at_ms,
                "a record created between the kill and the restart"
            );
            by_second.entry(id).or_default().push(r);
        }
    }
    // Nothing lost: every event is on its topic.
    let all: HashSet<&String> = by_first.keys().chain(by_second.keys()).collect();
    assert_eq!(all.len(), n, "events missing from the fan-out topic");
    // Each instance wrote each event at most once.
    for (who, m) in [("killed", &by_first), ("restarted", &by_second)] {
        let twice: Vec<_> = m
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, _)| k)
            .collect();
        assert!(
            twice.is_empty(),
            "the {who} instance wrote events twice: {twice:?}"
        );
    }
    // What the restarted instance wrote again is only the batch the killed one had in flight:
    // never an event of a transaction the killed instance had committed (offsets and records are
    // one transaction). On a real cluster that in-flight transaction is aborted when the restarted
    // instance fences its predecessor (init_transactions) and read_committed consumers never see
    // it; librdkafka's mock cluster does not filter aborted transactions (see
    // `the_mock_cluster_shows_aborted_transactions_to_read_committed_consumers`), so here its
    // records stay visible, and this is the most the mock can prove: at most one batch, and only
    // the killed instance's last records on each partition.
    let rewritten: Vec<&String> = by_first
        .keys()
        .filter(|k| by_second.contains_key(*k))
        .collect();
    let batch = 50;
    eprintln!(
        "exactly-once: {} event(s) of the killed instance's in-flight batch written again",
        rewritten.len()
    );
    assert!(
        rewritten.len() <= batch,
        "{} events written by both instances: more than the one batch in flight",
        rewritten.len()
    );
    for id in &rewritten {
        let r = by_first[*id][0];
        let later_kept = by_first
            .values()
            .flatten()
            .filter(|o| o.partition == r.partition && o.offset > r.offset)
            .any(|o| !by_second.contains_key(o.header("ce_id").unwrap()));
        assert!(
            !later_kept,
            "event {id} was written again although a later record of the killed instance (partition {}) was kept: a committed transaction was replayed",
            r.partition
        );
    }
}

/// Why the test above cannot be strict on "never twice" here: the mock cluster hands the
/// records of an aborted transaction to read_committed consumers. If this starts failing,
/// librdkafka's mock learned to filter aborted transactions: make the test above strict.
#[tokio::test]
async fn the_mock_cluster_shows_aborted_transactions_to_read_committed_consumers() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let (bootstrap, _stop) = mock_cluster(vec![("t".into(), 1)]);
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        let p: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("transactional.id", "probe")
            .create()
            .unwrap();
        let t = Duration::from_secs(10);
        p.init_transactions(t).unwrap();
        for (tag, commit) in [("committed", true), ("aborted", false)] {
            p.begin_transaction().unwrap();
            for i in 0..5 {
                let k = format!("{tag}-{i}");
                p.send(BaseRecord::to("t").key(&k).payload(&k)).unwrap();
            }
            p.flush(t).unwrap();
            if commit {
                p.commit_transaction(t).unwrap();
            } else {
                p.abort_transaction(t).unwrap();
            }
        }
    })
    .await
    .unwrap();
    let out = read_records(&bootstrap, "t", 11, Duration::from_secs(5)).await;
    let aborted = out
        .iter()
        .filter(|r| r.key.as_deref().is_some_and(|k| k.starts_with(b"aborted")))
        .count();
    assert_eq!((out.len(), aborted), (10, 5));
}
