//! Exactly-once mode against librdkafka's mock cluster (Tansu 0.6.0 has no transactions):
//! a processor killed mid-stream and restarted; nothing lost, nothing written twice by one
//! instance, and nothing the killed instance committed written again. (The mock shows aborted
//! transactions to read_committed consumers, so their invisibility is Kafka's part, not shown here.)

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;

use crate::common::*;

/// What a test asks of its mock cluster.
pub enum MockCmd {
    /// The next requests of this kind fail with these errors, in order.
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>),
}

/// Runs a mock cluster on its own thread (it is not Send) until the returned sender is dropped;
/// the sender also carries error injections.
pub fn mock_cluster(topics: Vec<(String, i32)>) -> (String, mpsc::Sender<MockCmd>) {
    let (tx_addr, rx_addr) = mpsc::channel();
    let (tx_cmd, rx_cmd) = mpsc::channel::<MockCmd>();
    std::thread::spawn(move || {
        let cluster = MockCluster::new(1).expect("mock cluster");
        for (t, p) in &topics {
            cluster.create_topic(t, *p, 1).expect("mock topic");
        }
        tx_addr.send(cluster.bootstrap_servers()).unwrap();
        // Until the test drops the sender.
        while let Ok(cmd) = rx_cmd.recv() {
            match cmd {
                MockCmd::RequestErrors(key, errors) => cluster.request_errors(key, &errors),
            }
        }
        drop(cluster);
    });
    (rx_addr.recv().unwrap(), tx_cmd)
}

/// The topology's topics on a mock cluster, `partitions` each.
pub fn mock_topics(topology: &helios::topology::Topology, partitions: i32) -> Vec<(String, i32)> {
    topology
        .planned_topics()
        .into_iter()
        .map(|t| (t.name, partitions))
        .collect()
}

fn spawn_eos(
    bootstrap: &str,
    topology: &helios::topology::Topology,
    schema: &str,
    prefix: &str,
) -> std::process::Child {
    eos_command(bootstrap, topology, schema, prefix)
        .env(
            "HELIOS_TRANSACTIONAL_ID",
            format!("{}eos-test", topology.topic_prefix),
        )
        .spawn()
        .expect("start helios process --exactly-once")
}

/// `helios process` in exactly-once mode (default transactional id unless the caller sets one).
fn eos_command(
    bootstrap: &str,
    topology: &helios::topology::Topology,
    schema: &str,
    prefix: &str,
) -> std::process::Command {
    let mut c = helios_process_command(bootstrap, topology, schema, prefix);
    c.env("HELIOS_EXACTLY_ONCE", "true")
        // The mock cluster does not abort a fenced predecessor's open transaction at once (a real
        // cluster does, in init_transactions): a short timeout bounds how long it blocks readers.
        // A commit waits at most half of it before it is tried again.
        .env("KAFKA_TRANSACTION_TIMEOUT_MS", "10000");
    c
}

fn orders(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("{tag}-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect()
}

/// Every event of `tag` on the OrderPlaced topic (read_committed, at least once here: the mock
/// shows aborted transactions), within `timeout`.
async fn wait_fanned_out(
    bootstrap: &str,
    topology: &helios::topology::Topology,
    tag: &str,
    n: usize,
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let out = read_records(
            bootstrap,
            &topology.event_topic("OrderPlaced"),
            4 * n,
            Duration::from_secs(3),
        )
        .await;
        let ids: HashSet<&str> = out
            .iter()
            .filter_map(|r| r.header("ce_id"))
            .filter(|id| id.starts_with(tag))
            .collect();
        if ids.len() >= n || Instant::now() > deadline {
            return ids.len();
        }
    }
}

/// Runs one exactly-once processor on a mock cluster, injects `errors` into the next `api`
/// requests once the processor made progress, and checks that it recovers by itself: every
/// event stored once, on its topic, and the group's offset at the end. Returns the processor's
/// metrics address (still running) and the child.
async fn recovers_from(api: RDKafkaApiKey, errors: Vec<RDKafkaRespErr>, metric: &str) -> f64 {
    let topology = test_topology();
    let (bootstrap, mock) = mock_cluster(mock_topics(&topology, 1));
    let n = 600;
    produce_direct_to(&bootstrap, &topology, &orders("r", n / 2)).await;
    let (schema, prefix, pool) = scratch_store().await;
    let metrics = free_addr();
    let mut child = eos_command(&bootstrap, &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &metrics)
        .spawn()
        .unwrap();
    let first = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        50,
        Duration::from_secs(90),
    )
    .await;
    assert!(first >= 50, "no progress before the fault ({first})");
    mock.send(MockCmd::RequestErrors(api, errors)).unwrap();
    let tail: Vec<Vec<u8>> = (n / 2..n)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("r-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect();
    produce_direct_to(&bootstrap, &topology, &tail).await;
    let seen = wait_metric(&metrics, metric, 1.0, Duration::from_secs(90)).await;
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        n as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(rows, n as i64, "PostgreSQL: every event exactly once");
    let fanned = wait_fanned_out(&bootstrap, &topology, "r-", n, Duration::from_secs(60)).await;
    assert_eq!(fanned, n, "every event on its topic");
    let committed = wait_metric(
        &metrics,
        "helios_processor_committed_offset",
        n as f64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(committed, n as f64, "the group's offset reaches the end");
    terminate(&mut child, Duration::from_secs(30));
    drop(mock);
    seen
}

#[tokio::test]
async fn exactly_once_a_commit_that_times_out_is_committed_again() {
    // CONCURRENT_TRANSACTIONS is retried inside librdkafka; 40 of them outlast the commit's
    // 5 s wait, which then answers a retriable timeout: the commit is called again (an abort
    // would be refused at that point).
    let retried = recovers_from(
        RDKafkaApiKey::EndTxn,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 40],
        "helios_processor_transaction_retries_total{step=\"commit\"}",
    )
    .await;
    assert!(
        retried >= 1.0,
        "the commit never timed out: the test proves nothing"
    );
}

#[tokio::test]
async fn exactly_once_an_abortable_error_aborts_and_redoes_the_batch() {
    let aborted = recovers_from(
        RDKafkaApiKey::EndTxn,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
        "helios_processor_transaction_retries_total{step=\"abort\"}",
    )
    .await;
    assert!(aborted >= 1.0);
}

#[tokio::test]
async fn exactly_once_a_fenced_producer_is_created_again_and_resumes() {
    let renewed = recovers_from(
        RDKafkaApiKey::EndTxn,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
        "helios_processor_producer_renewals_total",
    )
    .await;
    assert!(renewed >= 1.0);
}

#[tokio::test]
async fn exactly_once_two_instances_on_one_host_with_default_settings_both_make_progress() {
    let topology = test_topology();
    let (bootstrap, mock) = mock_cluster(mock_topics(&topology, 2));
    let n = 800;
    produce_direct_to(&bootstrap, &topology, &orders("two", n)).await;
    let (schema, prefix, pool) = scratch_store().await;
    let (ma, mb) = (free_addr(), free_addr());
    let mut a = eos_command(&bootstrap, &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &ma)
        .spawn()
        .unwrap();
    let mut b = eos_command(&bootstrap, &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &mb)
        .spawn()
        .unwrap();
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        n as i64,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(rows, n as i64);
    let out_a = metric_value(&ma, "helios_processor_events_out_total").await;
    let out_b = metric_value(&mb, "helios_processor_events_out_total").await;
    assert!(
        out_a > 0.0 && out_b > 0.0,
        "both instances made progress: {out_a} / {out_b}"
    );
    for m in [&ma, &mb] {
        assert_eq!(
            metric_value(m, "helios_processor_producer_renewals_total").await,
            0.0,
            "an instance was fenced by the other"
        );
    }
    terminate(&mut a, Duration::from_secs(30));
    terminate(&mut b, Duration::from_secs(30));
    drop(mock);
}

#[tokio::test]
async fn two_instances_under_the_kip848_protocol_split_the_partitions_and_process_everything_once()
{
    let topology = test_topology();
    let (bootstrap, mock) = mock_cluster(mock_topics(&topology, 2));
    let n = 600;
    produce_direct_to(&bootstrap, &topology, &orders("k", n)).await;
    let (schema, prefix, pool) = scratch_store().await;
    let (ma, mb) = (free_addr(), free_addr());
    let spawn = |m: &str| {
        helios_process_command(&bootstrap, &topology, &schema, &prefix)
            .env("KAFKA_GROUP_PROTOCOL", "consumer")
            .env("HELIOS_METRICS_ADDR", m)
            .spawn()
            .unwrap()
    };
    let mut a = spawn(&ma);
    let first = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        50,
        Duration::from_secs(90),
    )
    .await;
    assert!(first >= 50, "no progress under the KIP-848 protocol");
    let mut b = spawn(&mb);
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        n as i64,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(rows, n as i64, "every event exactly once in PostgreSQL");
    let fanned = wait_fanned_out(&bootstrap, &topology, "k-", n, Duration::from_secs(60)).await;
    assert_eq!(fanned, n);
    terminate(&mut a, Duration::from_secs(30));
    terminate(&mut b, Duration::from_secs(30));
    drop(mock);
}

#[tokio::test]
async fn exactly_once_across_a_crash_on_the_mock_cluster() {
    let topology = test_topology();
    let topics: Vec<(String, i32)> = topology
        .planned_topics()
        .into_iter()
        .map(|t| (t.name, 2))
        .collect();
    let (bootstrap, _mock) = mock_cluster(topics);
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
    let (bootstrap, _mock) = mock_cluster(vec![("t".into(), 1)]);
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
