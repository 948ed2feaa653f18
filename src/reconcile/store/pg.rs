//! The reconciler's tables on PostgreSQL: the operations of [`super::ReconStore`] that are more
//! than one statement (the one-statement queries stay beside their SQLite twins in `mod.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;

use super::{
    keyed, taken, Claimed, Fence, Keyed, Mark, Resolution, ResultRow, Saved, StateRow,
    StoredOutcome,
};
use crate::db::StoreError;

pub(super) async fn load(pool: &PgPool, keys: &[(String, String)]) -> Result<Keyed, StoreError> {
    let flows: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ks: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let rows: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT s.flow, s.flow_key, s.part, s.state FROM flow_state s
         JOIN unnest($1::text[], $2::text[]) AS k(flow, flow_key)
           ON s.flow = k.flow AND s.flow_key = k.flow_key",
    )
    .bind(&flows)
    .bind(&ks)
    .fetch_all(pool)
    .await?;
    keyed(rows)
}

pub(super) async fn claim(
    pool: &PgPool,
    group: &str,
    tps: &[(String, i32)],
) -> Result<Claimed, StoreError> {
    let mut out = HashMap::new();
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
    Ok(out)
}

pub(super) async fn save(
    pool: &PgPool,
    states: &[StateRow],
    results: &[ResultRow],
    resolved: &[Resolution],
    group: &str,
    fence: &[Fence],
    marks: &[Mark],
) -> Result<Saved, StoreError> {
    let mut inserted = vec![];
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
        let taken = taken(fence, claims);
        if !taken.is_empty() {
            tx.rollback().await?;
            return Ok(Saved { taken, inserted });
        }
        let newest: Vec<Option<DateTime<Utc>>> = fence.iter().map(|f| f.newest()).collect();
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
        let dues: Vec<Option<DateTime<Utc>>> = states.iter().map(|s| s.next_due).collect();
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
        let col = |f: fn(&ResultRow) -> String| results.iter().map(f).collect::<Vec<_>>();
        let times: Vec<DateTime<Utc>> = results.iter().map(|r| r.event_time).collect();
        let durations: Vec<Option<i64>> = results.iter().map(|r| r.duration_ms).collect();
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
            if let Some(r) = by_key.get(&(f.as_str(), k.as_str(), o.as_str(), st.as_str())) {
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
    Ok(Saved {
        taken: vec![],
        inserted,
    })
}

pub(super) async fn advance_published(
    pool: &PgPool,
    marks: &[(i32, i64)],
) -> Result<(), StoreError> {
    let parts: Vec<i32> = marks.iter().map(|m| m.0).collect();
    let through: Vec<i64> = marks.iter().map(|m| m.1).collect();
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
    Ok(())
}
