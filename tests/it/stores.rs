//! One suite for each interface, run against every implementation: the SQLite and PostgreSQL
//! event stores, the in-memory and Redis dedup stores.

use std::time::Duration;

use chrono::TimeZone;
use helios::db::{EventStore, PgStore, SqliteStore};
use helios::model::event::{CanonicalEvent, RawRef};
use helios::pipeline::dedup::{Claim, DedupKey, DedupStore, MarkOwner, MemoryDedup, RedisDedup};
use helios::source::Source;

use crate::common::*;

fn event(id: &str, t: &str, data: serde_json::Value, index: u32) -> CanonicalEvent {
    CanonicalEvent {
        event_id: id.into(),
        event_type: t.into(),
        source: Source::Aws,
        occurred_at: chrono::Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap(),
        ingested_at: chrono::Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 1).unwrap(),
        order_id: helios::model::event::id_field(&data, "order_id", "orderId"),
        customer_id: helios::model::event::id_field(&data, "customer_id", "customerId"),
        data,
        metadata: [("aws_region".to_string(), "eu-west-1".to_string())].into(),
        raw: RawRef {
            topic: "helios.raw.aws".into(),
            partition: 1,
            offset: 7,
            index,
        },
    }
}

async fn store_suite<S: EventStore>(store: S) {
    let batch = vec![
        event(
            "s-1",
            "OrderPlaced",
            serde_json::json!({"order_id": "O-1", "customer_id": "C-1"}),
            0,
        ),
        event(
            "s-2",
            "OrderPlaced",
            serde_json::json!({"orderId": "O-2", "customerId": "C-2"}),
            1,
        ),
        event(
            "s-3",
            "PaymentProcessed",
            serde_json::json!({"order_id": "O-1", "amount": 3.5}),
            2,
        ),
    ];
    assert_eq!(store.insert_events(&batch).await.unwrap(), 3);
    // Idempotent on (source, event_id): a replayed batch inserts nothing.
    assert_eq!(store.insert_events(&batch).await.unwrap(), 0);
    assert_eq!(store.insert_events(&batch[1..2]).await.unwrap(), 0);
    assert_eq!(store.insert_events(&[]).await.unwrap(), 0);
    assert_eq!(
        store.count_by_type().await.unwrap(),
        vec![
            ("OrderPlaced".to_string(), 2),
            ("PaymentProcessed".to_string(), 1)
        ]
    );
    let mut rows = store.recent(10).await.unwrap();
    rows.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(rows.len(), 3);
    // Generated columns: both spellings.
    assert_eq!(
        (rows[0].order_id.as_deref(), rows[0].customer_id.as_deref()),
        (Some("O-1"), Some("C-1"))
    );
    assert_eq!(
        (rows[1].order_id.as_deref(), rows[1].customer_id.as_deref()),
        (Some("O-2"), Some("C-2"))
    );
    assert_eq!(
        (rows[2].order_id.as_deref(), rows[2].customer_id.as_deref()),
        (Some("O-1"), None)
    );
    let data: serde_json::Value = serde_json::from_str(&rows[2].data).unwrap();
    assert_eq!(data["amount"], 3.5);
    assert_eq!(rows[0].source, "aws");
}

#[tokio::test]
async fn postgres_store_passes_the_store_suite() {
    let pool = helios::db::connect(&database_url(), Some(&unique_schema()))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    // Migrations are idempotent.
    assert!(helios::db::migrate(&pool).await.unwrap().is_empty());
    store_suite(PgStore::new(pool)).await;
}

#[tokio::test]
async fn sqlite_store_passes_the_store_suite() {
    let path = std::env::temp_dir().join(format!("helios-store-{}.db", uuid::Uuid::new_v4()));
    store_suite(SqliteStore::open(&path).await.unwrap()).await;
    // Reopening the same file works (migrations not applied twice).
    let again = SqliteStore::open(&path).await.unwrap();
    assert_eq!(again.count_by_type().await.unwrap().len(), 2);
    let _ = std::fs::remove_file(&path);
}

fn mark(key: &str, owner: &str) -> (DedupKey, MarkOwner) {
    (DedupKey(key.into()), MarkOwner(owner.into()))
}

async fn dedup_suite<D: DedupStore>(d: D, ttl: Duration) {
    let a = mark("aws:e-1", "raw/0/1/0");
    let b = mark("aws:e-2", "raw/0/2/0");
    assert_eq!(
        d.claim(&[a.clone(), b.clone()]).await.unwrap(),
        vec![Claim::New, Claim::New]
    );
    // The same raw record again (a crash before commit): its own mark, processed again.
    assert_eq!(
        d.claim(std::slice::from_ref(&a)).await.unwrap(),
        vec![Claim::Own]
    );
    // Another raw record with the same event: a duplicate, naming the owner.
    let dup = mark("aws:e-1", "raw/1/9/0");
    assert_eq!(
        d.claim(std::slice::from_ref(&dup)).await.unwrap(),
        vec![Claim::Duplicate {
            owner: "raw/0/1/0".into()
        }]
    );
    assert_eq!(d.claim(&[]).await.unwrap(), vec![]);
    // Releasing is compare-and-delete: another record's release leaves the mark alone...
    d.release(std::slice::from_ref(&dup)).await.unwrap();
    assert_eq!(
        d.peek(std::slice::from_ref(&a.0)).await.unwrap(),
        vec![Some("raw/0/1/0".to_string())]
    );
    // ...the owner's release removes it, so the next sighting is new.
    d.release(std::slice::from_ref(&b)).await.unwrap();
    assert_eq!(
        d.claim(&[mark("aws:e-2", "raw/3/3/0")]).await.unwrap(),
        vec![Claim::New]
    );
    // Marks expire after the TTL.
    tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
    let late = mark("aws:e-1", "raw/2/5/0");
    assert_eq!(d.claim(&[late]).await.unwrap(), vec![Claim::New]);
}

#[tokio::test]
async fn memory_dedup_passes_the_dedup_suite() {
    dedup_suite(
        MemoryDedup::new(Duration::from_secs(1)),
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test]
async fn redis_dedup_passes_the_dedup_suite() {
    let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let d = RedisDedup::connect(&redis_url(), &prefix, Duration::from_secs(1))
        .await
        .unwrap();
    dedup_suite(d, Duration::from_secs(1)).await;
}
