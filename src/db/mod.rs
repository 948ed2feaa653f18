//! The event stores: PostgreSQL in production (`pg`: the pool, the `events` sink written with
//! binary `COPY`), SQLite for the embedded demo (`sqlite`), both behind [`EventStore`]; the
//! migrations in `migrations/` (embedded in the binary, applied under an advisory lock so several
//! processors can start at once); the partitioned layout of `events` and its maintenance
//! (`partitions`); and the classification of database errors.

mod copy;
mod nodelay;
pub mod partitions;
mod pg;
mod sqlite;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::model::fault::{classify_sqlstate, Fault};
use crate::model::CanonicalEvent;
pub use copy::{encode as copy_encode, COPY_INTO_EVENTS};
pub use pg::{PgStore, PgWrite};
pub use sqlite::SqliteStore;

/// Embedded migrations: (version, name, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "events",
        include_str!("../../migrations/0001_events.sql"),
    ),
    (
        2,
        "dlq_redrives",
        include_str!("../../migrations/0002_dlq_redrives.sql"),
    ),
    (
        3,
        "reconciliation",
        include_str!("../../migrations/0003_reconciliation.sql"),
    ),
    (
        4,
        "reconcile_progress",
        include_str!("../../migrations/0004_reconcile_progress.sql"),
    ),
    (
        5,
        "reconcile_event_time",
        include_str!("../../migrations/0005_reconcile_event_time.sql"),
    ),
    (
        6,
        "reconcile_outbox_through",
        include_str!("../../migrations/0006_reconcile_outbox_through.sql"),
    ),
    (
        7,
        "dlq_heal_runs",
        include_str!("../../migrations/0007_dlq_heal_runs.sql"),
    ),
];

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
    let port = opts.get_port();
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(move |_, _| {
            Box::pin(async move {
                nodelay::set_on_sockets_to(port);
                Ok(())
            })
        })
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

/// What a write did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Rows inserted (or, for a replay with dedup bypassed, written).
    pub rows: u64,
    /// Positions (in the slice written) of events whose row was already there with *another* raw
    /// record's lineage: the store kept that first row, so the event is a duplicate (a cloud
    /// redelivery after its dedup mark expired, a redrive sent twice). An event whose row carries
    /// its own lineage (its raw record processed again after a crash) is not listed.
    pub foreign: Vec<usize>,
}

/// The lineage columns of a stored row: `(source, event_id)` → `(raw_topic, raw_partition,
/// raw_offset, raw_index)`.
pub(crate) type Lineage = std::collections::HashMap<(String, String), (String, i32, i64, i32)>;

/// The positions of `events` whose stored row has another lineage than theirs.
pub(crate) fn foreign_positions(events: &[&CanonicalEvent], stored: &Lineage) -> Vec<usize> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            stored
                .get(&(e.source.as_str().to_string(), e.event_id.clone()))
                .is_some_and(|(t, p, o, i)| {
                    (t.as_str(), *p, *o, *i)
                        != (
                            e.raw.topic.as_str(),
                            e.raw.partition,
                            e.raw.offset,
                            e.raw.index as i32,
                        )
                })
        })
        .map(|(i, _)| i)
        .collect()
}

/// Where canonical events are stored.
pub trait EventStore: Send + Sync + 'static {
    /// Writes the events in one statement. Without `replay_id`, rows already present are left
    /// alone (and those of another lineage reported); with it, they are replaced and marked with
    /// it.
    fn write_events(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;

    /// Inserts the events in one statement; rows already present are left alone
    /// (idempotent on `(source, event_id)`). Returns how many rows were new.
    fn insert_events(
        &self,
        events: &[CanonicalEvent],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let refs: Vec<&CanonicalEvent> = events.iter().collect();
            Ok(self.write_events(&refs, None).await?.rows)
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
            Ok(self.write_events(&refs, Some(replay_id)).await?.rows)
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

/// A row as [`StoredRow`], for either driver.
pub(crate) fn stored_row<R: Row>(r: &R) -> StoredRow
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
