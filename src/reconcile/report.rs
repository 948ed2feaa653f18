//! Reading the results: `helios reconcile report` (counts by flow and outcome, completion
//! times, the latest incidents) and `helios reconcile show <key>` (one order's timeline).

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use super::engine::{FlowState, OutcomeKind};

/// Counts and latest incidents since `since`.
pub async fn report(
    pool: &PgPool,
    flow: Option<&str>,
    since: DateTime<Utc>,
    outcome: Option<OutcomeKind>,
    limit: i64,
) -> anyhow::Result<Value> {
    let outcome = outcome.map(|o| o.as_str());
    let counts = sqlx::query(
        "SELECT flow, outcome, count(*)::bigint, count(*) FILTER (WHERE resolved_at IS NULL)::bigint,
                (percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms))::float8,
                (percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms))::float8
         FROM reconciliation_results
         WHERE detected_at >= $1 AND ($2::text IS NULL OR flow = $2) AND ($3::text IS NULL OR outcome = $3)
         GROUP BY flow, outcome ORDER BY flow, outcome",
    )
    .bind(since)
    .bind(flow)
    .bind(outcome)
    .fetch_all(pool)
    .await?;
    let counts: Vec<Value> = counts
        .iter()
        .map(|r| {
            json!({"flow": r.get::<String, _>(0), "outcome": r.get::<String, _>(1),
                "count": r.get::<i64, _>(2), "unresolved": r.get::<i64, _>(3),
                "duration_p50_ms": r.get::<Option<f64>, _>(4), "duration_p95_ms": r.get::<Option<f64>, _>(5)})
        })
        .collect();
    let incidents = sqlx::query(
        "SELECT flow, flow_key, outcome, step, event_time, detected_at, resolved_at, detail
         FROM reconciliation_results
         WHERE detected_at >= $1 AND ($2::text IS NULL OR flow = $2)
           AND (($3::text IS NULL AND outcome <> 'completed') OR outcome = $3)
         ORDER BY detected_at DESC, id DESC LIMIT $4",
    )
    .bind(since)
    .bind(flow)
    .bind(outcome)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let incidents: Vec<Value> = incidents
        .iter()
        .map(|r| {
            json!({"flow": r.get::<String, _>(0), "key": r.get::<String, _>(1),
                "outcome": r.get::<String, _>(2), "step": r.get::<String, _>(3),
                "event_time": r.get::<Option<DateTime<Utc>>, _>(4),
                "detected_at": r.get::<DateTime<Utc>, _>(5),
                "resolved_at": r.get::<Option<DateTime<Utc>>, _>(6),
                "detail": r.get::<Value, _>(7)})
        })
        .collect();
    // Orders by their final state: one order counts once, however many outcomes it had (a
    // `missing` superseded by `arrived_late` then `completed` is one completed order).
    let finals = sqlx::query(
        "SELECT flow,
                count(*) FILTER (WHERE state = 'ended')::bigint,
                count(*) FILTER (WHERE state = 'completed')::bigint,
                count(*) FILTER (WHERE state = 'missing')::bigint,
                count(*) FILTER (WHERE state = 'other')::bigint
         FROM (SELECT flow, flow_key,
                 CASE WHEN bool_or(outcome = 'ended') THEN 'ended'
                      WHEN bool_or(outcome = 'completed') THEN 'completed'
                      WHEN bool_or(outcome IN ('missing', 'orphan') AND resolved_at IS NULL) THEN 'missing'
                      ELSE 'other' END AS state
               FROM reconciliation_results
               WHERE detected_at >= $1 AND ($2::text IS NULL OR flow = $2)
               GROUP BY flow, flow_key) o
         GROUP BY flow ORDER BY flow",
    )
    .bind(since)
    .bind(flow)
    .fetch_all(pool)
    .await?;
    let open = sqlx::query(
        "SELECT s.flow, count(*)::bigint FROM flow_state s
         WHERE s.next_due IS NOT NULL AND ($1::text IS NULL OR s.flow = $1)
           AND NOT EXISTS (SELECT 1 FROM reconciliation_results r WHERE r.flow = s.flow AND r.flow_key = s.flow_key
                             AND r.outcome IN ('missing', 'orphan', 'completed', 'ended'))
         GROUP BY s.flow",
    )
    .bind(flow)
    .fetch_all(pool)
    .await?;
    let mut by_flow: std::collections::BTreeMap<String, Value> = Default::default();
    for r in &finals {
        by_flow.insert(
            r.get(0),
            json!({"ended": r.get::<i64, _>(1), "completed": r.get::<i64, _>(2),
                "missing": r.get::<i64, _>(3), "other": r.get::<i64, _>(4), "open": 0}),
        );
    }
    for r in &open {
        let e = by_flow.entry(r.get(0)).or_insert_with(
            || json!({"ended": 0, "completed": 0, "missing": 0, "other": 0, "open": 0}),
        );
        e["open"] = json!(r.get::<i64, _>(1));
    }
    let flows: Vec<Value> = by_flow
        .into_iter()
        .map(|(f, orders)| json!({"flow": f, "orders": orders}))
        .collect();
    Ok(json!({"since": since, "flows": flows, "counts": counts, "incidents": incidents}))
}

/// The report as text.
pub fn report_text(r: &Value) -> String {
    let mut out = format!(
        "Reconciliation since {}\n\n",
        r["since"].as_str().unwrap_or("")
    );
    out += &format!(
        "{:<24} {:<15} {:>8} {:>11} {:>12} {:>12}\n",
        "FLOW", "OUTCOME", "COUNT", "UNRESOLVED", "P50", "P95"
    );
    let counts = r["counts"].as_array().cloned().unwrap_or_default();
    if counts.is_empty() {
        out += "(no outcomes)\n";
    }
    let ms = |v: &Value| {
        v.as_f64()
            .map(|m| format!("{:.1}s", m / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    for c in &counts {
        let unresolved = match c["outcome"].as_str() {
            Some("missing") | Some("orphan") => c["unresolved"].to_string(),
            _ => "-".into(),
        };
        out += &format!(
            "{:<24} {:<15} {:>8} {:>11} {:>12} {:>12}\n",
            c["flow"].as_str().unwrap_or(""),
            c["outcome"].as_str().unwrap_or(""),
            c["count"],
            unresolved,
            ms(&c["duration_p50_ms"]),
            ms(&c["duration_p95_ms"]),
        );
    }
    let flows = r["flows"].as_array().cloned().unwrap_or_default();
    if !flows.is_empty() {
        out += &format!(
            "\n{:<24} {:>10} {:>8} {:>8} {:>8} {:>8}\n",
            "ORDERS BY FINAL STATE", "COMPLETED", "ENDED", "MISSING", "OPEN", "OTHER"
        );
        for f in &flows {
            let o = &f["orders"];
            out += &format!(
                "{:<24} {:>10} {:>8} {:>8} {:>8} {:>8}\n",
                f["flow"].as_str().unwrap_or(""),
                o["completed"],
                o["ended"],
                o["missing"],
                o["open"],
                o["other"],
            );
        }
    }
    let incidents = r["incidents"].as_array().cloned().unwrap_or_default();
    out += "\nLatest incidents\n";
    if incidents.is_empty() {
        out += "(none)\n";
    }
    for i in &incidents {
        let resolved = if i["resolved_at"].is_null() {
            ""
        } else {
            " (resolved)"
        };
        out += &format!(
            "{}  {:<15} {:<20} {:<24} {}{}\n",
            i["detected_at"].as_str().unwrap_or(""),
            i["outcome"].as_str().unwrap_or(""),
            i["step"].as_str().unwrap_or(""),
            crate::model::text::bounded(i["key"].as_str().unwrap_or(""), 40),
            i["flow"].as_str().unwrap_or(""),
            resolved,
        );
    }
    out
}

/// One key's timeline in every flow that follows it.
pub async fn show(pool: &PgPool, key: &str, flow: Option<&str>) -> anyhow::Result<Value> {
    let rows = sqlx::query(
        "SELECT flow, part, state::text, next_due, completed, created_at, updated_at FROM flow_state
         WHERE flow_key = $1 AND ($2::text IS NULL OR flow = $2) ORDER BY flow",
    )
    .bind(key)
    .bind(flow)
    .fetch_all(pool)
    .await?;
    let mut flows = vec![];
    for r in rows {
        let name: String = r.get(0);
        let state: FlowState = serde_json::from_str(r.get::<&str, _>(2))?;
        let mut steps = state.sightings.clone();
        steps.sort_by_key(|s| s.occurred_at);
        let mut prev: Option<DateTime<Utc>> = None;
        let timeline: Vec<Value> = steps
            .iter()
            .map(|s| {
                let gap = prev.map(|p| (s.occurred_at - p).num_milliseconds());
                prev = Some(s.occurred_at);
                json!({"step": s.step, "cloud": s.source, "event_id": s.event_id,
                    "occurred_at": s.occurred_at, "untrusted_occurred_at": s.untrusted_occurred_at,
                    "gap_ms": gap, "raw": s.raw,
                    "fanout": format!("{}/{}/{}", s.topic, s.partition, s.offset), "seen_at": s.seen_at})
            })
            .collect();
        let results = sqlx::query(
            "SELECT outcome, step, event_time, duration_ms, detected_at, resolved_at FROM reconciliation_results
             WHERE flow = $1 AND flow_key = $2 ORDER BY detected_at, id",
        )
        .bind(&name)
        .bind(key)
        .fetch_all(pool)
        .await?;
        let results: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({"outcome": r.get::<String, _>(0), "step": r.get::<String, _>(1),
                    "event_time": r.get::<Option<DateTime<Utc>>, _>(2), "duration_ms": r.get::<Option<i64>, _>(3),
                    "detected_at": r.get::<DateTime<Utc>, _>(4), "resolved_at": r.get::<Option<DateTime<Utc>>, _>(5)})
            })
            .collect();
        flows.push(
            json!({"flow": name, "partition": r.get::<i32, _>(1), "completed": r.get::<bool, _>(4),
            "next_deadline": r.get::<Option<DateTime<Utc>>, _>(3), "missing": state.missing,
            "timeline": timeline, "outcomes": results}),
        );
    }
    Ok(json!({"key": key, "flows": flows}))
}

/// The timeline as text.
pub fn show_text(v: &Value) -> String {
    let key = v["key"].as_str().unwrap_or("");
    let flows = v["flows"].as_array().cloned().unwrap_or_default();
    if flows.is_empty() {
        return format!("No flow has seen `{key}`.\n");
    }
    let mut out = String::new();
    for f in &flows {
        out += &format!(
            "{} / {}  ({}; partition {})\n",
            f["flow"].as_str().unwrap_or(""),
            key,
            if f["completed"].as_bool() == Some(true) {
                "completed"
            } else {
                "open"
            },
            f["partition"]
        );
        out += &format!(
            "  {:<26} {:<20} {:<7} {:>10}  {:<28} {}\n",
            "OCCURRED", "STEP", "CLOUD", "GAP", "RAW RECORD", "EVENT ID"
        );
        for s in f["timeline"].as_array().cloned().unwrap_or_default() {
            let gap = s["gap_ms"]
                .as_i64()
                .map(|g| format!("+{:.1}s", g as f64 / 1000.0))
                .unwrap_or_default();
            out += &format!(
                "  {:<26} {:<20} {:<7} {:>10}  {:<28} {}\n",
                s["occurred_at"].as_str().unwrap_or(""),
                s["step"].as_str().unwrap_or(""),
                s["cloud"].as_str().unwrap_or(""),
                gap,
                s["raw"].as_str().unwrap_or("-"),
                crate::model::text::bounded(s["event_id"].as_str().unwrap_or(""), 48),
            );
            if let Some(u) = s["untrusted_occurred_at"].as_str() {
                out += &format!(
                    "  {:<26} (the event said {u}: more than max_clock_skew ahead of its reception, counted at reception)\n",
                    ""
                );
            }
        }
        for m in f["missing"].as_array().cloned().unwrap_or_default() {
            out += &format!("  missing: {}\n", m.as_str().unwrap_or(""));
        }
        if let Some(d) = f["next_deadline"].as_str() {
            out += &format!("  next deadline: {d}\n");
        }
        for o in f["outcomes"].as_array().cloned().unwrap_or_default() {
            let step = o["step"].as_str().unwrap_or("");
            let dur = o["duration_ms"]
                .as_i64()
                .map(|d| format!(" in {:.1}s", d as f64 / 1000.0))
                .unwrap_or_default();
            let resolved = if o["resolved_at"].is_null() {
                ""
            } else {
                " (resolved)"
            };
            out += &format!(
                "  outcome: {}{}{}{}  (detected {})\n",
                o["outcome"].as_str().unwrap_or(""),
                if step.is_empty() {
                    String::new()
                } else {
                    format!(" {step}")
                },
                dur,
                resolved,
                o["detected_at"].as_str().unwrap_or("")
            );
        }
        out += "\n";
    }
    match &v["dlq"] {
        Value::Array(found) if found.is_empty() => {
            out += &format!("DLQ: no recent dead-lettered record mentions `{key}`.\n");
        }
        Value::Array(found) => {
            out += &format!(
                "DLQ: {} dead-lettered record(s) mention `{key}` (a missing step may be there; `helios dlq` can redrive it):\n",
                found.len()
            );
            for d in found {
                out += &format!(
                    "  {}  {}  {}  {}\n",
                    d["record"].as_str().unwrap_or(""),
                    d["reason"].as_str().unwrap_or("-"),
                    d["failed_at"].as_str().unwrap_or(""),
                    d["detail"].as_str().unwrap_or("")
                );
            }
        }
        Value::Object(e) => {
            out += &format!(
                "DLQ not searched: {}\n",
                e.get("error").and_then(Value::as_str).unwrap_or("")
            );
        }
        _ => {}
    }
    out
}
