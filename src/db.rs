//! PostgreSQL: the connection pool (optionally inside its own schema), the migrations in
//! `migrations/` (embedded in the binary, applied under an advisory lock so several processors
//! can start at once), and the `events` sink.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::pipeline::event::CanonicalEvent;

/// Embedded migrations: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "events", include_str!("../migrations/0001_events.sql"))];

/// A database failure; the batch is retried, never dropped.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL: {0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
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
        Err(StoreError(format!(
            "schema name `{schema}` must be lower-case letters, digits and `_` (HELIOS_DB_SCHEMA)"
        )))
    }
}

/// Opens a pool; with `schema`, the schema is created if missing and used as `search_path`.
pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgPool, StoreError> {
    let mut opts = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError(format!("DATABASE_URL is not a PostgreSQL URL: {e}")))?;
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
    /// Inserts the events in one statement; rows already present are left alone
    /// (idempotent on `(source, event_id)`). Returns how many rows were new.
    fn insert_events(
        &self,
        events: &[CanonicalEvent],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
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
    async fn insert_events(&self, events: &[CanonicalEvent]) -> Result<u64, StoreError> {
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
        let r = sqlx::query(
            "INSERT INTO events (source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index)
             SELECT s, i, t, o, g, d::jsonb, m::jsonb, rt, rp, ro, ri
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::int8[], $11::int4[])
               AS u(s, i, t, o, g, d, m, rt, rp, ro, ri)
             ON CONFLICT (source, event_id) DO NOTHING",
        )
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
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}
