//! The PostgreSQL `events` sink. A live batch is written with one binary `COPY` straight into
//! `events` in a transaction; when a row is there already (SQLSTATE 23505: the batch is written
//! again after a crash or a rebalance), the transaction fails whole and the batch goes through a
//! session-local staging table instead: `COPY` into it, then one `INSERT … SELECT … ON CONFLICT
//! (source, event_id)` — `DO NOTHING` for live processing, `DO UPDATE` for a replay with dedup
//! bypassed (replays always take this path). The conflict target is the primary key by name,
//! `events_pkey`, so the same statements serve the partitioned layout, whose key also holds
//! `occurred_at` (see [`super::partitions`] and [`PgStore::write_events`]). Measured against the earlier `INSERT … SELECT FROM
//! UNNEST(…)` statement (still available as [`PgWrite::Unnest`] for the benchmark): see the
//! README's benchmark section.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::{Executor, Row};

use super::copy;
use super::{foreign_positions, stored_row, EventStore, Lineage, StoreError, StoredRow, Written};
use crate::model::CanonicalEvent;

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

/// The replay's conflict clause (dedup bypassed): the stored row takes this normalization.
macro_rules! upsert_clause {
    () => {
        " ON CONFLICT ON CONSTRAINT events_pkey DO UPDATE SET event_type = EXCLUDED.event_type,
          occurred_at = EXCLUDED.occurred_at, data = EXCLUDED.data, metadata = EXCLUDED.metadata,
          raw_topic = EXCLUDED.raw_topic, raw_partition = EXCLUDED.raw_partition,
          raw_offset = EXCLUDED.raw_offset, raw_index = EXCLUDED.raw_index,
          replay_id = EXCLUDED.replay_id, processed_at = now()"
    };
}

/// Claims the keys of the staged events without a time of their own (the partitioned layout's
/// `events_timeless_keys`); a key held already is left to its first raw record.
const GUARD_FROM_STAGING: &str = "INSERT INTO events_timeless_keys (source, event_id, occurred_at, raw_topic, raw_partition, raw_offset, raw_index)
     SELECT source, event_id, occurred_at, raw_topic, raw_partition, raw_offset, raw_index
     FROM helios_events_staging WHERE occurred_at = ingested_at
     ON CONFLICT (source, event_id) DO NOTHING";

/// How a batch reaches `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgWrite {
    /// Binary COPY into a staging table, then INSERT … SELECT … ON CONFLICT (the default).
    #[default]
    Copy,
    /// One INSERT … SELECT FROM UNNEST(arrays) … ON CONFLICT (kept for comparison).
    Unnest,
}

/// The PostgreSQL `events` table.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    method: PgWrite,
    layout: Arc<Mutex<Layout>>,
}

/// Whether `events` is partitioned, as last read from the catalog. A partitioned table stays so
/// (HELIOS never takes partitioning back), an unpartitioned one is read again every
/// [`LAYOUT_RECHECK`]: a take-over by `helios migrate` is seen by running processors within it
/// (until then they do not claim the keys of events without a time of their own; see
/// [`PgStore::write_partitioned`]).
#[derive(Default)]
struct Layout {
    partitioned: Option<bool>,
    read_at: Option<Instant>,
}

const LAYOUT_RECHECK: Duration = Duration::from_secs(10);

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        PgStore {
            pool,
            method: PgWrite::default(),
            layout: Arc::default(),
        }
    }

    /// Whether `events` is partitioned (see [`Layout`]).
    async fn partitioned(&self) -> Result<bool, StoreError> {
        {
            let l = self.layout.lock().unwrap_or_else(|e| e.into_inner());
            match (l.partitioned, l.read_at) {
                (Some(true), _) => return Ok(true),
                (Some(false), Some(at)) if at.elapsed() < LAYOUT_RECHECK => return Ok(false),
                _ => {}
            }
        }
        let partitioned = super::partitions::table_kind(&self.pool).await?
            == super::partitions::TableKind::Partitioned;
        *self.layout.lock().unwrap_or_else(|e| e.into_inner()) = Layout {
            partitioned: Some(partitioned),
            read_at: Some(Instant::now()),
        };
        Ok(partitioned)
    }

    /// The same store writing with `method`.
    pub fn with_method(mut self, method: PgWrite) -> Self {
        self.method = method;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The statement moving the staging rows into `events`; `$1` is the replay id.
fn from_staging(upsert: bool) -> &'static str {
    if upsert {
        concat!(
            "INSERT INTO events (source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, replay_id)
             SELECT source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, $1
             FROM helios_events_staging",
            upsert_clause!()
        )
    } else {
        "INSERT INTO events (source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, replay_id)
         SELECT source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index, $1
         FROM helios_events_staging
         ON CONFLICT ON CONSTRAINT events_pkey DO NOTHING"
    }
}

impl PgStore {
    /// Live batches: plain binary COPY straight into `events` (the fastest way in), in one
    /// transaction. The primary key keeps it idempotent: if any row is already there (a batch
    /// written again after a crash or a rebalance), the COPY fails with 23505 as a whole and the
    /// batch is written again through the staging table with `ON CONFLICT DO NOTHING`.
    async fn write_copy(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        let data = copy::encode(events);
        if replay_id.is_none() {
            match self.copy_direct(&data).await {
                Err(e) if is_unique_violation(&e) => {
                    tracing::debug!(
                        events = events.len(),
                        "batch partly stored already: written with ON CONFLICT"
                    );
                }
                other => {
                    return other
                        .map(|rows| Written {
                            rows,
                            foreign: vec![],
                        })
                        .map_err(StoreError::from)
                }
            }
        }
        self.copy_staged(events, data, replay_id).await
    }

    async fn copy_direct(&self, data: &[u8]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows = copy_stream(&mut tx, copy::COPY_INTO_EVENTS, data).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// COPY into the staging table, then one INSERT … SELECT … ON CONFLICT, in one transaction;
    /// when rows were there already, one more statement reads their lineage.
    async fn copy_staged(
        &self,
        events: &[&CanonicalEvent],
        data: Vec<u8>,
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        let mut tx = self.pool.begin().await?;
        (&mut *tx).execute(copy::STAGING_DDL).await?;
        copy_stream(&mut tx, copy::COPY_INTO_STAGING, &data).await?;
        let partitioned = self.partitioned().await?;
        // Keys of events without a time of their own that another raw record holds (the
        // partitioned layout's guard): not written, reported as duplicates.
        let mut stored: Lineage = Lineage::new();
        if partitioned {
            if replay_id.is_some() {
                // The key holds occurred_at: a row this replay normalizes to another
                // occurred_at would stay beside the new one. It is replaced, as on the
                // unpartitioned table, and the guard follows.
                sqlx::query(
                    "DELETE FROM events e USING helios_events_staging s
                     WHERE e.source = s.source AND e.event_id = s.event_id AND e.occurred_at <> s.occurred_at",
                )
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "DELETE FROM events_timeless_keys g USING helios_events_staging s
                     WHERE g.source = s.source AND g.event_id = s.event_id",
                )
                .execute(&mut *tx)
                .await?;
                sqlx::query(GUARD_FROM_STAGING).execute(&mut *tx).await?;
            } else {
                sqlx::query(GUARD_FROM_STAGING).execute(&mut *tx).await?;
                stored = sqlx::query(
                    "DELETE FROM helios_events_staging s USING events_timeless_keys g
                     WHERE s.occurred_at = s.ingested_at AND g.source = s.source AND g.event_id = s.event_id
                       AND (g.raw_topic, g.raw_partition, g.raw_offset, g.raw_index)
                           IS DISTINCT FROM (s.raw_topic, s.raw_partition, s.raw_offset, s.raw_index)
                     RETURNING s.source, s.event_id, g.raw_topic, g.raw_partition, g.raw_offset, g.raw_index",
                )
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5))))
                .collect();
            }
        }
        let r = sqlx::query(from_staging(replay_id.is_some()))
            .bind(replay_id)
            .execute(&mut *tx)
            .await?;
        let rows = r.rows_affected();
        let mut foreign = vec![];
        if replay_id.is_none() && rows + (stored.len() as u64) < events.len() as u64 {
            // On the partitioned table a conflict is on the whole key, occurred_at included: the
            // lookup stays in the partition of each row.
            let sql = if partitioned {
                "SELECT e.source, e.event_id, e.raw_topic, e.raw_partition, e.raw_offset, e.raw_index
                 FROM events e JOIN helios_events_staging s USING (source, event_id, occurred_at)"
            } else {
                "SELECT e.source, e.event_id, e.raw_topic, e.raw_partition, e.raw_offset, e.raw_index
                 FROM events e JOIN helios_events_staging s USING (source, event_id)"
            };
            stored.extend(sqlx::query(sql).fetch_all(&mut *tx).await?.iter().map(|r| {
                (
                    (r.get(0), r.get(1)),
                    (r.get(2), r.get(3), r.get(4), r.get(5)),
                )
            }));
        }
        if replay_id.is_none() && !stored.is_empty() {
            foreign = foreign_positions(events, &stored);
        }
        tx.commit().await?;
        Ok(Written { rows, foreign })
    }

    async fn write_unnest(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        if events.is_empty() {
            return Ok(Written::default());
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
            concat!(pg_insert_select!(), upsert_clause!())
        } else {
            concat!(
                pg_insert_select!(),
                " ON CONFLICT ON CONSTRAINT events_pkey DO NOTHING"
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
        let rows = r.rows_affected();
        let foreign = if replay_id.is_none() && rows < n as u64 {
            foreign_positions(events, &self.lineage(events).await?)
        } else {
            vec![]
        };
        Ok(Written { rows, foreign })
    }

    async fn write_with_method(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        match self.method {
            PgWrite::Copy => self.write_copy(events, replay_id).await,
            // A replay onto the partitioned table keeps its guard in step: the staged path.
            PgWrite::Unnest if replay_id.is_some() && self.partitioned().await? => {
                self.copy_staged(events, copy::encode(events), replay_id)
                    .await
            }
            PgWrite::Unnest => self.write_unnest(events, replay_id).await,
        }
    }

    /// A live batch on the partitioned table. Its key holds `occurred_at`, which an event
    /// with a time of its own always repeats, so the key catches those duplicates as before.
    /// An event without one takes its raw record's receive time (`occurred_at = ingested_at`),
    /// which a cloud's redelivery in another raw record does not share: its key is claimed in
    /// `events_timeless_keys` (one narrow unpartitioned table, primary key `(source, event_id)`,
    /// with the raw record that claimed it) in the same transaction as the row, and a key another
    /// raw record holds is a duplicate, not written. When every such key is new (the common
    /// case), the batch is still one binary COPY.
    async fn write_partitioned(&self, events: &[&CanonicalEvent]) -> Result<Written, StoreError> {
        let timeless: Vec<&CanonicalEvent> = events
            .iter()
            .copied()
            .filter(|e| e.occurred_at == e.ingested_at)
            .collect();
        if timeless.is_empty() {
            return self.write_with_method(events, None).await;
        }
        let data = copy::encode(events);
        if self.method == PgWrite::Copy {
            match self.copy_direct_claiming(&timeless, &data).await {
                Ok(Some(rows)) => {
                    return Ok(Written {
                        rows,
                        foreign: vec![],
                    })
                }
                Ok(None) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.copy_staged(events, data, None).await
    }

    /// Claims the keys of `timeless` and COPYs the batch, in one transaction; `Ok(None)` (and
    /// nothing written) when a key was claimed already.
    async fn copy_direct_claiming(
        &self,
        timeless: &[&CanonicalEvent],
        data: &[u8],
    ) -> Result<Option<u64>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO events_timeless_keys (source, event_id, occurred_at, raw_topic, raw_partition, raw_offset, raw_index)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int4[], $6::int8[], $7::int4[])
             ON CONFLICT (source, event_id) DO NOTHING",
        )
        .bind(timeless.iter().map(|e| e.source.as_str()).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.raw.topic.as_str()).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.raw.partition).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.raw.offset).collect::<Vec<_>>())
        .bind(timeless.iter().map(|e| e.raw.index as i32).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed < timeless.len() as u64 {
            tx.rollback().await?;
            return Ok(None);
        }
        let rows = copy_stream(&mut tx, copy::COPY_INTO_EVENTS, data).await?;
        tx.commit().await?;
        Ok(Some(rows))
    }

    /// The lineage of the stored rows of `events`.
    async fn lineage(&self, events: &[&CanonicalEvent]) -> Result<Lineage, StoreError> {
        let source: Vec<&str> = events.iter().map(|e| e.source.as_str()).collect();
        let id: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        Ok(sqlx::query(
            "SELECT e.source, e.event_id, e.raw_topic, e.raw_partition, e.raw_offset, e.raw_index
             FROM events e JOIN UNNEST($1::text[], $2::text[]) AS k(s, i) ON e.source = k.s AND e.event_id = k.i",
        )
        .bind(source)
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4), r.get(5))))
        .collect())
    }
}

impl EventStore for PgStore {
    async fn write_events(
        &self,
        events: &[&CanonicalEvent],
        replay_id: Option<&str>,
    ) -> Result<Written, StoreError> {
        if events.is_empty() {
            return Ok(Written::default());
        }
        if replay_id.is_none() && self.partitioned().await? {
            return self.write_partitioned(events).await;
        }
        self.write_with_method(events, replay_id).await
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
        let occurred: Vec<chrono::DateTime<chrono::Utc>> =
            events.iter().map(|e| e.occurred_at).collect();
        // occurred_at (the row's, since its own raw record wrote it) keeps the lookup in one
        // partition of a partitioned table, where the row's key claim goes with it.
        let sql = if self.partitioned().await? {
            "WITH k AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int4[], $7::timestamptz[])
                          AS k(s, i, rt, rp, ro, ri, o)),
                  claims AS (DELETE FROM events_timeless_keys g USING k
                    WHERE g.source = k.s AND g.event_id = k.i AND g.raw_topic = k.rt
                      AND g.raw_partition = k.rp AND g.raw_offset = k.ro AND g.raw_index = k.ri)
             DELETE FROM events e USING k
             WHERE e.source = k.s AND e.event_id = k.i AND e.occurred_at = k.o AND e.raw_topic = k.rt
               AND e.raw_partition = k.rp AND e.raw_offset = k.ro AND e.raw_index = k.ri"
        } else {
            "DELETE FROM events e USING UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::int4[], $7::timestamptz[])
               AS k(s, i, rt, rp, ro, ri, o)
             WHERE e.source = k.s AND e.event_id = k.i AND e.occurred_at = k.o AND e.raw_topic = k.rt
               AND e.raw_partition = k.rp AND e.raw_offset = k.ro AND e.raw_index = k.ri"
        };
        let r = sqlx::query(sql)
            .bind(source)
            .bind(id)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .bind(index)
            .bind(occurred)
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

/// Sends one binary COPY stream (`statement`, then `data`) on `conn`; a failed send aborts the
/// COPY. Returns the rows copied.
async fn copy_stream(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    data: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy_in = conn.copy_in_raw(statement).await?;
    if let Err(e) = copy_in.send(data).await {
        let _ = copy_in.abort("send failed").await;
        return Err(e);
    }
    copy_in.finish().await
}

/// A duplicate key (SQLSTATE 23505): some of the rows are stored already.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505")
}
