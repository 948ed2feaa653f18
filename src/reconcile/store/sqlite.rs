//! The reconciler's tables in the demo's SQLite file: the operations of [`super::ReconStore`]
//! that are more than one statement (the one-statement queries stay beside their PostgreSQL
//! twins in `mod.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqlitePool;

use super::{
    keyed, parse_sqlite_time, sqlite_time, taken, Claimed, Fence, Keyed, Mark, Resolution,
    ResultRow, Saved, StateRow, StoredOutcome,
};
use crate::db::StoreError;

pub(super) async fn load(
    pool: &SqlitePool,
    keys: &[(String, String)],
) -> Result<Keyed, StoreError> {
    let pairs = serde_json::to_string(&keys).unwrap_or_default();
    let rows: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT s.flow, s.flow_key, s.part, s.state FROM flow_state s
         JOIN json_each(?1) k ON s.flow = json_extract(k.value, '$[0]')
           AND s.flow_key = json_extract(k.value, '$[1]')",
    )
    .bind(pairs)
    .fetch_all(pool)
    .await?;
    keyed(rows)
}

pub(super) async fn claim(
    pool: &SqlitePool,
    group: &str,
    tps: &[(String, i32)],
) -> Result<Claimed, StoreError> {
    let mut out = HashMap::new();
    let mut tx = pool.begin().await?;
    for (t, p) in tps {
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
    Ok(out)
}

pub(super) async fn save(
    pool: &SqlitePool,
    states: &[StateRow],
    results: &[ResultRow],
    resolved: &[Resolution],
    group: &str,
    fence: &[Fence],
    marks: &[Mark],
) -> Result<Saved, StoreError> {
    let mut inserted = vec![];
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
    let taken = taken(fence, claims);
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
    Ok(Saved {
        taken: vec![],
        inserted,
    })
}

pub(super) async fn advance_published(
    pool: &SqlitePool,
    marks: &[(i32, i64)],
) -> Result<(), StoreError> {
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
    Ok(())
}
