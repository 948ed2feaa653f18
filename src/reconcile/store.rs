//! Where the reconciler keeps its state (`flow_state`) and its results
//! (`reconciliation_results`): PostgreSQL in production, the demo's SQLite file embedded. A
//! batch's state changes, results and resolutions are written in one transaction; results are
//! idempotent on (flow, key, outcome, step).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::engine::{FlowState, OutcomeKind};
use crate::db::StoreError;

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
}

/// An earlier outcome now resolved.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub flow: String,
    pub key: String,
    pub outcome: OutcomeKind,
    pub step: String,
}

/// How far event time had come on one fan-out topic-partition, as of the offset committed
/// with it (`reconcile_progress`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressRow {
    pub topic: String,
    pub part: i32,
    pub newest: DateTime<Utc>,
    pub next_offset: i64,
}

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

impl ReconStore {
    /// The stored states of these (flow, key) pairs.
    pub async fn load(&self, keys: &[(String, String)]) -> Result<Keyed, StoreError> {
        let mut out = HashMap::new();
        if keys.is_empty() {
            return Ok(out);
        }
        let flows: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let ks: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        match self {
            ReconStore::Pg(pool) => {
                let rows = sqlx::query(
                    "SELECT s.flow, s.flow_key, s.part, s.state::text FROM flow_state s
                     JOIN unnest($1::text[], $2::text[]) AS k(flow, flow_key)
                       ON s.flow = k.flow AND s.flow_key = k.flow_key",
                )
                .bind(&flows)
                .bind(&ks)
                .fetch_all(pool)
                .await?;
                for r in rows {
                    let (f, k): (String, String) = (r.get(0), r.get(1));
                    let st = decode(&f, &k, r.get::<&str, _>(3))?;
                    out.insert((f, k), (r.get(2), st));
                }
            }
            ReconStore::Sqlite(pool) => {
                let pairs = serde_json::to_string(&keys).unwrap_or_default();
                let rows = sqlx::query(
                    "SELECT s.flow, s.flow_key, s.part, s.state FROM flow_state s
                     JOIN json_each(?1) k ON s.flow = json_extract(k.value, '$[0]')
                       AND s.flow_key = json_extract(k.value, '$[1]')",
                )
                .bind(pairs)
                .fetch_all(pool)
                .await?;
                for r in rows {
                    let (f, k): (String, String) = (r.get(0), r.get(1));
                    let st = decode(&f, &k, r.get::<&str, _>(3))?;
                    out.insert((f, k), (r.get(2), st));
                }
            }
        }
        Ok(out)
    }

    /// The newest event time stored by `group` for these topic-partitions.
    pub async fn load_progress(
        &self,
        group: &str,
        tps: &[(String, i32)],
    ) -> Result<HashMap<(String, i32), DateTime<Utc>>, StoreError> {
        if tps.is_empty() {
            return Ok(HashMap::new());
        }
        let topics: Vec<&str> = tps.iter().map(|t| t.0.as_str()).collect();
        let parts: Vec<i32> = tps.iter().map(|t| t.1).collect();
        let rows: Vec<(String, i32, DateTime<Utc>)> = match self {
            ReconStore::Pg(pool) => {
                sqlx::query_as(
                    "SELECT p.topic, p.part, p.newest_event_time FROM reconcile_progress p
                     JOIN unnest($2::text[], $3::int[]) AS k(topic, part)
                       ON p.topic = k.topic AND p.part = k.part
                     WHERE p.consumer_group = $1",
                )
                .bind(group)
                .bind(&topics)
                .bind(&parts)
                .fetch_all(pool)
                .await?
            }
            ReconStore::Sqlite(pool) => {
                let rows: Vec<(String, i32, String)> = sqlx::query_as(
                    "SELECT topic, part, newest_event_time FROM reconcile_progress
                     WHERE consumer_group = ?1",
                )
                .bind(group)
                .fetch_all(pool)
                .await?;
                rows.into_iter()
                    .filter_map(|(t, p, at)| {
                        let at = DateTime::parse_from_rfc3339(&at).ok()?.with_timezone(&Utc);
                        Some((t, p, at))
                    })
                    .collect()
            }
        };
        Ok(rows
            .into_iter()
            .filter(|(t, p, _)| tps.iter().any(|k| k.0 == *t && k.1 == *p))
            .map(|(t, p, at)| ((t, p), at))
            .collect())
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
                    "SELECT s.flow_key, s.part, s.state::text, s.next_due FROM flow_state s
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
    /// is), resolutions and `group`'s event-time progress in one transaction.
    pub async fn save(
        &self,
        states: &[StateRow],
        results: &[ResultRow],
        resolved: &[Resolution],
        group: &str,
        progress: &[ProgressRow],
    ) -> Result<(), StoreError> {
        match self {
            ReconStore::Pg(pool) => {
                let mut tx = pool.begin().await?;
                if !states.is_empty() {
                    let col = |f: fn(&StateRow) -> String| states.iter().map(f).collect::<Vec<_>>();
                    let parts: Vec<i32> = states.iter().map(|s| s.part).collect();
                    let dues: Vec<Option<DateTime<Utc>>> =
                        states.iter().map(|s| s.next_due).collect();
                    let done: Vec<bool> = states.iter().map(|s| s.completed).collect();
                    sqlx::query(
                        "INSERT INTO flow_state (flow, flow_key, part, state, next_due, completed)
                         SELECT f, k, p, s::jsonb, d, c
                         FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::timestamptz[], $6::bool[]) AS t(f, k, p, s, d, c)
                         ON CONFLICT (flow, flow_key) DO UPDATE SET part = EXCLUDED.part, state = EXCLUDED.state,
                           next_due = EXCLUDED.next_due, completed = EXCLUDED.completed, updated_at = now()",
                    )
                    .bind(col(|s| s.flow.clone()))
                    .bind(col(|s| s.key.clone()))
                    .bind(parts)
                    .bind(col(|s| serde_json::to_string(&s.state).unwrap_or_default()))
                    .bind(dues)
                    .bind(done)
                    .execute(&mut *tx)
                    .await?;
                }
                if !results.is_empty() {
                    let col =
                        |f: fn(&ResultRow) -> String| results.iter().map(f).collect::<Vec<_>>();
                    let times: Vec<DateTime<Utc>> = results.iter().map(|r| r.event_time).collect();
                    let durations: Vec<Option<i64>> =
                        results.iter().map(|r| r.duration_ms).collect();
                    sqlx::query(
                        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, event_time, duration_ms, detail)
                         SELECT f, k, o, s, t, d, x::jsonb
                         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::text[]) AS r(f, k, o, s, t, d, x)
                         ON CONFLICT (flow, flow_key, outcome, step) DO NOTHING",
                    )
                    .bind(col(|r| r.flow.clone()))
                    .bind(col(|r| r.key.clone()))
                    .bind(col(|r| r.outcome.as_str().to_string()))
                    .bind(col(|r| r.step.clone()))
                    .bind(times)
                    .bind(durations)
                    .bind(col(|r| r.detail.to_string()))
                    .execute(&mut *tx)
                    .await?;
                }
                for r in resolved {
                    sqlx::query(
                        "UPDATE reconciliation_results SET resolved_at = now()
                         WHERE flow = $1 AND flow_key = $2 AND outcome = $3 AND step = $4 AND resolved_at IS NULL",
                    )
                    .bind(&r.flow)
                    .bind(&r.key)
                    .bind(r.outcome.as_str())
                    .bind(&r.step)
                    .execute(&mut *tx)
                    .await?;
                }
                if !progress.is_empty() {
                    let topics: Vec<&str> = progress.iter().map(|r| r.topic.as_str()).collect();
                    let parts: Vec<i32> = progress.iter().map(|r| r.part).collect();
                    let newest: Vec<DateTime<Utc>> = progress.iter().map(|r| r.newest).collect();
                    let offsets: Vec<i64> = progress.iter().map(|r| r.next_offset).collect();
                    sqlx::query(
                        "INSERT INTO reconcile_progress (consumer_group, topic, part, newest_event_time, next_offset)
                         SELECT $1, t, p, n, o FROM unnest($2::text[], $3::int[], $4::timestamptz[], $5::bigint[]) AS r(t, p, n, o)
                         ON CONFLICT (consumer_group, topic, part) DO UPDATE SET
                           newest_event_time = GREATEST(reconcile_progress.newest_event_time, EXCLUDED.newest_event_time),
                           next_offset = EXCLUDED.next_offset, updated_at = now()",
                    )
                    .bind(group)
                    .bind(&topics)
                    .bind(&parts)
                    .bind(&newest)
                    .bind(&offsets)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
            ReconStore::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for s in states {
                    sqlx::query(
                        "INSERT INTO flow_state (flow, flow_key, part, state, next_due, completed)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (flow, flow_key) DO UPDATE SET part = excluded.part, state = excluded.state,
                           next_due = excluded.next_due, completed = excluded.completed,
                           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                    )
                    .bind(&s.flow)
                    .bind(&s.key)
                    .bind(s.part)
                    .bind(serde_json::to_string(&s.state).unwrap_or_default())
                    .bind(s.next_due.map(sqlite_time))
                    .bind(s.completed)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in results {
                    sqlx::query(
                        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, event_time, duration_ms, detail)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                    )
                    .bind(&r.flow)
                    .bind(&r.key)
                    .bind(r.outcome.as_str())
                    .bind(&r.step)
                    .bind(sqlite_time(r.event_time))
                    .bind(r.duration_ms)
                    .bind(r.detail.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
                for r in resolved {
                    sqlx::query(
                        "UPDATE reconciliation_results SET resolved_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         WHERE flow = ?1 AND flow_key = ?2 AND outcome = ?3 AND step = ?4 AND resolved_at IS NULL",
                    )
                    .bind(&r.flow)
                    .bind(&r.key)
                    .bind(r.outcome.as_str())
                    .bind(&r.step)
                    .execute(&mut *tx)
                    .await?;
                }
                for r in progress {
                    sqlx::query(
                        "INSERT INTO reconcile_progress (consumer_group, topic, part, newest_event_time, next_offset)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (consumer_group, topic, part) DO UPDATE SET
                           newest_event_time = max(newest_event_time, excluded.newest_event_time),
                           next_offset = excluded.next_offset,
                           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                    )
                    .bind(group)
                    .bind(&r.topic)
                    .bind(r.part)
                    .bind(sqlite_time(r.newest))
                    .bind(r.next_offset)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Deletes instances of these partitions not changed since `before` (state retention).
    pub async fn prune(&self, parts: &[i32], before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(match self {
            ReconStore::Pg(pool) => {
                sqlx::query("DELETE FROM flow_state WHERE part = ANY($1) AND updated_at < $2")
                    .bind(parts)
                    .bind(before)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            ReconStore::Sqlite(pool) => sqlx::query("DELETE FROM flow_state WHERE updated_at < ?1")
                .bind(sqlite_time(before))
                .execute(pool)
                .await?
                .rows_affected(),
        })
    }
}

/// Times in the SQLite file: RFC 3339 in UTC with milliseconds (sorts as text).
pub fn sqlite_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
