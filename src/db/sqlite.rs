//! The embedded store of `helios demo`: the same `events` table (and generated columns) in a
//! SQLite file, so the same queries work.

use std::time::Duration;

use sqlx::Row;

use super::{foreign_positions, stored_row, EventStore, Lineage, StoreError, StoredRow, Written};
use crate::model::CanonicalEvent;

/// The batch insert into SQLite (after `INSERT OR IGNORE`/`OR REPLACE`): the rows travel as one
/// JSON array bound to `?1`, unpacked by json_each.
macro_rules! sqlite_insert_select {
    () => {
        " INTO events (source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, replay_id)
         SELECT json_extract(value, '$.source'), json_extract(value, '$.event_id'), json_extract(value, '$.event_type'),
                json_extract(value, '$.occurred_at'), json_extract(value, '$.ingested_at'), json_extract(value, '$.data'),
                json_extract(value, '$.metadata'), json_extract(value, '$.raw_topic'), json_extract(value, '$.raw_partition'),
                json_extract(value, '$.raw_offset'), json_extract(value, '$.raw_index'), json_extract(value, '$.replay_id')
         FROM json_each(?1)"
    };
}

/// The embedded store of `helios demo`: the same `events` table (and generated columns) in a
/// SQLite file, so the same queries work.
#[derive(Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "events",
        include_str!("../../migrations/sqlite/0001_events.sql"),
    ),
    (
        2,
        "reconciliation",
        include_str!("../../migrations/sqlite/0002_reconciliation.sql"),
    ),
    (
        3,
        "reconcile_progress",
        include_str!("../../migrations/sqlite/0003_reconcile_progress.sql"),
    ),
    (
        4,
        "reconcile_event_time",
        include_str!("../../migrations/sqlite/0004_reconcile_event_time.sql"),
    ),
    (
        5,
        "reconcile_outbox_through",
        include_str!("../../migrations/sqlite/0005_reconcile_outbox_through.sql"),
    ),
];

impl SqliteStore {
    /// Opens (creating if needed) the SQLite file and applies its migrations.
    pub async fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .map_err(|e| {
                StoreError::transient(format!(
                    "cannot open the SQLite store {}: {e}",
                    path.display()
                ))
            })?;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS helios_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        )
        .execute(&mut *tx)
        .await?;
        let done: Vec<i64> = sqlx::query("SELECT version FROM helios_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect();
        for (version, name, sql) in SQLITE_MIGRATIONS {
            if !done.contains(version) {
                sqlx::raw_sql(*sql).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO helios_migrations (version, name) VALUES (?1, ?2)")
                    .bind(version)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }
}

impl EventStore for SqliteStore {
    async fn write_events(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        if events.is_empty() {
            return Ok(Written::default());
        }
        // One statement per batch: the rows travel as one JSON array, unpacked by json_each.
        let rows: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "source": e.source.as_str(),
                    "event_id": e.event_id,
                    "event_type": e.event_type,
                    "occurred_at": e.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "ingested_at": e.ingested_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    "data": e.data.to_string(),
                    "metadata": serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".into()),
                    "raw_topic": e.raw.topic,
                    "raw_partition": e.raw.partition,
                    "raw_offset": e.raw.offset,
                    "raw_index": e.raw.index,
                    "replay_id": replay_id,
                })
            })
            .collect();
        // OR REPLACE (replay bypass) rewrites the row; OR IGNORE leaves an existing one alone.
        let sql: &'static str = if replay_id.is_some() {
            concat!("INSERT OR REPLACE", sqlite_insert_select!())
        } else {
            concat!("INSERT OR IGNORE", sqlite_insert_select!())
        };
        let r = sqlx::query(sql)
            .bind(serde_json::Value::Array(rows).to_string())
            .execute(&self.pool)
            .await?;
        let rows = r.rows_affected();
        let mut foreign = vec![];
        if replay_id.is_none() && rows < events.len() as u64 {
            let keys: Vec<serde_json::Value> = events
                .iter()
                .map(|e| serde_json::json!([e.source.as_str(), e.event_id]))
                .collect();
            let stored: Lineage = sqlx::query(
                "SELECT e.source, e.event_id, e.raw_topic, e.raw_partition, e.raw_offset, e.raw_index FROM events e JOIN json_each(?1) k
                   ON e.source = json_extract(k.value, '$[0]') AND e.event_id = json_extract(k.value, '$[1]')",
            )
            .bind(serde_json::Value::Array(keys).to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5))))
            .collect();
            foreign = foreign_positions(events, &stored);
        }
        Ok(Written { rows, foreign })
    }

    async fn remove_events(&self, events: &[&CanonicalEvent]) -> Result<u64, StoreError> {
        let mut n = 0;
        for e in events {
            n += sqlx::query(
                "DELETE FROM events WHERE source = ?1 AND event_id = ?2 AND raw_topic = ?3 AND raw_partition = ?4 AND raw_offset = ?5 AND raw_index = ?6",
            )
            .bind(e.source.as_str())
            .bind(&e.event_id)
            .bind(&e.raw.topic)
            .bind(e.raw.partition)
            .bind(e.raw.offset)
            .bind(e.raw.index as i32)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(n)
    }

    async fn existing(
        &self,
        keys: &[(String, String)],
    ) -> Result<std::collections::HashSet<(String, String)>, StoreError> {
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let arr: Vec<serde_json::Value> = keys
            .iter()
            .map(|(s, i)| serde_json::json!([s, i]))
            .collect();
        let rows = sqlx::query(
            "SELECT e.source, e.event_id FROM events e JOIN json_each(?1) k
               ON e.source = json_extract(k.value, '$[0]') AND e.event_id = json_extract(k.value, '$[1]')",
        )
        .bind(serde_json::Value::Array(arr).to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn count_by_type(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT event_type, count(*) FROM events GROUP BY event_type ORDER BY event_type",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn recent(&self, limit: i64) -> Result<Vec<StoredRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT source, event_id, event_type, order_id, customer_id, data FROM events ORDER BY processed_at DESC, event_id LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(stored_row).collect())
    }
}
