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
                    "SELECT s.flow, s.flow_key, s.part, s.state FROM flow_state s
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
        let mut inserted = vec![];
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
                        return Ok(Saved { taken, inserted });
                    }
                    let newest: Vec<Option<DateTime<Utc>>> =
                        fence.iter().map(|f| f.newest()).collect();
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
                    let per: Vec<(&str, i32, &str, DateTime<Utc>)> = fence
                        .iter()
                        .flat_map(|f| {
                            f.sources
                                .iter()
                                .map(move |(s, t)| (f.topic.as_str(), f.part, s.as_str(), *t))
                        })
                        .collect();
                    if !per.is_empty() {
                        sqlx::query(
                            "INSERT INTO reconcile_sources AS s (consumer_group, topic, part, source, newest_event_time)
                             SELECT $1, t, p, src, n FROM unnest($2::text[], $3::int[], $4::text[], $5::timestamptz[]) AS r(t, p, src, n)
                             ORDER BY t, p, src
                             ON CONFLICT (consumer_group, topic, part, source) DO UPDATE
                               SET newest_event_time = GREATEST(s.newest_event_time, EXCLUDED.newest_event_time), updated_at = now()",
                        )
                        .bind(group)
                        .bind(per.iter().map(|x| x.0).collect::<Vec<_>>())
                        .bind(per.iter().map(|x| x.1).collect::<Vec<_>>())
                        .bind(per.iter().map(|x| x.2).collect::<Vec<_>>())
                        .bind(per.iter().map(|x| x.3).collect::<Vec<_>>())
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                if !marks.is_empty() {
                    sqlx::query(
                        "INSERT INTO reconcile_watermarks AS w (consumer_group, flow, part, watermark, held_by)
                         SELECT $1, f, p, m, h FROM unnest($2::text[], $3::int[], $4::timestamptz[], $5::text[]) AS r(f, p, m, h)
                         ORDER BY f, p
                         ON CONFLICT (consumer_group, flow, part) DO UPDATE
                           SET watermark = GREATEST(w.watermark, EXCLUDED.watermark), held_by = EXCLUDED.held_by, updated_at = now()",
                    )
                    .bind(group)
                    .bind(marks.iter().map(|m| m.0.clone()).collect::<Vec<_>>())
                    .bind(marks.iter().map(|m| m.1).collect::<Vec<_>>())
                    .bind(marks.iter().map(|m| m.2).collect::<Vec<_>>())
                    .bind(marks.iter().map(|m| m.3.clone()).collect::<Vec<_>>())
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
                         SELECT f, k, p, s, d, c
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
                    let parts: Vec<i32> = results.iter().map(|r| r.part).collect();
                    let rows: Vec<(i64, String, String, String, String, DateTime<Utc>)> = sqlx::query_as(
                        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, event_time, duration_ms, detail, part)
                         SELECT f, k, o, s, t, d, x::jsonb, p
                         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::text[], $8::int[]) AS r(f, k, o, s, t, d, x, p)
                         ON CONFLICT (flow, flow_key, outcome, step) DO NOTHING
                         RETURNING id, flow, flow_key, outcome, step, detected_at",
                    )
                    .bind(col(|r| r.flow.clone()))
                    .bind(col(|r| r.key.clone()))
                    .bind(col(|r| r.outcome.as_str().to_string()))
                    .bind(col(|r| r.step.clone()))
                    .bind(times)
                    .bind(durations)
                    .bind(col(|r| r.detail.to_string()))
                    .bind(parts)
                    .fetch_all(&mut *tx)
                    .await?;
                    // Back to the rows written, by their unique key (not by a scan per row).
                    let by_key: HashMap<(&str, &str, &str, &str), &ResultRow> = results
                        .iter()
                        .map(|r| {
                            (
                                (
                                    r.flow.as_str(),
                                    r.key.as_str(),
                                    r.outcome.as_str(),
                                    r.step.as_str(),
                                ),
                                r,
                            )
                        })
                        .collect();
                    for (id, f, k, o, st, detected_at) in rows {
                        if let Some(r) =
                            by_key.get(&(f.as_str(), k.as_str(), o.as_str(), st.as_str()))
                        {
                            inserted.push(StoredOutcome {
                                id,
                                row: (*r).clone(),
                                detected_at,
                            });
                        }
                    }
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
                    return Ok(Saved { taken, inserted });
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
                    let row: Option<(i64, String)> = sqlx::query_as(
                        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, event_time, duration_ms, detail, part)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING RETURNING id, detected_at",
                    )
                    .bind(&r.flow)
                    .bind(&r.key)
                    .bind(r.outcome.as_str())
                    .bind(&r.step)
                    .bind(sqlite_time(r.event_time))
                    .bind(r.duration_ms)
                    .bind(r.detail.to_string())
                    .bind(r.part)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some((id, at)) = row {
                        inserted.push(StoredOutcome {
                            id,
                            row: r.clone(),
                            detected_at: parse_sqlite_time(&at),
                        });
                    }
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
                    .bind(f.newest().map(sqlite_time))
                    .bind(f.next_offset)
                    .execute(&mut *tx)
                    .await?;
                    for (source, at) in &f.sources {
                        sqlx::query(
                            "INSERT INTO reconcile_sources (consumer_group, topic, part, source, newest_event_time)
                             VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT (consumer_group, topic, part, source) DO UPDATE SET
                               newest_event_time = max(newest_event_time, excluded.newest_event_time),
                               updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                        )
                        .bind(group)
                        .bind(&f.topic)
                        .bind(f.part)
                        .bind(source)
                        .bind(sqlite_time(*at))
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                for (flow, part, wm, held) in marks {
                    sqlx::query(
                        "INSERT INTO reconcile_watermarks (consumer_group, flow, part, watermark, held_by)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (consumer_group, flow, part) DO UPDATE SET
                           watermark = max(watermark, excluded.watermark), held_by = excluded.held_by,
                           updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                    )
                    .bind(group)
                    .bind(flow)
                    .bind(part)
                    .bind(sqlite_time(*wm))
                    .bind(held)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(Saved {
            taken: vec![],
            inserted,
        })
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
        let parts: Vec<i32> = marks.iter().map(|m| m.0).collect();
        let through: Vec<i64> = marks.iter().map(|m| m.1).collect();
        match self {
            ReconStore::Pg(pool) => {
                sqlx::query(
                    "INSERT INTO reconcile_outbox AS o (part, published_through)
                     SELECT p, t FROM unnest($1::int[], $2::bigint[]) AS m(p, t) ORDER BY p
                     ON CONFLICT (part) DO UPDATE
                       SET published_through = GREATEST(o.published_through, EXCLUDED.published_through), updated_at = now()",
                )
                .bind(&parts)
                .bind(&through)
                .execute(pool)
                .await?;
            }
            ReconStore::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for (p, t) in marks {
                    sqlx::query(
                        "INSERT INTO reconcile_outbox (part, published_through) VALUES (?1, ?2)
                         ON CONFLICT (part) DO UPDATE
                           SET published_through = max(published_through, excluded.published_through),
                               updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                    )
                    .bind(p)
                    .bind(t)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
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
