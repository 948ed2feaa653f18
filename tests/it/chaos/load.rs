//! The scenario's load: orders of three `OrderPlaced` events each (sequence 1, 2, 3 in the
//! payload), each order pushed through one of the four sources (EventBridge, Pub/Sub push,
//! Event Grid, direct ingest) one event after the other, by a client that retries like the
//! clouds do: a connection error, a 5xx or a 429 is sent again after a backoff, until the
//! ingress acknowledges it (2xx) or the load's deadline passes. The ledger records what was
//! acknowledged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use super::Rng;

/// A source the load pushes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    EventBridge,
    PubSub,
    EventGrid,
    Direct,
}

impl Via {
    const ALL: [Via; 4] = [Via::EventBridge, Via::PubSub, Via::EventGrid, Via::Direct];

    /// The `source` column HELIOS gives its events.
    pub fn source(self) -> &'static str {
        match self {
            Via::EventBridge => "aws",
            Via::PubSub => "gcp",
            Via::EventGrid => "azure",
            Via::Direct => "direct",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Via::EventBridge => "/api/v1/webhooks/aws/eventbridge",
            Via::PubSub => "/api/v1/webhooks/gcp/pubsub",
            Via::EventGrid => "/api/v1/webhooks/azure/eventgrid",
            Via::Direct => "/api/v1/events/ingest",
        }
    }

    /// The push body of event `id` (the event id HELIOS will see) of `order`, step `seq`.
    fn body(
        self,
        id: &str,
        order: &str,
        seq: u32,
    ) -> (Vec<u8>, Option<(&'static str, &'static str)>) {
        let data = json!({"order_id": order, "customer_id": "C-chaos", "seq": seq});
        let now = chrono::Utc::now().to_rfc3339();
        match self {
            Via::EventBridge => (
                json!({"version": "0", "id": id, "detail-type": "OrderPlaced", "source": "chaos",
                    "account": "111122223333", "time": now, "region": "eu-west-1", "resources": [],
                    "detail": data})
                .to_string()
                .into_bytes(),
                None,
            ),
            Via::PubSub => (
                json!({"message": {"data": base64::engine::general_purpose::STANDARD.encode(data.to_string()),
                    "attributes": {"eventType": "OrderPlaced"}, "messageId": id, "publishTime": now},
                    "subscription": "projects/chaos/subscriptions/orders"})
                .to_string()
                .into_bytes(),
                None,
            ),
            Via::EventGrid => (
                json!([{"id": id, "eventType": "OrderPlaced", "subject": "orders", "eventTime": now,
                    "data": data, "dataVersion": "1", "topic": "/chaos"}])
                .to_string()
                .into_bytes(),
                Some(("aeg-event-type", "Notification")),
            ),
            Via::Direct => (
                json!({"event_type": "OrderPlaced", "event_id": id, "occurred_at": now, "data": data})
                    .to_string()
                    .into_bytes(),
                None,
            ),
        }
    }
}

/// One event of the load.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Attempts made.
    pub attempts: u32,
    /// The ingress answered 2xx.
    pub acked: bool,
}

/// Every event of the load, by (source, event id).
#[derive(Default)]
pub struct Ledger {
    pub events: BTreeMap<(String, String), Sent>,
}

impl Ledger {
    pub fn acked(&self) -> impl Iterator<Item = (&(String, String), &Sent)> {
        self.events.iter().filter(|(_, s)| s.acked)
    }
}

/// Pushes orders at about `rate` events a second with `concurrency` orders in flight, until
/// `stop_at`; every event is retried until acknowledged or `give_up_at`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    base: String,
    tag: String,
    mut rng: Rng,
    rate: f64,
    concurrency: usize,
    stop_at: Instant,
    give_up_at: Instant,
    ledger: Arc<Mutex<Ledger>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(6))
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let per_order = Duration::from_secs_f64(3.0 / rate);
    let mut next = Instant::now();
    let mut n = 0u64;
    while Instant::now() < stop_at {
        let permit = permits.clone().acquire_owned().await.unwrap();
        n += 1;
        let via = Via::ALL[rng.below(4) as usize];
        let order = format!("{tag}-O{n}");
        let (client, base, ledger) = (client.clone(), base.clone(), ledger.clone());
        tasks.spawn(async move {
            let _permit = permit;
            for seq in 1..=3 {
                let id = format!("{order}-{seq}");
                let acked = push(&client, &base, via, &id, &order, seq, give_up_at, &ledger).await;
                if !acked {
                    // The cloud gave up on this event; the order's later steps stay unsent.
                    break;
                }
            }
        });
        next += per_order;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// One event, retried like a cloud until a 2xx or `give_up_at`. True when acknowledged.
#[allow(clippy::too_many_arguments)]
async fn push(
    client: &reqwest::Client,
    base: &str,
    via: Via,
    id: &str,
    order: &str,
    seq: u32,
    give_up_at: Instant,
    ledger: &Mutex<Ledger>,
) -> bool {
    let key = (via.source().to_string(), id.to_string());
    ledger.lock().unwrap().events.insert(
        key.clone(),
        Sent {
            attempts: 0,
            acked: false,
        },
    );
    let (body, header) = via.body(id, order, seq);
    let mut wait = Duration::from_millis(100);
    loop {
        let mut req = client
            .post(format!("{base}{}", via.path()))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let status = req.send().await.map(|r| r.status().as_u16());
        let acked = matches!(status, Ok(200..=299));
        {
            let mut l = ledger.lock().unwrap();
            let s = l.events.get_mut(&key).expect("recorded");
            s.attempts += 1;
            s.acked = acked;
        }
        match status {
            _ if acked => return true,
            // What every cloud retries: no answer, 5xx, 429.
            Err(_) | Ok(429) | Ok(500..=599) => {}
            Ok(other) => panic!("the ingress answered {other} to a valid {via:?} push: only 2xx, 429 or 5xx are allowed"),
        }
        if Instant::now() + wait > give_up_at {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}
