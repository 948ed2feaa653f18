//! What a chaos run must show afterwards (and, for commits, while it runs):
//! - every acknowledged push is stored exactly once in PostgreSQL and is on its topic; every
//!   copy of an event on the topic comes from the raw record whose row PostgreSQL kept (a crash
//!   may fan the same raw record out again, a redelivery never shows up twice);
//! - per order, no later event overtook an earlier one on the fan-out topic (where their raw
//!   records were in order on one partition);
//! - no offset a processor committed was beyond a raw record that had not resolved then (the
//!   commit samples, taken while the run went on);
//! - and progress: every acknowledged event arrives after the last fault heals.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::load::Ledger;
use super::rig::Rig;
use crate::common::*;

/// Raw records with a row of their own: `(topic, partition)` → offsets.
pub type Stored = HashMap<(String, i32), HashSet<i64>>;

/// A processor's committed offsets at one moment, with what PostgreSQL held right after.
pub struct CommitSample {
    pub member: String,
    pub commits: Vec<(String, i32, i64)>,
    pub stored: Stored,
}

/// Reads the committed-offset gauges of every running processor, then the stored lineage.
pub async fn sample_commits(rig: &Rig) -> Vec<CommitSample> {
    let mut out = vec![];
    for m in rig.processors.iter().filter(|m| m.running()) {
        let Ok(resp) = reqwest::get(format!("http://{}/metrics", m.metrics)).await else {
            continue;
        };
        let text = resp.text().await.unwrap_or_default();
        let commits: Vec<(String, i32, i64)> = text
            .lines()
            .filter(|l| l.starts_with("helios_processor_committed_offset{"))
            .filter_map(|l| {
                let topic = label(l, "topic")?;
                let partition = label(l, "partition")?.parse().ok()?;
                let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
                Some((topic, partition, v as i64))
            })
            .collect();
        if commits.is_empty() {
            continue;
        }
        if let Some(stored) = stored_lineage(&rig.pool).await {
            out.push(CommitSample {
                member: m.name.clone(),
                commits,
                stored,
            });
        }
    }
    out
}

fn label(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// The raw record of every stored row (`None` while the table is away).
pub async fn stored_lineage(pool: &sqlx::PgPool) -> Option<Stored> {
    let rows: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT raw_topic, raw_partition, raw_offset FROM events")
            .fetch_all(pool)
            .await
            .ok()?;
    let mut s: Stored = HashMap::new();
    for (t, p, o) in rows {
        s.entry((t, p)).or_default().insert(o);
    }
    Some(s)
}

/// What the run produced, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    pub sent: usize,
    pub acked: usize,
    pub rows: usize,
    pub fanout_records: usize,
    /// Extra copies on the topic (the same raw record fanned out again after a crash).
    pub fanout_copies: usize,
    pub order_pairs_checked: usize,
    pub commit_samples: usize,
}

/// `(source, event_id, raw_topic, raw_partition, raw_offset, order_id, seq)` of a stored row.
type RowTuple = (
    String,
    String,
    String,
    i32,
    i64,
    Option<String>,
    Option<i32>,
);

/// The events of one order: their keys and rows.
type OrderEvents<'a> = Vec<(&'a (String, String), &'a Row)>;

/// A stored event: its raw record, order and step.
struct Row {
    lineage: (String, i32, i64),
    order: String,
    seq: i32,
}

/// Waits for every acknowledged event to be stored and fanned out (`recover`: the stall
/// deadline), then checks everything the module docs list. Err: what broke.
pub async fn verify(
    rig: &Rig,
    ledger: &Ledger,
    samples: &[CommitSample],
    recover: Duration,
) -> Result<Outcome, String> {
    let acked: HashSet<(String, String)> = ledger.acked().map(|(k, _)| k.clone()).collect();
    let mut out = Outcome {
        sent: ledger.events.len(),
        acked: acked.len(),
        commit_samples: samples.len(),
        ..Outcome::default()
    };
    // Progress: every acknowledged event stored within `recover`.
    let deadline = Instant::now() + recover;
    let rows = loop {
        let rows: Vec<RowTuple> = sqlx::query_as(
            "SELECT source, event_id, raw_topic, raw_partition, raw_offset, data->>'order_id', (data->>'seq')::int FROM events",
        )
        .fetch_all(&rig.pool)
        .await
        .map_err(|e| format!("reading events: {e}"))?;
        let have: HashSet<(String, String)> =
            rows.iter().map(|r| (r.0.clone(), r.1.clone())).collect();
        let missing = acked.difference(&have).count();
        if missing == 0 {
            break rows;
        }
        if Instant::now() > deadline {
            let some: Vec<_> = acked.difference(&have).take(5).collect();
            return Err(format!(
                "no progress: {missing} acknowledged event(s) still not stored {}s after the last fault healed, e.g. {some:?}",
                recover.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    out.rows = rows.len();
    let by_id: HashMap<(String, String), Row> = rows
        .into_iter()
        .map(|(s, id, t, p, o, order, seq)| {
            (
                (s, id),
                Row {
                    lineage: (t, p, o),
                    order: order.unwrap_or_default(),
                    seq: seq.unwrap_or(0),
                },
            )
        })
        .collect();
    // The fan-out: every acknowledged event on the topic; every copy from the kept row's record.
    let topic = rig.topology.event_topic("OrderPlaced");
    let expected: HashSet<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    let deadline = Instant::now() + recover;
    let records = loop {
        let want = expected.clone();
        let recs = read_until(
            &rig.broker.bootstrap(),
            &topic,
            Duration::from_secs(30),
            move |r| {
                let seen: HashSet<&str> = r.iter().filter_map(|x| x.header("ce_id")).collect();
                want.iter().all(|id| seen.contains(id.as_str()))
            },
        )
        .await;
        let seen: HashSet<&str> = recs.iter().filter_map(|x| x.header("ce_id")).collect();
        let missing = expected
            .iter()
            .filter(|id| !seen.contains(id.as_str()))
            .count();
        if missing == 0 {
            break recs;
        }
        if Instant::now() > deadline {
            let some: Vec<_> = expected
                .iter()
                .filter(|id| !seen.contains(id.as_str()))
                .take(5)
                .collect();
            return Err(format!(
                "{missing} acknowledged event(s) stored but never on {topic}, e.g. {some:?}"
            ));
        }
    };
    out.fanout_records = records.len();
    let mut first_at: HashMap<(String, String), usize> = HashMap::new();
    let mut copies: HashMap<(String, String), usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let (Some(src), Some(id)) = (r.header("helios-source"), r.header("ce_id")) else {
            return Err(format!(
                "a fan-out record without lineage headers at offset {}",
                r.offset
            ));
        };
        let key = (src.to_string(), id.to_string());
        let Some(row) = by_id.get(&key) else {
            return Err(format!("{key:?} is on {topic} but not in PostgreSQL"));
        };
        let lineage = (
            r.header("helios-raw-topic").unwrap_or_default().to_string(),
            r.header("helios-raw-partition")
                .and_then(|p| p.parse().ok())
                .unwrap_or(-1),
            r.header("helios-raw-offset")
                .and_then(|o| o.parse().ok())
                .unwrap_or(-1),
        );
        if lineage != row.lineage {
            return Err(format!(
                "{key:?} was fanned out from raw record {lineage:?}, but PostgreSQL kept {:?}: a redelivery went out twice",
                row.lineage
            ));
        }
        first_at.entry(key.clone()).or_insert(i);
        *copies.entry(key).or_default() += 1;
    }
    out.fanout_copies = copies.values().map(|c| c - 1).sum();
    // Per-order order, where the raw records were in order on one partition.
    let mut orders: BTreeMap<&str, OrderEvents<'_>> = BTreeMap::new();
    for (k, r) in &by_id {
        orders.entry(r.order.as_str()).or_default().push((k, r));
    }
    for (order, mut evs) in orders {
        evs.sort_by_key(|(_, r)| r.seq);
        for (i, (ka, a)) in evs.iter().enumerate() {
            for (kb, b) in &evs[i + 1..] {
                let same_partition = a.lineage.0 == b.lineage.0 && a.lineage.1 == b.lineage.1;
                if !same_partition || a.lineage.2 > b.lineage.2 {
                    continue;
                }
                out.order_pairs_checked += 1;
                let (fa, fb) = (first_at.get(*ka), first_at.get(*kb));
                if let (Some(fa), Some(fb)) = (fa, fb) {
                    if fa > fb {
                        return Err(format!(
                            "order {order}: step {} overtook step {} on {topic} (their raw records were in order on {}/{})",
                            b.seq, a.seq, a.lineage.0, a.lineage.1
                        ));
                    }
                }
            }
        }
    }
    // Commits: below every committed offset, each record with a row of its own had it already.
    let own: Stored = by_id.values().fold(HashMap::new(), |mut m, r| {
        m.entry((r.lineage.0.clone(), r.lineage.1))
            .or_default()
            .insert(r.lineage.2);
        m
    });
    for s in samples {
        for (t, p, committed) in &s.commits {
            let Some(offsets) = own.get(&(t.clone(), *p)) else {
                continue;
            };
            let then = s.stored.get(&(t.clone(), *p));
            for o in offsets.iter().filter(|o| **o < *committed) {
                if !then.is_some_and(|set| set.contains(o)) {
                    return Err(format!(
                        "{} committed {t}/{p} at {committed} while the raw record at {o} was not stored yet: a commit past an unresolved record",
                        s.member
                    ));
                }
            }
        }
    }
    Ok(out)
}
