//! Where the reconciler keeps its state (`flow_state`) and its results
//! (`reconciliation_results`): PostgreSQL in production, the demo's SQLite file embedded. A
//! batch's state changes, results and resolutions are written in one transaction; results are
//! idempotent on (flow, key, outcome, step). Operations of more than one statement live per
//! backend (`pg`, `sqlite`); the one-statement queries stay here, each beside its twin in the
//! other dialect.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::engine::{FlowState, OutcomeKind};
use crate::db::StoreError;

mod pg;
mod sqlite;

/// An instance's state as stored.
#[derive(Debug, Clone)]
pub struct StateRow {
    pub flow: String,
    pub key: String,
    pub part: i32,
    pub state: FlowState,
    pub next_due: Option<DateTime<Utc>>,
    pub completed: bool,
}

/// One outcome row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResultRow {
    pub flow: String,
    pub key: String,
    pub outcome: OutcomeKind,
    pub step: String,
    pub event_time: DateTime<Utc>,
    pub duration_ms: Option<i64>,
    pub detail: serde_json::Value,
    /// The instance's fan-out partition (its owner publishes the outcome).
    pub part: i32,
}

/// An outcome as stored: its stable id (the record's `helios-outcome-id`) and when it was
/// detected.
#[derive(Debug, Clone)]
pub struct StoredOutcome {
    pub id: i64,
    pub row: ResultRow,
    pub detected_at: DateTime<Utc>,
}

/// What a write did: the topic-partitions another instance claimed since (then nothing was
/// written), or the outcomes it inserted (those already stored are left as they are).
#[derive(Debug, Default)]
pub struct Saved {
    pub taken: Vec<(String, i32)>,
    pub inserted: Vec<StoredOutcome>,
}

/// Event time stored per cloud, per topic-partition.
pub type PerSource = HashMap<(String, i32), Vec<(String, DateTime<Utc>)>>;

/// An unpublished outcome as SQLite returns it.
type SqliteOutcome = (
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    String,
    Option<i32>,
    String,
);

/// A watermark to keep: (flow, partition, watermark, what held it).
pub type Mark = (String, i32, DateTime<Utc>, String);

/// An earlier outcome now resolved.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub flow: String,
    pub key: String,
    pub outcome: OutcomeKind,
    pub step: String,
}

/// A write's claim on one fan-out topic-partition (`reconcile_progress`): the generation this
/// instance claimed it with, and how far event time had come in what the write counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    pub topic: String,
    pub part: i32,
    pub generation: i64,
    /// The newest event time per cloud in what the write counted.
    pub sources: Vec<(String, DateTime<Utc>)>,
    pub next_offset: Option<i64>,
}

/// The topic-partitions of `fence` whose claim (`claims`: topic, partition, generation as
/// stored) is no longer this write's: another instance claimed them since.
fn taken(fence: &[Fence], claims: Vec<(String, i32, i64)>) -> Vec<(String, i32)> {
    fence
        .iter()
        .filter(|f| {
            !claims
                .iter()
                .any(|(t, p, g)| *t == f.topic && *p == f.part && *g == f.generation)
        })
        .map(|f| (f.topic.clone(), f.part))
        .collect()
}

impl Fence {
    fn newest(&self) -> Option<DateTime<Utc>> {
        self.sources.iter().map(|s| s.1).max()
    }
}

/// What a claim found: the newest event time stored, and the generation now this instance's.
pub type Claimed = HashMap<(String, i32), (Option<DateTime<Utc>>, i64)>;

/// (partition, deadlines after this one — all when none —, up to this watermark).
pub type DueWindow = (i32, Option<DateTime<Utc>>, DateTime<Utc>);

/// The reconciler's tables.
#[derive(Clone)]
pub enum ReconStore {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

fn decode(flow: &str, key: &str, text: &str) -> Result<FlowState, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::transient(format!(
            "flow_state of {flow}/{key} cannot be read ({e}); was it written by a newer HELIOS?"
        ))
    })
}

type Keyed = HashMap<(String, String), (i32, FlowState)>;

/// Loaded `(flow, key, part, state)` rows, their states read.
fn keyed(rows: Vec<(String, String, i32, String)>) -> Result<Keyed, StoreError> {
    rows.into_iter()
        .map(|(f, k, part, text)| {
            let st = decode(&f, &k, &text)?;
            Ok(((f, k), (part, st)))
        })
        .collect()
}

impl ReconStore {
    /// The stored states of these (flow, key) pairs.
    pub async fn load(&self, keys: &[(String, String)]) -> Result<Keyed, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        match self {
            ReconStore::Pg(pool) => pg::load(pool, keys).await,
            ReconStore::Sqlite(pool) => sqlite::load(pool, keys).await,
        }
    }

    /// Claims these topic-partitions for `group`'s instance that was just assigned them: raises
    /// their generation (a write still on its way from an earlier owner is then refused) and
    /// returns the newest event time stored. Call it before reading any of their states.
    pub async fn claim(&self, group: &str, tps: &[(String, i32)]) -> Result<Claimed, StoreError> {
        let mut tps = tps.to_vec();
        tps.sort();
        if tps.is_empty() {
            return Ok(HashMap::new());
        }
        match self {
            ReconStore::Pg(pool) => pg::claim(pool, group, &tps).await,
            ReconStore::Sqlite(pool) => sqlite::claim(pool, group, &tps).await,
        }
    }

    /// Instances of `flow` on these partitions whose next deadline is after `lo` (when given)
    /// and at or before the partition's watermark, earliest first (at most `limit`), with that
    /// deadline.
    pub async fn due(
        &self,
        flow: &str,
        watermarks: &[DueWindow],
        limit: i64,
    ) -> Result<Vec<(String, i32, FlowState, DateTime<Utc>)>, StoreError> {
        if watermarks.is_empty() {
            return Ok(vec![]);
        }
        let parts: Vec<i32> = watermarks.iter().map(|w| w.0).collect();
        let los: Vec<Option<DateTime<Utc>>> = watermarks.iter().map(|w| w.1).collect();
        let his: Vec<DateTime<Utc>> = watermarks.iter().map(|w| w.2).collect();
        let rows: Vec<(String, i32, String, DateTime<Utc>)> = match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    "SELECT s.flow_key, s.part, s.state, s.next_due FROM flow_state s
                 JOIN unnest($2::int[], $3::timestamptz[], $4::timestamptz[]) AS w(part, lo, hi)
                   ON s.part = w.part
                 WHERE s.flow = $1 AND s.next_due IS NOT NULL AND s.next_due <= w.hi
                   AND (w.lo IS NULL OR s.next_due > w.lo)
                 ORDER BY s.next_due LIMIT $5",
                )
                .bind(flow)
                .bind(&parts)
                .bind(&los)
                .bind(&his)
                .bind(limit)
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                let w: Vec<(i32, Option<String>, String)> = watermarks
                    .iter()
                    .map(|(p, lo, hi)| (*p, lo.map(sqlite_time), sqlite_time(*hi)))
                    .collect();
                let rows: Vec<(String, i32, String, String)> = sqlx::query_as(
                    "SELECT s.flow_key, s.part, s.state, s.next_due FROM flow_state s
                     JOIN json_each(?2) w ON s.part = json_extract(w.value, '$[0]')
                     WHERE s.flow = ?1 AND s.next_due IS NOT NULL
                       AND s.next_due <= json_extract(w.value, '$[2]')
                       AND (json_extract(w.value, '$[1]') IS NULL OR s.next_due > json_extract(w.value, '$[1]'))
                     ORDER BY s.next_due LIMIT ?3",
                )
                .bind(flow)
                .bind(serde_json::to_string(&w).unwrap_or_default())
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|(k, p, s, d)| {
                        let d = DateTime::parse_from_rfc3339(&d)
                            .map(|d| d.with_timezone(&Utc))
                            .unwrap_or_default();
                        (k, p, s, d)
                    })
                    .collect()
            }
        };
        rows.into_iter()
            .map(|(key, part, text, due)| {
                let st = decode(flow, &key, &text)?;
                Ok((key, part, st, due))
            })
            .collect()
    }

    /// Writes a batch's state changes, new results (a result already stored is left as it
    /// is), resolutions and `group`'s event-time progress in one transaction — only if every
    /// topic-partition of `fence` is still claimed with its generation. Returns those that are
    /// not (another instance claimed them since): then nothing was written.
    pub async fn save(
        &self,
        states: &[StateRow],
        results: &[ResultRow],
        resolved: &[Resolution],
        group: &str,
        fence: &[Fence],
        marks: &[Mark],
    ) -> Result<Saved, StoreError> {
        match self {
            ReconStore::Pg(pool) => {
                pg::save(pool, states, results, resolved, group, fence, marks).await
            }
            ReconStore::Sqlite(pool) => {
                sqlite::save(pool, states, results, resolved, group, fence, marks).await
            }
        }
    }

    /// Event time stored per cloud for these topic-partitions of `group`.
    pub async fn sources(
        &self,
        group: &str,
        tps: &[(String, i32)],
    ) -> Result<PerSource, StoreError> {
        let mut out: PerSource = HashMap::new();
        if tps.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(String, i32, String, DateTime<Utc>)> = match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    "SELECT s.topic, s.part, s.source, s.newest_event_time FROM reconcile_sources s
                     JOIN unnest($2::text[], $3::int[]) AS k(t, p) ON s.topic = k.t AND s.part = k.p
                     WHERE s.consumer_group = $1",
                )
                .bind(group)
                .bind(tps.iter().map(|t| t.0.as_str()).collect::<Vec<_>>())
                .bind(tps.iter().map(|t| t.1).collect::<Vec<_>>())
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                let rows: Vec<(String, i32, String, String)> = sqlx::query_as(
                    "SELECT topic, part, source, newest_event_time FROM reconcile_sources WHERE consumer_group = ?1",
                )
                .bind(group)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|(t, p, s, n)| (t, p, s, parse_sqlite_time(&n)))
                    .collect()
            }
        };
        for (t, p, s, n) in rows {
            if tps.iter().any(|x| x.0 == t && x.1 == p) {
                out.entry((t, p)).or_default().push((s, n));
            }
        }
        Ok(out)
    }

    /// The watermarks `group` reached: (flow, partition) → (watermark, what held it, when
    /// written).
    pub async fn watermarks(
        &self,
        group: &str,
    ) -> Result<Vec<(String, i32, DateTime<Utc>, String, DateTime<Utc>)>, StoreError> {
        Ok(match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    "SELECT flow, part, watermark, held_by, updated_at FROM reconcile_watermarks
                     WHERE consumer_group = $1 ORDER BY flow, part",
                )
                .bind(group)
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                let rows: Vec<(String, i32, String, String, String)> = sqlx::query_as(
                    "SELECT flow, part, watermark, held_by, updated_at FROM reconcile_watermarks
                     WHERE consumer_group = ?1 ORDER BY flow, part",
                )
                .bind(group)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .map(|(f, p, w, h, u)| (f, p, parse_sqlite_time(&w), h, parse_sqlite_time(&u)))
                    .collect()
            }
        })
    }

    /// Outcomes of these partitions not published yet (above their `published_through`),
    /// oldest first.
    pub async fn unpublished(
        &self,
        parts: &[i32],
        limit: i64,
    ) -> Result<Vec<StoredOutcome>, StoreError> {
        if parts.is_empty() {
            return Ok(vec![]);
        }
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            Option<DateTime<Utc>>,
            Option<i64>,
            String,
            Option<i32>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    // The first condition (the lowest mark of these partitions) bounds the scan
                    // of the primary key; the second is each row's own partition's mark.
                    "SELECT r.id, r.flow, r.flow_key, r.outcome, r.step, r.event_time, r.duration_ms, r.detail::text, r.part, r.detected_at
                     FROM reconciliation_results r
                     JOIN unnest($1::int[]) AS q(p) ON r.part = q.p
                     LEFT JOIN reconcile_outbox o ON o.part = r.part
                     WHERE r.id > (SELECT COALESCE(min(COALESCE(o2.published_through, 0)), 0)
                                   FROM unnest($1::int[]) AS q2(p) LEFT JOIN reconcile_outbox o2 ON o2.part = q2.p)
                       AND r.id > COALESCE(o.published_through, 0)
                     ORDER BY r.id LIMIT $2",
                )
                .bind(parts)
                .bind(limit)
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                let rows: Vec<SqliteOutcome> =
                    sqlx::query_as(
                        "SELECT r.id, r.flow, r.flow_key, r.outcome, r.step, r.event_time, r.duration_ms, r.detail, r.part, r.detected_at
                         FROM reconciliation_results r
                         LEFT JOIN reconcile_outbox o ON o.part = r.part
                         WHERE r.part IN (SELECT value FROM json_each(?1)) AND r.id > COALESCE(o.published_through, 0)
                         ORDER BY r.id LIMIT ?2",
                    )
                    .bind(serde_json::to_string(parts).unwrap_or_default())
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.into_iter()
                    .map(|r| {
                        (
                            r.0,
                            r.1,
                            r.2,
                            r.3,
                            r.4,
                            r.5.map(|t| parse_sqlite_time(&t)),
                            r.6,
                            r.7,
                            r.8,
                            parse_sqlite_time(&r.9),
                        )
                    })
                    .collect()
            }
        };
        Ok(rows
            .into_iter()
            .filter_map(
                |(
                    id,
                    flow,
                    key,
                    outcome,
                    step,
                    event_time,
                    duration_ms,
                    detail,
                    part,
                    detected_at,
                )| {
                    Some(StoredOutcome {
                        id,
                        row: ResultRow {
                            flow,
                            key,
                            outcome: OutcomeKind::parse(&outcome)?,
                            step,
                            event_time: event_time.unwrap_or(detected_at),
                            duration_ms,
                            detail: serde_json::from_str(&detail).unwrap_or_default(),
                            part: part.unwrap_or(0),
                        },
                        detected_at,
                    })
                },
            )
            .collect())
    }

    /// Every outcome of partition `part` up to id `through` was published (per partition; a
    /// mark never goes back).
    pub async fn advance_published(&self, marks: &[(i32, i64)]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        match self {
            ReconStore::Pg(pool) => pg::advance_published(pool, marks).await,
            ReconStore::Sqlite(pool) => sqlite::advance_published(pool, marks).await,
        }
    }

    /// Deletes up to `chunk` instances of these partitions not changed since `before` (state
    /// retention); returns how many.
    pub async fn prune_states(
        &self,
        parts: &[i32],
        before: DateTime<Utc>,
        chunk: i64,
    ) -> Result<u64, StoreError> {
        Ok(match self {
            ReconStore::Pg(pool) => sqlx::query(
                "DELETE FROM flow_state WHERE (flow, flow_key) IN (
                   SELECT flow, flow_key FROM flow_state WHERE part = ANY($1) AND updated_at < $2 LIMIT $3)",
            )
            .bind(parts)
            .bind(before)
            .bind(chunk)
            .execute(pool)
            .await?
            .rows_affected(),
            ReconStore::Sqlite(pool) => sqlx::query(
                "DELETE FROM flow_state WHERE rowid IN (
                   SELECT rowid FROM flow_state WHERE updated_at < ?1 LIMIT ?2)",
            )
            .bind(sqlite_time(before))
            .bind(chunk)
            .execute(pool)
            .await?
            .rows_affected(),
        })
    }

    /// Deletes up to `chunk` published outcome rows of `flow` on these partitions detected
    /// before `before` (results retention); returns how many.
    pub async fn prune_results(
        &self,
        flow: &str,
        parts: &[i32],
        before: DateTime<Utc>,
        chunk: i64,
    ) -> Result<u64, StoreError> {
        Ok(match self {
            ReconStore::Pg(pool) => sqlx::query(
                "DELETE FROM reconciliation_results WHERE id = ANY(ARRAY(
                   SELECT id FROM reconciliation_results
                   WHERE flow = $1 AND (part = ANY($2) OR part IS NULL) AND detected_at < $3
                     AND (part IS NULL OR id <= (SELECT o.published_through FROM reconcile_outbox o WHERE o.part = reconciliation_results.part))
                   ORDER BY detected_at LIMIT $4))",
            )
            .bind(flow)
            .bind(parts)
            .bind(before)
            .bind(chunk)
            .execute(pool)
            .await?
            .rows_affected(),
            ReconStore::Sqlite(pool) => sqlx::query(
                "DELETE FROM reconciliation_results WHERE id IN (
                   SELECT id FROM reconciliation_results
                   WHERE flow = ?1 AND detected_at < ?2
                     AND (part IS NULL OR id <= (SELECT o.published_through FROM reconcile_outbox o WHERE o.part = reconciliation_results.part))
                   ORDER BY detected_at LIMIT ?3)",
            )
            .bind(flow)
            .bind(sqlite_time(before))
            .bind(chunk)
            .execute(pool)
            .await?
            .rows_affected(),
        })
    }

    /// Every instance stored for partition `part`: (flow, key).
    pub async fn keys_of(&self, part: i32) -> Result<Vec<(String, String)>, StoreError> {
        Ok(match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as("SELECT flow, flow_key FROM flow_state WHERE part = $1")
                    .bind(part)
                    .fetch_all(pool)
                    .await?
            }
            ReconStore::Sqlite(pool) => {
                sqlx::query_as("SELECT flow, flow_key FROM flow_state WHERE part = ?1")
                    .bind(part)
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// Open instances (a deadline pending) per (flow, partition) on these partitions.
    pub async fn open_counts(
        &self,
        parts: &[i32],
    ) -> Result<HashMap<(String, i32), u64>, StoreError> {
        let rows: Vec<(String, i32, i64)> = match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    "SELECT flow, part, count(*) FROM flow_state
                     WHERE next_due IS NOT NULL AND part = ANY($1) GROUP BY flow, part",
                )
                .bind(parts)
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT flow, part, count(*) FROM flow_state
                     WHERE next_due IS NOT NULL GROUP BY flow, part",
                )
                .fetch_all(pool)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .filter(|r| parts.contains(&r.1))
            .map(|(f, p, n)| ((f, p), n.max(0) as u64))
            .collect())
    }
}

/// Times in the SQLite file: RFC 3339 in UTC with milliseconds (sorts as text).
pub fn sqlite_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Reads a time of the SQLite file (the Unix epoch when it is not one).
pub fn parse_sqlite_time(t: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.with_timezone(&Utc))
        .unwrap_or_default()
}
