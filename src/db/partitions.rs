//! The partitioned `events` table (topology.yaml `events_table.partition`): the take-over of an
//! unpartitioned table, and the maintenance that keeps a partition for every period from
//! `now − retention` to `create_ahead` periods ahead and drops the partitions wholly past
//! retention.
//!
//! Decisions are made from each partition's bounds as the catalog holds them
//! (`pg_get_expr(relpartbound)`), never from names, so a renamed or hand-made partition is
//! handled like any other (a retention job that parsed names and dropped nothing is a known way
//! to fail: frain-dev/convoy#2781). Rows no partition takes land in `events_default`, which is
//! counted (`helios_events_default_partition_rows`); when a partition is created for a range the
//! default holds rows of, they are moved into it in the same transaction. Every step takes a
//! short `lock_timeout`, so a long transaction elsewhere makes maintenance fail and retry on its
//! next run instead of queueing every writer behind its lock; one instance maintains at a time
//! (an advisory lock), the others skip.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::StoreError;
use crate::topology::Partitioning;

/// The advisory lock of partition maintenance and of the take-over, per schema: deployments in
/// other schemas of the same database (staging beside production, the tests) maintain their own
/// tables without waiting for each other (one key for the whole database made a take-over report
/// "another instance is maintaining" when another schema's processor was maintaining its own).
const LOCK_KEY: &str = "hashtext('helios partitions'), hashtext(current_schema())";
/// How long one step waits for a table lock before it gives up until the next run.
const LOCK_TIMEOUT: &str = "5s";
/// The stored columns (the generated ones, `order_id` and `customer_id`, are computed again).
const COLUMNS: &str = "source, event_id, event_type, occurred_at, ingested_at, processed_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, replay_id";
/// The partitioned `events` and its default partition.
const PARTITIONED_DDL: &str = include_str!("../../migrations/events_partitioned.sql");

/// How `events` exists in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// No `events` table (migrations not applied).
    Missing,
    /// One ordinary table.
    Plain,
    /// Partitioned by range of `occurred_at`.
    Partitioned,
}

/// The kind of `events` in the connection's schema.
pub async fn table_kind(pool: &PgPool) -> Result<TableKind, StoreError> {
    let mut conn = pool.acquire().await?;
    kind_on(&mut conn).await
}

async fn kind_on(conn: &mut PgConnection) -> Result<TableKind, StoreError> {
    let kind: Option<String> =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass('events')")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match kind.as_deref() {
        None => TableKind::Missing,
        Some("p") => TableKind::Partitioned,
        Some(_) => TableKind::Plain,
    })
}

/// One partition of `events`, with its bounds as the catalog holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub name: String,
    /// Inclusive lower bound; `None` for the default partition (or `MINVALUE`).
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound; `None` for the default partition (or `MAXVALUE`).
    pub to: Option<DateTime<Utc>>,
    pub is_default: bool,
}

/// The partitions of `events`, oldest first (the default partition last).
pub async fn list(pool: &PgPool) -> Result<Vec<Partition>, StoreError> {
    let mut conn = pool.acquire().await?;
    list_on(&mut conn).await
}

async fn list_on(conn: &mut PgConnection) -> Result<Vec<Partition>, StoreError> {
    let rows = sqlx::query(
        "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT',
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz,
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamptz
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass('events')",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut parts: Vec<Partition> = rows
        .iter()
        .map(|r| Partition {
            name: r.get(0),
            is_default: r.get(1),
            from: r.get(2),
            to: r.get(3),
        })
        .collect();
    parts.sort_by_key(|p| (p.is_default, p.from));
    Ok(parts)
}

/// What a take-over or a maintenance run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Maintenance {
    /// Rows an unpartitioned table held, all now in the partitioned one (take-over only).
    pub taken_over: Option<u64>,
    /// Partitions created, by name.
    pub created: Vec<String>,
    /// Partitions dropped (past retention), by name.
    pub dropped: Vec<String>,
    /// Rows moved from the default partition into a partition created for their range.
    pub moved_from_default: u64,
    /// Rows of the default partition past retention, deleted.
    pub expired_in_default: u64,
    /// Claimed keys of events without a time of their own past retention, deleted.
    pub expired_keys: u64,
    /// Rows left in the default partition.
    pub default_rows: i64,
    /// Partitions there are now (the default one not counted).
    pub partitions: usize,
    /// The lower bound of the oldest partition.
    pub oldest: Option<DateTime<Utc>>,
    /// The upper bound of the newest partition.
    pub newest: Option<DateTime<Utc>>,
    /// Another instance held the maintenance lock: nothing was done.
    pub skipped: bool,
}

impl std::fmt::Display for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.skipped {
            return write!(f, "another instance is maintaining the partitions");
        }
        if let Some(n) = self.taken_over {
            write!(f, "took the unpartitioned table over ({n} rows); ")?;
        }
        let day = |t: Option<DateTime<Utc>>| {
            t.map(|t| t.format("%Y-%m-%d").to_string())
                .unwrap_or_else(|| "-".into())
        };
        write!(
            f,
            "{} partitions ({} .. {}), {} created, {} dropped, {} rows in the default partition",
            self.partitions,
            day(self.oldest),
            day(self.newest),
            self.created.len(),
            self.dropped.len(),
            self.default_rows
        )?;
        if self.moved_from_default > 0 {
            write!(f, " ({} moved out)", self.moved_from_default)?;
        }
        if self.expired_in_default > 0 {
            write!(f, " ({} past retention deleted)", self.expired_in_default)?;
        }
        Ok(())
    }
}

fn literal(t: DateTime<Utc>) -> String {
    format!("'{}'", t.format("%Y-%m-%d %H:%M:%S%.6f+00"))
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<u64, StoreError> {
    Ok(sqlx::query(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// Takes an unpartitioned `events` over into the partitioned layout, in one transaction: the
/// old table is renamed away, the partitioned one created with a partition for every period
/// [`Partitioning::wanted`] names (reaching back to the oldest row when there is no retention),
/// every row copied, the counts compared, the old table dropped. Writers wait on the table lock
/// meanwhile and go on into the new table; nothing is lost. Indexes an operator added to the old
/// table are not carried over (they are named in the log). `Ok(None)`: nothing to take over.
pub async fn take_over(
    pool: &PgPool,
    p: &Partitioning,
    now: DateTime<Utc>,
) -> Result<Option<u64>, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    exec(&mut tx, format!("SELECT pg_advisory_xact_lock({LOCK_KEY})")).await?;
    if kind_on(&mut tx).await? != TableKind::Plain {
        return Ok(None);
    }
    exec(&mut tx, "SET LOCAL lock_timeout = '60s'".into()).await?;
    exec(&mut tx, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE".into()).await?;
    let (rows, oldest): (i64, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT count(*), min(occurred_at) FROM events")
            .fetch_one(&mut *tx)
            .await?;
    // The old table's indexes (its primary key's too) step aside for the new ones' names.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = to_regclass('events')",
    )
    .fetch_all(&mut *tx)
    .await?;
    exec(
        &mut tx,
        "ALTER TABLE events RENAME TO events_unpartitioned".into(),
    )
    .await?;
    const OURS: [&str; 5] = [
        "events_pkey",
        "events_order_id_idx",
        "events_customer_id_idx",
        "events_type_time_idx",
        "events_occurred_at_idx",
    ];
    for (i, index) in indexes.iter().enumerate() {
        if !OURS.contains(&index.as_str()) {
            tracing::warn!(
                index,
                "an index of the unpartitioned events table is not carried over: create it again on the partitioned table"
            );
        }
        exec(
            &mut tx,
            format!(
                "ALTER INDEX {} RENAME TO {}",
                ident(index),
                ident(&format!("events_unpartitioned_idx{i}"))
            ),
        )
        .await?;
    }
    sqlx::raw_sql(PARTITIONED_DDL).execute(&mut *tx).await?;
    for start in p.wanted(now, oldest) {
        create(&mut tx, p, start).await?;
    }
    let copied = exec(
        &mut tx,
        format!("INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM events_unpartitioned"),
    )
    .await?;
    if copied != rows as u64 {
        return Err(StoreError::transient(format!(
            "take-over copied {copied} of {rows} rows of events: rolled back, nothing changed"
        )));
    }
    exec(
        &mut tx,
        "INSERT INTO events_timeless_keys (source, event_id, occurred_at, raw_topic, raw_partition, raw_offset, raw_index)
         SELECT source, event_id, occurred_at, raw_topic, raw_partition, raw_offset, raw_index
         FROM events_unpartitioned WHERE occurred_at = ingested_at
         ON CONFLICT (source, event_id) DO NOTHING"
            .into(),
    )
    .await?;
    exec(&mut tx, "DROP TABLE events_unpartitioned".into()).await?;
    tx.commit().await?;
    tracing::info!(rows, "events taken over into the partitioned layout");
    Ok(Some(copied))
}

/// `CREATE TABLE … PARTITION OF events` for the period starting at `start` (inside the caller's
/// transaction).
async fn create(
    conn: &mut PgConnection,
    p: &Partitioning,
    start: DateTime<Utc>,
) -> Result<String, StoreError> {
    let name = p.partition_name(start);
    exec(
        conn,
        format!(
            "CREATE TABLE {} PARTITION OF events FOR VALUES FROM ({}) TO ({})",
            ident(&name),
            literal(start),
            literal(p.step(start, 1))
        ),
    )
    .await?;
    Ok(name)
}

/// One maintenance run at `now`: the missing partitions created (rows the default partition
/// holds for their range moved in), the partitions past retention dropped, the default
/// partition's rows past retention deleted and the rest counted. Skipped when another instance
/// holds the maintenance lock.
pub async fn maintain(
    pool: &PgPool,
    p: &Partitioning,
    now: DateTime<Utc>,
) -> Result<Maintenance, StoreError> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT pg_try_advisory_lock({LOCK_KEY})"
    )))
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Ok(Maintenance {
            skipped: true,
            ..Default::default()
        });
    }
    let result = maintain_locked(&mut conn, p, now).await;
    let _ = sqlx::query(AssertSqlSafe(format!(
        "SELECT pg_advisory_unlock({LOCK_KEY})"
    )))
    .execute(&mut *conn)
    .await;
    let m = result?;
    record(&m, p, now);
    Ok(m)
}

async fn maintain_locked(
    conn: &mut PgConnection,
    p: &Partitioning,
    now: DateTime<Utc>,
) -> Result<Maintenance, StoreError> {
    if kind_on(conn).await? != TableKind::Partitioned {
        return Err(StoreError::transient(
            "topology.yaml asks for a partitioned events table but it is not partitioned: run `helios migrate` (or the processor with --migrate) to take it over",
        ));
    }
    let mut m = Maintenance::default();
    let parts = list_on(conn).await?;
    if !parts.iter().any(|x| x.is_default) {
        exec(
            conn,
            "CREATE TABLE IF NOT EXISTS events_default PARTITION OF events DEFAULT".into(),
        )
        .await?;
    }
    let default = parts
        .iter()
        .find(|x| x.is_default)
        .map(|x| x.name.clone())
        .unwrap_or_else(|| "events_default".into());
    let oldest = parts.iter().filter_map(|x| x.from).min();
    for start in p.wanted(now, oldest) {
        let end = p.step(start, 1);
        let covered = parts.iter().any(|x| {
            !x.is_default && x.from.is_none_or(|f| f < end) && x.to.is_none_or(|t| t > start)
        });
        if covered {
            continue;
        }
        let mut tx = conn.begin().await?;
        exec(
            &mut tx,
            format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"),
        )
        .await?;
        exec(
            &mut tx,
            format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", ident(&default)),
        )
        .await?;
        let range = format!(
            "occurred_at >= {} AND occurred_at < {}",
            literal(start),
            literal(end)
        );
        let waiting: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {range})",
            ident(&default)
        )))
        .fetch_one(&mut *tx)
        .await?;
        if waiting {
            exec(
                &mut tx,
                format!(
                    "CREATE TEMP TABLE helios_moving ON COMMIT DROP AS SELECT {COLUMNS} FROM {} WHERE false",
                    ident(&default)
                ),
            )
            .await?;
            exec(
                &mut tx,
                format!(
                    "WITH m AS (DELETE FROM {} WHERE {range} RETURNING {COLUMNS}) INSERT INTO helios_moving SELECT * FROM m",
                    ident(&default)
                ),
            )
            .await?;
        }
        let name = create(&mut tx, p, start).await?;
        if waiting {
            m.moved_from_default += exec(
                &mut tx,
                format!("INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM helios_moving"),
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(partition = %name, "events partition created");
        m.created.push(name);
    }
    if let Some(cutoff) = p.cutoff(now) {
        for x in parts.iter().filter(|x| !x.is_default) {
            if x.to.is_some_and(|t| t <= cutoff) {
                let mut tx = conn.begin().await?;
                exec(
                    &mut tx,
                    format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"),
                )
                .await?;
                exec(&mut tx, format!("DROP TABLE {}", ident(&x.name))).await?;
                tx.commit().await?;
                tracing::info!(partition = %x.name, "events partition past retention dropped");
                m.dropped.push(x.name.clone());
            }
        }
        m.expired_in_default = exec(
            conn,
            format!(
                "DELETE FROM {} WHERE occurred_at < {}",
                ident(&default),
                literal(cutoff)
            ),
        )
        .await?;
        // The claimed keys of events without a time of their own go with their rows.
        m.expired_keys = exec(
            conn,
            format!(
                "DELETE FROM events_timeless_keys WHERE occurred_at < {}",
                literal(cutoff)
            ),
        )
        .await?;
    }
    m.default_rows = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        ident(&default)
    )))
    .fetch_one(&mut *conn)
    .await?;
    let now_parts = list_on(conn).await?;
    let ranged: Vec<&Partition> = now_parts.iter().filter(|x| !x.is_default).collect();
    m.partitions = ranged.len();
    m.oldest = ranged.iter().filter_map(|x| x.from).min();
    m.newest = ranged.iter().filter_map(|x| x.to).max();
    if m.default_rows > 0 {
        tracing::warn!(
            rows = m.default_rows,
            "rows in the default partition of events: older than every partition or further ahead than create_ahead"
        );
    }
    Ok(m)
}

/// The run's figures as metrics.
fn record(m: &Maintenance, p: &Partitioning, now: DateTime<Utc>) {
    metrics::gauge!("helios_events_partitions").set(m.partitions as f64);
    metrics::gauge!("helios_events_default_partition_rows").set(m.default_rows as f64);
    metrics::gauge!("helios_events_oldest_partition_age_seconds").set(
        m.oldest
            .map(|o| (now - o).num_seconds().max(0) as f64)
            .unwrap_or(0.0),
    );
    metrics::gauge!("helios_events_retention_seconds")
        .set(p.retention.map(|r| r.as_secs_f64()).unwrap_or(0.0));
    metrics::counter!("helios_events_partitions_created_total").increment(m.created.len() as u64);
    metrics::counter!("helios_events_partitions_dropped_total").increment(m.dropped.len() as u64);
    metrics::counter!("helios_events_default_rows_moved_total").increment(m.moved_from_default);
    metrics::counter!("helios_events_default_rows_expired_total").increment(m.expired_in_default);
}

/// What `helios migrate` and `helios process` do at start-up with the layout topology.yaml asks
/// for: with `take_over` (migrating), an unpartitioned table is taken over; then one maintenance
/// run, so the partitions exist before the first write. Without partitioning asked for, a
/// partitioned table is left as it is, with a warning (HELIOS never takes partitioning back).
pub async fn prepare(
    pool: &PgPool,
    p: Option<&Partitioning>,
    take_over_allowed: bool,
) -> Result<Option<Maintenance>, StoreError> {
    let Some(p) = p else {
        if table_kind(pool).await? == TableKind::Partitioned {
            tracing::warn!(
                "the events table is partitioned but topology.yaml sets no events_table.partition: no partitions are created or dropped"
            );
        }
        return Ok(None);
    };
    let taken_over = if take_over_allowed {
        take_over(pool, p, Utc::now()).await?
    } else {
        None
    };
    let mut m = maintain(pool, p, Utc::now()).await?;
    m.taken_over = taken_over;
    Ok(Some(m))
}

/// The maintenance loop of `helios process`: a run every `every` until `shutdown`; a failed run
/// is logged and counted (`helios_events_partition_maintenance_failures_total`) and tried again
/// on the next tick (partitions exist `create_ahead` periods ahead, so there is time).
pub async fn maintain_every(
    pool: PgPool,
    p: Partitioning,
    every: std::time::Duration,
    shutdown: crate::shutdown::Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        match maintain(&pool, &p, Utc::now()).await {
            Ok(m) if m.skipped => tracing::debug!("{m}"),
            Ok(m) => tracing::info!(
                created = m.created.len(),
                dropped = m.dropped.len(),
                default_rows = m.default_rows,
                "events partitions maintained: {m}"
            ),
            Err(e) => {
                metrics::counter!("helios_events_partition_maintenance_failures_total")
                    .increment(1);
                tracing::error!(error = %e, "events partition maintenance failed; tried again next run");
            }
        }
    }
}
