//! `helios status` as text: the screen rendered from what [`super::collect`] gathered.

use super::Status;

/// The screen.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let rate = |r: Option<f64>| r.map_or("-".to_string(), |v| format!("{v:.1}"));
    let _ = writeln!(
        o,
        "HELIOS status at {}  group {}  {}",
        s.at.format("%Y-%m-%d %H:%M:%S UTC"),
        s.consumer_group,
        if s.healthy { "HEALTHY" } else { "UNHEALTHY" }
    );
    let _ = writeln!(o, "\nDependencies");
    for d in &s.dependencies {
        let _ = writeln!(
            o,
            "  {:<16} {:<4} {:>8.1} ms  {}",
            d.name,
            if d.healthy { "ok" } else { "DOWN" },
            d.latency_ms,
            d.error.as_deref().unwrap_or("")
        );
    }
    if !s.breakers.is_empty() {
        let _ = writeln!(o, "\nCircuit breakers (processors' /metrics)");
        for b in &s.breakers {
            let _ = writeln!(
                o,
                "  {:<28} {:<16} {}",
                b.processor,
                b.dependency,
                if b.state == "closed" {
                    b.state.clone()
                } else {
                    b.state.to_uppercase()
                }
            );
        }
    }
    let _ = writeln!(o, "\nRaw partitions (lag {} in all)", s.total_lag);
    let _ = writeln!(
        o,
        "  {:<36} {:>4} {:>12} {:>12} {:>10} {:>9} {:>11}",
        "topic", "part", "end", "committed", "lag", "in/s", "done/s"
    );
    for p in &s.partitions {
        let _ = writeln!(
            o,
            "  {:<36} {:>4} {:>12} {:>12} {:>10} {:>9} {:>11}",
            p.topic,
            p.partition,
            p.end_offset,
            p.committed.map_or("-".into(), |c| c.to_string()),
            p.lag,
            rate(p.in_per_s),
            rate(p.committed_per_s)
        );
    }
    let _ = writeln!(o, "\nDead-lettered (read {} DLQ records)", s.dlq_scanned);
    if s.dlq.is_empty() {
        let _ = writeln!(o, "  nothing in the last 24 h");
    }
    for d in &s.dlq {
        let _ = writeln!(
            o,
            "  {:<28} {:<8} {:>6} last hour {:>8} last 24 h",
            d.reason, d.source, d.last_hour, d.last_24h
        );
    }
    let _ = writeln!(o, "\nSubscription handshakes (last 24 h)");
    if s.subscriptions.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for h in &s.subscriptions {
        let _ = writeln!(
            o,
            "  {:<6} {:<36} {:>4}x  last {}  {}",
            h.source,
            h.handshake,
            h.count,
            h.last_seen
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            h.subscription
        );
    }
    let _ = writeln!(o, "\nEvents stored, occurred in the last hour");
    if s.events_last_hour.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for (t, n) in &s.events_last_hour {
        let _ = writeln!(o, "  {t:<40} {n:>10}");
    }
    if !s.reconciler_partitions.is_empty() || !s.reconciliation.is_empty() {
        let _ = writeln!(
            o,
            "\nReconciliation  group {}  lag {}  open orders {}",
            s.reconciler_group,
            s.reconciler_lag,
            s.reconciliation_open.map_or("-".into(), |n| n.to_string())
        );
        if s.reconciliation.is_empty() {
            let _ = writeln!(o, "  no outcome in the last 24 h");
        }
        for r in &s.reconciliation {
            let unresolved = if r.outcome == "missing" || r.outcome == "orphan" {
                format!("{} unresolved", r.unresolved)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "  {:<24} {:<15} {:>6} last hour {:>8} last 24 h  {}",
                r.flow, r.outcome, r.last_hour, r.last_24h, unresolved
            );
        }
        if !s.event_time.is_empty() {
            let _ = writeln!(o, "  event time (what holds each partition's watermark):");
        }
        for e in &s.event_time {
            let _ = writeln!(
                o,
                "  {:<24} p{:<3} {}  {:>8.0}s behind  held by {}",
                e.flow,
                e.partition,
                e.watermark.format("%Y-%m-%d %H:%M:%S"),
                e.behind_s,
                e.held_by
            );
        }
    }
    let _ = writeln!(o, "\nLast replays");
    if s.replays.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for r in &s.replays {
        let _ = writeln!(
            o,
            "  {}  {}  {:<10} dedup {}",
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.replay_id,
            r.outcome,
            r.dedup_policy
        );
    }
    o
}
