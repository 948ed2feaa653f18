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

/// A write's claim on one fan-out topic-partition (`reconcile_progress`): the generation this
/// instance claimed it with, and how far event time had come in what the write counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    pub topic: String,
    pub part: i32,
    pub generation: i64,
    pub newest: Option<DateTime<Utc>>,
    pub next_offset: Option<i64>,
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

    /// Claims these topic-partitions for `group`'s instance that was just assigned them: raises
    /// their generation (a write still on its way from an earlier owner is then refused) and
    /// returns the newest event time stored. Call it before reading any of their states.
    pub async fn claim(&self, group: &str, tps: &[(String, i32)]) -> Result<Claimed, StoreError> {
        let mut tps = tps.to_vec();
        tps.sort();
        let mut out = HashMap::new();
        if tps.is_empty() {
            return Ok(out);
        }
        match self {
            ReconStore::Pg(pool) => {
                let topics: Vec<&str> = tps.iter().map(|t| t.0.as_str()).collect();
                let parts: Vec<i32> = tps.iter().map(|t| t.1).collect();
                let rows: Vec<(String, i32, Option<DateTime<Utc>>, i64)> = sqlx::query_as(
                    "INSERT INTO reconcile_progress (consumer_group, topic, part)
                     SELECT $1, t, p FROM unnest($2::text[], $3::int[]) AS k(t, p) ORDER BY t, p
                     ON CONFLICT (consumer_group, topic, part) DO UPDATE
                       SET generation = reconcile_progress.generation + 1, updated_at = now()
                     RETURNING topic, part, newest_event_time, generation",
                )
                .bind(group)
                .bind(&topics)
                .bind(&parts)
                .fetch_all(pool)
                .await?;
                for (t, p, newest, g) in rows {
                    out.insert((t, p), (newest, g));
                }
            }
            ReconStore::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for (t, p) in &tps {
                    let (newest, g): (Option<String>, i64) = sqlx::query_as(
                        "INSERT INTO reconcile_progress (consumer_group, topic, part) VALUES (?1, ?2, ?3)
                         ON CONFLICT (consumer_group, topic, part) DO UPDATE
                           SET generation = generation + 1,
                               updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         RETURNING newest_event_time, generation",
                    )
                    .bind(group)
                    .bind(t)
                    .bind(p)
                    .fetch_one(&mut *tx)
                    .await?;
                    let newest = newest
                        .and_then(|n| DateTime::parse_from_rfc3339(&n).ok())
                        .map(|n| n.with_timezone(&Utc));
                    out.insert((t.clone(), *p), (newest, g));
                }
                tx.commit().await?;
            }
        }
        Ok(out)
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
    ) -> Result<Vec<(String, i32)>, StoreError> {
        let taken = |claims: Vec<(String, i32, i64)>| -> Vec<(String, i32)> {
            fence
                .iter()
                .filter(|f| {
                    !claims
                        .iter()
                        .any(|(t, p, g)| *t == f.topic && *p == f.part && *g == f.generation)
                })
                .map(|f| (f.topic.clone(), f.part))
                .collect()
        };
        match self {
            ReconStore::Pg(pool) => {
                let mut tx = pool.begin().await?;
                if !fence.is_empty() {
                    let topics: Vec<&str> = fence.iter().map(|f| f.topic.as_str()).collect();
                    let parts: Vec<i32> = fence.iter().map(|f| f.part).collect();
                    // Locked in one order: a claim waits until this write is committed.
                    let claims: Vec<(String, i32, i64)> = sqlx::query_as(
                        "SELECT p.topic, p.part, p.generation FROM reconcile_progress p
                         JOIN unnest($2::text[], $3::int[]) AS k(t, pt) ON p.topic = k.t AND p.part = k.pt
                         WHERE p.consumer_group = $1 ORDER BY p.topic, p.part FOR UPDATE OF p",
                    )
                    .bind(group)
                    .bind(&topics)
                    .bind(&parts)
                    .fetch_all(&mut *tx)
                    .await?;
                    let taken = taken(claims);
                    if !taken.is_empty() {
                        tx.rollback().await?;
                        return Ok(taken);
                    }
                    let newest: Vec<Option<DateTime<Utc>>> =
                        fence.iter().map(|f| f.newest).collect();
                    let offsets: Vec<Option<i64>> = fence.iter().map(|f| f.next_offset).collect();
                    sqlx::query(
                        "UPDATE reconcile_progress p SET
                           newest_event_time = GREATEST(p.newest_event_time, r.n),
                           next_offset = COALESCE(r.o, p.next_offset), updated_at = now()
                         FROM unnest($2::text[], $3::int[], $4::timestamptz[], $5::bigint[]) AS r(t, pt, n, o)
                         WHERE p.consumer_group = $1 AND p.topic = r.t AND p.part = r.pt
                           AND (r.n IS NOT NULL OR r.o IS NOT NULL)",
                    )
                    .bind(group)
                    .bind(&topics)
                    .bind(&parts)
                    .bind(&newest)
                    .bind(&offsets)
                    .execute(&mut *tx)
                    .await?;
                }
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
                tx.commit().await?;
            }
            ReconStore::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                let mut claims = vec![];
                for f in fence {
                    let g: Option<i64> = sqlx::query_scalar(
                        "SELECT generation FROM reconcile_progress
                         WHERE consumer_group = ?1 AND topic = ?2 AND part = ?3",
                    )
                    .bind(group)
                    .bind(&f.topic)
                    .bind(f.part)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(g) = g {
                        claims.push((f.topic.clone(), f.part, g));
                    }
                }
                let taken = taken(claims);
                if !taken.is_empty() {
                    tx.rollback().await?;
                    return Ok(taken);
                }
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
                for f in fence {
                    sqlx::query(
                        "UPDATE reconcile_progress SET
                           newest_event_time = CASE WHEN newest_event_time IS NULL OR ?4 > newest_event_time
                                               THEN ?4 ELSE newest_event_time END,
                           next_offset = coalesce(?5, next_offset),
                           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                         WHERE consumer_group = ?1 AND topic = ?2 AND part = ?3
                           AND (?4 IS NOT NULL OR ?5 IS NOT NULL)",
                    )
                    .bind(group)
                    .bind(&f.topic)
                    .bind(f.part)
                    .bind(f.newest.map(sqlite_time))
                    .bind(f.next_offset)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(vec![])
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
