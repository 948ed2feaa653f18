//! `helios demo`: the whole pipeline in one process on embedded defaults — librdkafka's mock
//! cluster as the Kafka-protocol broker (reachable by any Kafka client on its printed address),
//! the in-memory dedup store, and a SQLite file with the same `events` table — wired exactly as
//! in production: the same ingress, the same processor, other implementations of the same
//! `DedupStore` and `EventStore` interfaces.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use crate::config::KafkaSettings;
use crate::db::{EventStore, SqliteStore};
use crate::ingress::IngressConfig;
use crate::pipeline::dedup::MemoryDedup;
use crate::pipeline::processor::{Processor, ProcessorConfig};
use crate::reconcile::{ReconStore, Reconciler, ReconcilerConfig};
use crate::shutdown::Shutdown;
use crate::topology::Topology;

/// `helios demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Push sample events in each cloud's real push format through HTTP, then print what happened.
    #[arg(long)]
    pub send_samples: bool,
    /// Exit after the summary (status 0 when everything arrived as expected).
    #[arg(long)]
    pub once: bool,
    /// Ingress port (0 = any free port).
    #[arg(long, env = "API_PORT", default_value_t = 8000)]
    pub port: u16,
    /// The SQLite file of the embedded store.
    #[arg(long, env = "HELIOS_DEMO_STORE", default_value = "helios-demo.db")]
    pub store: PathBuf,
    /// Topology file; the built-in one (same as the repository's topology.yaml) when absent.
    #[arg(long, env = "HELIOS_TOPOLOGY")]
    pub topology: Option<PathBuf>,
}

/// Runs librdkafka's mock cluster on a thread of its own (it is not `Send`) with the
/// topology's topics; returns its bootstrap address and a guard that stops it when dropped.
///
/// Raw topics get one partition here: the demo's one processor gains nothing from more, and
/// with one the samples land at the same offsets on every run, so a run on an existing store
/// file is the same raw records processed again (rows kept, fanned out again), not duplicates of
/// the last run's (the store tells events apart by the raw record that wrote them).
pub fn start_mock_cluster(topology: &Topology) -> anyhow::Result<(String, mpsc::Sender<()>)> {
    let topics: Vec<(String, i32)> = topology
        .planned_topics()
        .into_iter()
        .map(|t| {
            let partitions = if t.role.starts_with("raw") {
                1
            } else {
                t.partitions
            };
            (t.name, partitions)
        })
        .collect();
    let (tx_addr, rx_addr) = mpsc::channel::<Result<String, String>>();
    let (tx_stop, rx_stop) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("mock-kafka".into())
        .spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx_addr.send(Err(e.to_string()));
                    return;
                }
            };
            for (t, p) in &topics {
                if let Err(e) = cluster.create_topic(t, *p, 1) {
                    let _ = tx_addr.send(Err(format!("creating {t}: {e}")));
                    return;
                }
            }
            let _ = tx_addr.send(Ok(cluster.bootstrap_servers()));
            let _ = rx_stop.recv();
        })?;
    let addr = rx_addr
        .recv()?
        .map_err(|e| anyhow::anyhow!("cannot start the embedded Kafka cluster: {e}"))?;
    Ok((addr, tx_stop))
}

/// One sample push: what it is, where it goes, its headers and body.
pub struct Sample {
    pub what: &'static str,
    pub method: reqwest::Method,
    pub path: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

fn post(
    what: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
) -> Sample {
    Sample {
        what,
        method: reqwest::Method::POST,
        path,
        headers,
        body: body.into_bytes(),
    }
}

/// The samples: each cloud's real push format, a duplicate, an invalid event, every handshake.
pub fn samples() -> Vec<Sample> {
    let eb = json!({"version": "0", "id": "0d1c7b9e-2f4a-4a53-9d51-7d3c2a6f1b01", "detail-type": "OrderPlaced",
        "source": "com.example.orders", "account": "111122223333", "time": "2026-11-22T09:15:02Z", "region": "eu-west-1",
        "resources": [], "detail": {"order_id": "O-1001", "customer_id": "C-42", "amount": 129.5, "currency": "EUR"}})
    .to_string();
    let eb_payment = json!({"version": "0", "id": "5f0c4a8e-8d1b-4e8e-9a57-2b1c4c1e9a02", "detail-type": "PaymentProcessed",
        "source": "com.example.payments", "account": "111122223333", "time": "2026-11-22T09:17:09Z", "region": "eu-west-1",
        "resources": [], "detail": {"order_id": "O-3003", "amount": 18.0, "currency": "EUR", "status": "captured"}})
    .to_string();
    let sns = json!({"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:eu-west-1:111122223333:payments", "Message": eb_payment,
        "Timestamp": "2026-11-22T09:17:10.000Z", "SignatureVersion": "2", "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-demo.pem"});
    let sns_confirm = json!({"Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37f", "TopicArn": "arn:aws:sns:eu-west-1:111122223333:payments",
        "Message": "You have chosen to subscribe to the topic arn:aws:sns:eu-west-1:111122223333:payments.",
        "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336412f37f",
        "Timestamp": "2026-11-22T09:00:00.000Z", "SignatureVersion": "1", "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-demo.pem"});
    let inventory = base64::engine::general_purpose::STANDARD.encode(
        json!({"order_id": "O-1001", "sku": "SKU-1", "quantity": 2, "warehouse": "AMS-1"})
            .to_string(),
    );
    let pubsub = json!({"message": {"data": inventory, "attributes": {"eventType": "InventoryReserved"},
        "messageId": "2070443601311540", "message_id": "2070443601311540",
        "publishTime": "2026-11-22T09:15:12.749Z", "publish_time": "2026-11-22T09:15:12.749Z"},
        "subscription": "projects/demo/subscriptions/helios-push"});
    let eventgrid = json!([{"id": "831e1650-001e-001b-66ab-eeb76e069631",
        "topic": "/subscriptions/demo/resourceGroups/shop/providers/Microsoft.EventGrid/topics/orders",
        "subject": "orders/O-2002", "eventType": "Contoso.Orders.OrderPlaced", "eventTime": "2026-11-22T09:16:00.9584103Z",
        "data": {"orderId": "O-2002", "customerId": "C-7", "amount": 42.0}, "dataVersion": "1", "metadataVersion": "1"}]);
    let cloudevent = json!({"specversion": "1.0", "type": "Contoso.Orders.PaymentProcessed", "source": "/contoso/payments",
        "id": "A234-1234-1234", "time": "2026-11-22T09:15:09Z", "datacontenttype": "application/json",
        "data": {"order_id": "O-1001", "amount": 129.0, "currency": "EUR"}});
    let invalid = json!({"event_type": "OrderPlaced", "event_id": "direct-bad-1", "data": {"order_id": "O-3003"}});
    let json_ct = (
        "content-type",
        "application/json; charset=utf-8".to_string(),
    );
    vec![
        post(
            "EventBridge OrderPlaced (O-1001)",
            "/api/v1/webhooks/aws/eventbridge",
            vec![json_ct.clone()],
            eb.clone(),
        ),
        post(
            "EventBridge OrderPlaced again (a retry: duplicate)",
            "/api/v1/webhooks/aws/eventbridge",
            vec![json_ct.clone()],
            eb,
        ),
        post(
            "SNS SubscriptionConfirmation (handshake)",
            "/api/v1/webhooks/aws/sns",
            vec![
                ("content-type", "text/plain; charset=UTF-8".into()),
                ("x-amz-sns-message-type", "SubscriptionConfirmation".into()),
            ],
            sns_confirm.to_string(),
        ),
        post(
            "SNS Notification carrying an EventBridge PaymentProcessed (O-3003)",
            "/api/v1/webhooks/aws/sns",
            vec![
                ("content-type", "text/plain; charset=UTF-8".into()),
                ("x-amz-sns-message-type", "Notification".into()),
                (
                    "x-amz-sns-message-id",
                    "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324".into(),
                ),
            ],
            sns.to_string(),
        ),
        post(
            "Pub/Sub push (wrapped) InventoryReserved (O-1001)",
            "/api/v1/webhooks/gcp/pubsub",
            vec![json_ct.clone()],
            pubsub.to_string(),
        ),
        post(
            "Event Grid SubscriptionValidationEvent (handshake)",
            "/api/v1/webhooks/azure/eventgrid",
            vec![
                json_ct.clone(),
                ("aeg-event-type", "SubscriptionValidation".into()),
            ],
            String::from_utf8_lossy(include_bytes!("../samples/azure-eventgrid-validation.json"))
                .into_owned(),
        ),
        Sample {
            what: "CloudEvents webhook validation OPTIONS (handshake)",
            method: reqwest::Method::OPTIONS,
            path: "/api/v1/webhooks/azure/eventgrid",
            headers: vec![("webhook-request-origin", "eventgrid.azure.net".into())],
            body: vec![],
        },
        post(
            "Event Grid schema Contoso.Orders.OrderPlaced (O-2002; its payment never comes)",
            "/api/v1/webhooks/azure/eventgrid",
            vec![json_ct.clone(), ("aeg-event-type", "Notification".into())],
            eventgrid.to_string(),
        ),
        post(
            "CloudEvents Contoso.Orders.PaymentProcessed (O-1001; captures 129.0 of 129.5: a mismatch)",
            "/api/v1/webhooks/azure/eventgrid",
            vec![(
                "content-type",
                "application/cloudevents+json; charset=utf-8".into(),
            )],
            cloudevent.to_string(),
        ),
        post(
            "Direct OrderPlaced O-3003 without customer_id (invalid: DLQ)",
            "/api/v1/events/ingest",
            vec![json_ct],
            invalid.to_string(),
        ),
    ]
}

/// What the samples must produce.
pub struct Expected {
    pub by_type: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub dlq: u64,
    pub handshakes: u64,
}

pub fn expected() -> Expected {
    Expected {
        by_type: [
            ("InventoryReserved", 1),
            ("OrderPlaced", 2),
            ("PaymentProcessed", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        duplicates: 1,
        dlq: 1,
        handshakes: 3,
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let topology = match &args.topology {
        Some(p) => Topology::load(p)?,
        None => demo_topology(),
    };
    let (bootstrap, _cluster_guard) = start_mock_cluster(&topology)?;
    let store = SqliteStore::open(&args.store).await?;
    let dedup = MemoryDedup::new(Duration::from_secs(24 * 3600));

    let signals = (!args.once).then(Shutdown::on_signals);
    let (stop, local) = Shutdown::new();
    let kafka = KafkaSettings::new(bootstrap.clone());
    let mut cfg = IngressConfig::new(kafka.clone(), topology.clone());
    cfg.host = "127.0.0.1".into();
    cfg.port = args.port;
    // Demo only: the samples are not signed by AWS, and SubscribeURL points at the real SNS.
    cfg.sns.verify_signatures = false;
    cfg.sns.auto_confirm = false;
    let ingress = crate::ingress::start(cfg, local.clone()).await?;
    let processor = Processor::new(
        {
            let mut c = ProcessorConfig::new(kafka, topology.clone());
            c.batch.records = 200;
            c
        },
        dedup,
        store.clone(),
    )?;
    let stats = processor.stats();
    let proc_task = tokio::spawn(processor.run(local.clone()));
    let reconciling = !topology.flows.is_empty();
    let rec_task = if reconciling {
        let r = Reconciler::new(
            ReconcilerConfig {
                kafka: KafkaSettings::new(bootstrap.clone()),
                group: topology.reconciler_group.clone(),
                topology: topology.clone(),
                batch_size: 200,
                // The samples' event times are days old: an idle partition advances on wall-clock
                // time at once, so the demo reports its missing step within seconds.
                idle_after: Duration::from_secs(2),
                state_retention: Duration::from_secs(8 * 86_400),
                rejoin_after: crate::reconcile::DEFAULT_REJOIN_AFTER,
                backlog_every: crate::reconcile::DEFAULT_BACKLOG_EVERY,
            },
            ReconStore::Sqlite(store.pool().clone()),
        )?;
        Some(tokio::spawn(r.run(local.clone())))
    } else {
        None
    };

    let base = format!("http://{}", ingress.addr);
    let store_path = std::fs::canonicalize(&args.store).unwrap_or(args.store.clone());
    println!("HELIOS demo — everything in this process, no external services");
    println!("  ingress      {base}   (API docs {base}/docs, metrics {base}/metrics)");
    println!(
        "  kafka        {bootstrap}   (librdkafka mock cluster; any Kafka client can read it)"
    );
    println!(
        "  store        {}   (SQLite, same `events` table as PostgreSQL)",
        store_path.display()
    );
    println!("  try          curl -H 'content-type: application/json' --data-binary @samples/aws-eventbridge-order.json {base}/api/v1/webhooks/aws/eventbridge");
    println!(
        "               sqlite3 {} 'select event_type, order_id, customer_id from events'",
        store_path.display()
    );

    let mut ok = true;
    if args.send_samples {
        ok = send_and_report(&base, &stats, &store).await?;
        if reconciling {
            ok &= report_reconciliation(&store, &topology).await?;
        }
    }
    if let Some(signals) = signals {
        println!("\nRunning; Ctrl-C stops. Arrivals (e.g. from `helios publish --cloud all`):");
        let feed = tokio::spawn(live_feed(stats.clone(), store.clone()));
        signals.wait().await;
        feed.abort();
    }
    stop.trigger();
    ingress.wait().await?;
    proc_task.await??;
    if let Some(t) = rec_task {
        t.await??;
    }
    // Every client is gone by now (the ingress's broker probe stops at shutdown), before the
    // embedded cluster goes: no "all brokers down" lines at the end.
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The built-in topology with the flow's deadlines cut to seconds, so a missing step shows up
/// while someone watches (`helios publish` events carry the current time).
fn demo_topology() -> Topology {
    let mut t = Topology::builtin();
    if let Some(f) = t.flows.get_mut("order_lifecycle") {
        if let Ok(short) = serde_norway::from_str(
            "steps: [OrderPlaced, {PaymentProcessed: {within: 10s}}, {InventoryReserved: {within: 20s}}]\nmatch: [amount]\nallowed_lateness: 2s",
        ) {
            *f = short;
        }
    }
    t
}

/// The outcomes the samples must produce: (key, outcome, step).
const EXPECTED_OUTCOMES: [(&str, &str, &str); 5] = [
    ("O-1001", "completed", ""),
    ("O-1001", "mismatch", "PaymentProcessed"),
    ("O-2002", "missing", "PaymentProcessed"),
    ("O-2002", "missing", "InventoryReserved"),
    ("O-3003", "orphan", "OrderPlaced"),
];

/// Waits for the samples' reconciliation outcomes and prints every outcome stored.
async fn report_reconciliation(store: &SqliteStore, topology: &Topology) -> anyhow::Result<bool> {
    let read = || async {
        sqlx::query_as::<_, (String, String, String, String, Option<i64>, String)>(
            "SELECT flow, flow_key, outcome, step, duration_ms, detail FROM reconciliation_results ORDER BY flow_key, id",
        )
        .fetch_all(store.pool())
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = read().await?;
        let all = EXPECTED_OUTCOMES
            .iter()
            .all(|(k, o, st)| rows.iter().any(|r| r.1 == *k && r.2 == *o && r.3 == *st));
        if all || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(f) = topology.flows().ok().and_then(|f| f.into_iter().next()) {
        println!("\nReconciliation (flow {}: {}):", f.name, f.describe());
    }
    for (flow, key, outcome, step, duration, detail) in &rows {
        let detail: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
        let what = match outcome.as_str() {
            "completed" => {
                let clouds: Vec<String> = detail["steps"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| s["source"].as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "{} in {:.1}s",
                    clouds.join(" → "),
                    duration.unwrap_or(0) as f64 / 1000.0
                )
            }
            "missing" => format!("{step} never came"),
            "orphan" => format!("{step} never came (its steps arrived without it)"),
            "mismatch" => format!(
                "{}: {} says {}, {} says {}",
                detail["field"].as_str().unwrap_or(""),
                detail["expected"]["step"].as_str().unwrap_or(""),
                detail["expected"]["value"],
                detail["found"]["step"].as_str().unwrap_or(""),
                detail["found"]["value"]
            ),
            _ => step.clone(),
        };
        println!("  {outcome:<15} {key:<8} {what}   [{flow}]");
    }
    let ok = EXPECTED_OUTCOMES
        .iter()
        .all(|(k, o, st)| rows.iter().any(|r| r.1 == *k && r.2 == *o && r.3 == *st));
    if !ok {
        println!("MISMATCH: expected {EXPECTED_OUTCOMES:?}");
    }
    Ok(ok)
}

/// Prints what the processor did since the last look: each stored event, and counts of
/// duplicates and DLQ'd records, so a user watching the demo sees pushes arrive.
async fn live_feed(
    stats: std::sync::Arc<crate::pipeline::stats::ProcessorStats>,
    store: SqliteStore,
) {
    let (_, _, mut out, mut dups, mut dlq) = stats.snapshot();
    let last_outcome = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(max(id), 0) FROM reconciliation_results")
            .fetch_one(store.pool())
            .await
            .unwrap_or(0)
    };
    let mut seen_outcome = last_outcome().await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rows = sqlx::query_as::<_, (i64, String, String, String)>(
            "SELECT id, flow_key, outcome, step FROM reconciliation_results WHERE id > ?1 ORDER BY id LIMIT 20",
        )
        .bind(seen_outcome)
        .fetch_all(store.pool())
        .await
        .unwrap_or_default();
        for (id, key, outcome, step) in rows {
            println!("  ~ reconciled {outcome:<15} order={key:<10} {step}");
            seen_outcome = id;
        }
        let (_, _, o, d, q) = stats.snapshot();
        if o > out {
            let new = (o - out) as i64;
            let rows = store.recent(new.min(20)).await.unwrap_or_default();
            if new > 20 {
                println!("  + {} events stored (the latest 20 below)", new);
            }
            for r in rows.iter().rev() {
                println!(
                    "  + stored     {:<6} {:<18} order={:<10} id={}",
                    r.source,
                    r.event_type,
                    r.order_id.as_deref().unwrap_or("-"),
                    r.event_id
                );
            }
        }
        if d > dups {
            println!(
                "  = duplicate  {} event(s) seen before: not stored again",
                d - dups
            );
        }
        if q > dlq {
            println!(
                "  ! DLQ        {} record(s) sent to the dead-letter topic (`helios dlq list`)",
                q - dlq
            );
        }
        (out, dups, dlq) = (o, d, q);
    }
}

async fn send_and_report(
    base: &str,
    stats: &crate::pipeline::stats::ProcessorStats,
    store: &SqliteStore,
) -> anyhow::Result<bool> {
    let client = reqwest::Client::new();
    println!("\nSending samples:");
    let samples = samples();
    for s in &samples {
        let mut req = client
            .request(s.method.clone(), format!("{base}{}", s.path))
            .body(s.body.clone());
        for (k, v) in &s.headers {
            req = req.header(*k, v);
        }
        let status = req.send().await?.status();
        println!("  {:<3} {}", status.as_u16(), s.what);
    }
    let exp = expected();
    let want_units: u64 = exp.by_type.values().sum::<u64>() + exp.duplicates + exp.dlq;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (stats.units_in.load(Ordering::Relaxed) < want_units
        || stats.handshakes.load(Ordering::Relaxed) < exp.handshakes)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (raw, units, out, dups, dlq) = stats.snapshot();
    let handshakes = stats.handshakes.load(Ordering::Relaxed);
    let rows = store.count_by_type().await?;
    println!("\nWhat happened ({raw} raw records, {units} events in = {out} out + {dups} duplicates + {dlq} DLQ; {handshakes} handshakes skipped):");
    let stored: BTreeMap<String, i64> = rows.into_iter().collect();
    for (t, n) in &exp.by_type {
        println!(
            "  {:<20} {} stored (expected {n})",
            t,
            stored.get(t).copied().unwrap_or(0)
        );
    }
    println!(
        "  duplicates           {dups} (expected {})",
        exp.duplicates
    );
    println!(
        "  DLQ                  {dlq} (expected {}: missing_required_field)",
        exp.dlq
    );
    println!("\nA few stored rows:");
    for r in store.recent(5).await? {
        println!(
            "  {:<7} {:<28} {:<18} order={:<8} customer={}",
            r.source,
            r.event_id.chars().take(28).collect::<String>(),
            r.event_type,
            r.order_id.as_deref().unwrap_or("-"),
            r.customer_id.as_deref().unwrap_or("-")
        );
    }
    let stored_ok = exp
        .by_type
        .iter()
        .all(|(t, n)| stored.get(t).copied().unwrap_or(0) == *n as i64);
    let ok = stored_ok
        && out == exp.by_type.values().sum::<u64>()
        && dups == exp.duplicates
        && dlq == exp.dlq
        && handshakes == exp.handshakes;
    println!(
        "\n{}",
        if ok {
            "Everything arrived as expected."
        } else {
            "MISMATCH: see the counts above."
        }
    );
    Ok(ok)
}
