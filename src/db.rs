//! PostgreSQL: the connection pool (optionally inside its own schema), the migrations in
//! `migrations/` (embedded in the binary, applied under an advisory lock so several processors
//! can start at once), and the `events` sink.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::model::fault::{classify_sqlstate, Fault};
use crate::model::CanonicalEvent;

/// Embedded migrations: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "events", include_str!("../migrations/0001_events.sql")),
    (
        2,
        "dlq_redrives",
        include_str!("../migrations/0002_dlq_redrives.sql"),
    ),
];

/// The batch insert into PostgreSQL: one row per element of the eleven arrays, plus `$12` as the
/// replay id; the conflict clause is appended per use.
macro_rules! pg_insert_select {
    () => {
        "INSERT INTO events (source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, replay_id)
         SELECT s, i, t, o, g, d::jsonb, m::jsonb, rt, rp, ro, ri, $12
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[], $11::int4[])
           AS u(s, i, t, o, g, d, m, rt, rp, ro, ri)"
    };
}

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

/// A database failure, classified: transient ones retry the batch; ones caused by the data
/// isolate the offending events to the DLQ (see [`crate::model::fault`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub message: String,
    pub fault: Fault,
}

impl StoreError {
    /// A transient failure (connection, configuration) with this message.
    pub fn transient(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            fault: Fault::Transient,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let fault = match &e {
            sqlx::Error::Database(db) => {
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    classify_sqlstate(pg.code())
                } else {
                    // SQLite (the demo's store): constraint violations are the data's fault.
                    use sqlx::error::ErrorKind::*;
                    match db.kind() {
                        UniqueViolation | ForeignKeyViolation | NotNullViolation
                        | CheckViolation => Fault::Data {
                            code: db.code().map(|c| c.to_string()).unwrap_or_default(),
                        },
                        _ => Fault::Transient,
                    }
                }
            }
            sqlx::Error::Encode(_) => Fault::Data {
                code: "encode".into(),
            },
            _ => Fault::Transient,
        };
        StoreError {
            message: format!("PostgreSQL: {e}"),
            fault,
        }
    }
}

fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::transient(format!(
            "schema name `{schema}` must be lower-case letters, digits and `_` (HELIOS_DB_SCHEMA)"
        )))
    }
}

/// Opens a pool; with `schema`, the schema is created if missing and used as `search_path`.
pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgPool, StoreError> {
    let mut opts = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::transient(format!("DATABASE_URL is not a PostgreSQL URL: {e}")))?;
    if let Some(s) = schema {
        check_schema_name(s)?;
        let mut c = sqlx::PgConnection::connect_with(&opts).await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{s}\""
        )))
        .execute(&mut c)
        .await?;
        c.close().await?;
        opts = opts.options([("search_path", s)]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await?)
}

/// Applies the migrations not yet applied; returns the versions it applied.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7246123591)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS helios_migrations (version bigint PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    let done: Vec<i64> = sqlx::query("SELECT version FROM helios_migrations")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.get::<i64, _>(0))
        .collect();
    let mut applied = vec![];
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO helios_migrations (version, name) VALUES ($1, $2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// Where canonical events are stored.
pub trait EventStore: Send + Sync + 'static {
    /// Writes the events in one statement. Without `replay_id`, rows already present are left
    /// alone; with it, they are replaced and marked with it. Returns rows written.
    fn write_events(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts the events in one statement; rows already present are left alone
    /// (idempotent on `(source, event_id)`). Returns how many rows were new.
    fn insert_events(
        &self,
        events: &[CanonicalEvent],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let refs: Vec<&CanonicalEvent> = events.iter().collect();
            self.write_events(&refs, None).await
        }
    }

    /// Inserts or, for rows already present, replaces them with this normalization and marks
    /// them with `replay_id` (replay with dedup bypassed). Returns rows written.
    fn upsert_events(
        &self,
        events: &[CanonicalEvent],
        replay_id: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let refs: Vec<&CanonicalEvent> = events.iter().collect();
            self.write_events(&refs, Some(replay_id)).await
        }
    }

    /// Deletes the rows of these events that *their own* raw record wrote (same lineage), so a
    /// row a sink's refusal left without its fan-out record is taken back. Returns rows deleted.
    fn remove_events(
        &self,
        events: &[&CanonicalEvent],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Which of these `(source, event_id)` keys already have a row.
    fn existing(
        &self,
        keys: &[(String, String)],
    ) -> impl Future<Output = Result<std::collections::HashSet<(String, String)>, StoreError>> + Send;

    /// Row counts by event type.
    fn count_by_type(&self) -> impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send;

    /// The most recently processed rows.
    fn recent(&self, limit: i64)
        -> impl Future<Output = Result<Vec<StoredRow>, StoreError>> + Send;
}

/// A stored row, as read back (demo summary, store tests).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub order_id: Option<String>,
    pub customer_id: Option<String>,
    pub data: String,
}

/// The PostgreSQL `events` table.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        PgStore { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl EventStore for PgStore {
    async fn write_events(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let n = events.len();
        let mut source = Vec::with_capacity(n);
        let mut event_id = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut occurred = Vec::with_capacity(n);
        let mut ingested = Vec::with_capacity(n);
        let mut data = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut topic = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut offset = Vec::with_capacity(n);
        let mut index = Vec::with_capacity(n);
        for e in events {
            source.push(e.source.as_str().to_string());
            event_id.push(e.event_id.clone());
            event_type.push(e.event_type.clone());
            occurred.push(e.occurred_at);
            ingested.push(e.ingested_at);
            data.push(e.data.to_string());
            metadata.push(serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".into()));
            topic.push(e.raw.topic.clone());
            partition.push(e.raw.partition);
            offset.push(e.raw.offset);
            index.push(e.raw.index as i32);
        }
        let sql: &'static str = if replay_id.is_some() {
            concat!(
                pg_insert_select!(),
                " ON CONFLICT (source, event_id) DO UPDATE SET event_type = EXCLUDED.event_type,
                  occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data, metadata = EXCLUDED.metadata,
                  raw_topic = EXCLUDED.raw_topic, raw_partition = EXCLUDED.raw_partition,
                  raw_offset = EXCLUDED.raw_offset, raw_index = EXCLUDED.raw_index,
                  replay_id = EXCLUDED.replay_id, processed_at = now()"
            )
        } else {
            concat!(
                pg_insert_select!(),
                " ON CONFLICT (source, event_id) DO NOTHING"
            )
        };
        let r = sqlx::query(sql)
            .bind(source)
            .bind(event_id)
            .bind(event_type)
            .bind(occurred)
            .bind(ingested)
            .bind(data)
            .bind(metadata)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .bind(index)
            .bind(replay_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn remove_events(&self, events: &[&CanonicalEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let source: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let id: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        let topic: Vec<&str> = events.iter().map(|e| e.raw.topic.as_str()).collect();
        let partition: Vec<i32> = events.iter().map(|e| e.raw.partition).collect();
        let offset: Vec<i64> = events.iter().map(|e| e.raw.offset).collect();
        let index: Vec<i32> = events.iter().map(|e| e.raw.index as i32).collect();
        let r = sqlx::query(
            "DELETE FROM events e USING UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int4[])
               AS k(s, i, rt, rp, ro, ri)
             WHERE e.source = k.s AND e.event_id = k.i AND e.raw_topic = k.rt
               AND e.raw_partition = k.rp AND e.raw_offset = k.ro AND e.raw_index = k.ri",
        )
        .bind(source)
        .bind(id)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .bind(index)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    async fn existing(
        &self,
        keys: &[(String, String)],
    ) -> Result<std::collections::HashSet<(String, String)>, StoreError> {
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let (s, i): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
        let rows = sqlx::query(
            "SELECT e.source, e.event_id FROM events e JOIN UNNEST($1::text[], $2::text[]) AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
        )
        .bind(s)
        .bind(i)
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
            "SELECT source, event_id, event_type, order_id, customer_id, data::text FROM events ORDER BY processed_at DESC, event_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(stored_row).collect())
    }
}

fn stored_row<R: Row>(r: &R) -> StoredRow
where
    usize: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    StoredRow {
        source: r.get(0),
        event_id: r.get(1),
        event_type: r.get(2),
        order_id: r.get(3),
        customer_id: r.get(4),
        data: r.get(5),
    }
}

/// The embedded store of `helios demo`: the same `events` table (and generated columns) in a
/// SQLite file, so the same queries work.
#[derive(Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
}

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "events",
    include_str!("../migrations/sqlite/0001_events.sql"),
)];

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
    ) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
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
        Ok(r.rows_affected())
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
