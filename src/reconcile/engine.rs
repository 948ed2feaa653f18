//! The reconciliation state machine of one flow instance (one order in one flow), without I/O:
//! [`apply`] counts an event, [`due`] fires the deadlines a watermark has passed. Both return
//! the outcomes they detect; each outcome is detected by exactly one state change, so replaying
//! the same events (already counted: nothing changes) never detects it twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::topology::Flow;

/// Most events kept per instance (a step seen again and again is counted, not kept).
pub const MAX_SIGHTINGS: usize = 32;

/// One counted event of an instance: which step, from which cloud, when, and where it was read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sighting {
    pub step: String,
    pub source: String,
    pub event_id: String,
    /// The event time counted: the event's `occurred_at`, or when HELIOS received it if that
    /// `occurred_at` was further ahead than the flow's `max_clock_skew` (see
    /// `untrusted_occurred_at`).
    pub occurred_at: DateTime<Utc>,
    /// The `occurred_at` the event carried when it was not trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untrusted_occurred_at: Option<DateTime<Utc>>,
    /// The flow's `match` fields the event has.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, serde_json::Value>,
    /// The fan-out record it was read from: `topic`, `partition`, `offset`.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The raw record it was landed as (`topic/partition/offset`), from the lineage headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// When the reconciler counted it (processing time).
    pub seen_at: DateTime<Utc>,
}

/// What is known of one instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FlowState {
    pub sightings: Vec<Sighting>,
    /// Steps reported `missing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// `orphan` was reported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub orphan: bool,
    /// Events counted but not kept (beyond [`MAX_SIGHTINGS`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
    /// The terminal event type that ended the instance (`ends_on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// `completed` was reported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// Steps reported `out_of_order`, and steps reported with a `mismatch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub out_of_order: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatched: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The kinds of outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Completed,
    Missing,
    Late,
    /// A step reported `missing` came after all (it supersedes the `missing`).
    ArrivedLate,
    OutOfOrder,
    DuplicateStep,
    Orphan,
    /// A terminal event type (`ends_on`) ended the instance.
    Ended,
    /// Two steps disagree on a `match` field.
    Mismatch,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 9] = [
        OutcomeKind::Completed,
        OutcomeKind::Missing,
        OutcomeKind::Late,
        OutcomeKind::ArrivedLate,
        OutcomeKind::OutOfOrder,
        OutcomeKind::DuplicateStep,
        OutcomeKind::Orphan,
        OutcomeKind::Ended,
        OutcomeKind::Mismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Completed => "completed",
            OutcomeKind::Missing => "missing",
            OutcomeKind::Late => "late",
            OutcomeKind::ArrivedLate => "arrived_late",
            OutcomeKind::OutOfOrder => "out_of_order",
            OutcomeKind::DuplicateStep => "duplicate_step",
            OutcomeKind::Orphan => "orphan",
            OutcomeKind::Ended => "ended",
            OutcomeKind::Mismatch => "mismatch",
        }
    }

    pub fn parse(s: &str) -> Option<OutcomeKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One detected outcome of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// The step it is about (`""` for `completed`).
    pub step: String,
    /// The event time it refers to (the deadline for `missing`/`orphan`).
    pub event_time: DateTime<Utc>,
    /// `completed`: first step to last step, event time.
    pub duration_ms: Option<i64>,
    pub detail: serde_json::Value,
}

/// What one state change detected.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    pub outcomes: Vec<Outcome>,
    /// Earlier outcomes this change resolves (`missing` of a step that arrived late, `orphan`
    /// whose first step arrived).
    pub resolved: Vec<(OutcomeKind, String)>,
    /// The event had been counted before (a replay, a redelivery): nothing changed.
    pub already_counted: bool,
}

impl FlowState {
    /// The first event counted for a step.
    pub fn first_of(&self, step: &str) -> Option<&Sighting> {
        self.sightings.iter().find(|s| s.step == step)
    }

    /// The first step's event time, once it was seen.
    fn start(&self, flow: &Flow) -> Option<DateTime<Utc>> {
        self.first_of(&flow.steps[0].event_type)
            .map(|s| s.occurred_at)
    }

    /// Every mandatory step has been seen.
    pub fn complete(&self, flow: &Flow) -> bool {
        flow.steps
            .iter()
            .all(|s| s.optional || self.first_of(&s.event_type).is_some())
    }

    /// Nothing more is due: completed, ended, or reported.
    fn settled(&self) -> bool {
        self.done || self.ended.is_some()
    }
}

fn ms(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_default()
}

/// Step `j`'s deadline: `within` after the first step, or after the previous step (its event
/// time when seen, else its own deadline).
pub fn deadline(flow: &Flow, st: &FlowState, j: usize) -> Option<DateTime<Utc>> {
    let t0 = st.start(flow)?;
    let mut at = t0;
    for (i, step) in flow.steps.iter().enumerate().skip(1) {
        let w = ms(step.within.unwrap_or_default());
        let base = if step.after_previous {
            st.first_of(&flow.steps[i - 1].event_type)
                .map_or(at, |s| s.occurred_at)
        } else {
            t0
        };
        at = base + w;
        if i == j {
            return Some(at);
        }
    }
    Some(t0)
}

fn who(s: &Sighting) -> serde_json::Value {
    let mut v = json!({"source": s.source, "event_id": s.event_id, "occurred_at": s.occurred_at});
    if let Some(u) = s.untrusted_occurred_at {
        v["untrusted_occurred_at"] = json!(u);
    }
    v
}

/// Fields two sightings both have and disagree on.
fn differing(a: &Sighting, b: &Sighting) -> Vec<String> {
    a.fields
        .iter()
        .filter(|(k, v)| b.fields.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Counts an event of the flow (its `step` is one of the flow's event types).
pub fn apply(flow: &Flow, st: &mut FlowState, ev: Sighting) -> Effects {
    let mut fx = Effects::default();
    if st
        .sightings
        .iter()
        .any(|s| s.source == ev.source && s.event_id == ev.event_id)
    {
        fx.already_counted = true;
        return fx;
    }
    if flow.ends_on.contains(&ev.step) {
        return end(flow, st, ev);
    }
    let Some(idx) = flow.step_index(&ev.step) else {
        return fx;
    };
    if let Some(first) = st.first_of(&ev.step) {
        let differs = differing(first, &ev);
        let mut detail = json!({"first": who(first), "again": who(&ev)});
        if !flow.match_fields.is_empty() {
            detail["same_fields"] = json!(differs.is_empty());
            detail["differs"] = json!(differs
                .iter()
                .map(|f| json!({"field": f, "first": first.fields[f], "again": ev.fields[f]}))
                .collect::<Vec<_>>());
        }
        fx.outcomes.push(Outcome {
            kind: OutcomeKind::DuplicateStep,
            step: ev.step.clone(),
            event_time: ev.occurred_at,
            duration_ms: None,
            detail,
        });
        keep(st, ev);
        return fx;
    }
    let at = ev.occurred_at;
    let untrusted = ev.untrusted_occurred_at.is_some();
    st.sightings.push(ev);
    let skew = ms(flow.clock_skew);
    if st.start(flow).is_some() {
        // Late: this step after its deadline; or, when the first step just arrived, the later
        // steps that came before it (their deadlines are known only now). A relative deadline
        // moves with the step before it, so the steps after this one are looked at too.
        let check: Vec<usize> = if idx == 0 {
            (1..flow.steps.len()).collect()
        } else {
            vec![idx]
        };
        for j in check {
            let step = &flow.steps[j];
            let (Some(s), Some(due)) = (st.first_of(&step.event_type), deadline(flow, st, j))
            else {
                continue;
            };
            let was_missing = st.missing.contains(&step.event_type);
            let late_by = (s.occurred_at - due).num_milliseconds().max(0);
            let detail = json!({"deadline": due, "late_by_ms": late_by, "event": who(s)});
            if was_missing {
                // Reported missing, then it came: one outcome that supersedes the `missing`.
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::ArrivedLate,
                    step: step.event_type.clone(),
                    event_time: s.occurred_at,
                    duration_ms: None,
                    detail,
                });
                fx.resolved
                    .push((OutcomeKind::Missing, step.event_type.clone()));
            } else if s.occurred_at > due + skew {
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::Late,
                    step: step.event_type.clone(),
                    event_time: s.occurred_at,
                    duration_ms: None,
                    detail,
                });
            }
        }
        if idx == 0 && st.orphan {
            fx.resolved
                .push((OutcomeKind::Orphan, flow.steps[0].event_type.clone()));
        }
    }
    // Out of order: any pair of steps whose event times disagree with their order by more
    // than the clock skew (each step reported once).
    let mut disordered: Vec<(usize, usize)> = vec![];
    for (j, step) in flow.steps.iter().enumerate() {
        if j == idx {
            continue;
        }
        let Some(other) = st.first_of(&step.event_type) else {
            continue;
        };
        let (early, later) = if j < idx { (j, idx) } else { (idx, j) };
        let (e, l) = if j < idx {
            (other.occurred_at, at)
        } else {
            (at, other.occurred_at)
        };
        if l + skew < e {
            disordered.push((early, later));
        }
    }
    for (early, later) in disordered {
        let step = &flow.steps[later].event_type;
        if st.out_of_order.contains(step) {
            continue;
        }
        let (p, t) = (
            st.first_of(&flow.steps[early].event_type).expect("seen"),
            st.first_of(step).expect("seen"),
        );
        fx.outcomes.push(Outcome {
            kind: OutcomeKind::OutOfOrder,
            step: step.clone(),
            event_time: t.occurred_at,
            duration_ms: None,
            detail: json!({"predecessor": flow.steps[early].event_type, "before_by_ms":
                (p.occurred_at - t.occurred_at).num_milliseconds(), "clock_skew_ms": skew.num_milliseconds(),
                "event": who(t), "predecessor_event": who(p)}),
        });
        st.out_of_order.push(step.clone());
    }
    // Mismatch: a `match` field this step disagrees on with an earlier step (in flow order)
    // that has it.
    if !flow.match_fields.is_empty() {
        let this = st
            .first_of(&flow.steps[idx].event_type)
            .expect("seen")
            .clone();
        for (j, step) in flow.steps.iter().enumerate() {
            if j == idx {
                continue;
            }
            let Some(other) = st.first_of(&step.event_type) else {
                continue;
            };
            let (first, second, later) = if j < idx {
                (other, &this, idx)
            } else {
                (&this, other, j)
            };
            let later_step = flow.steps[later].event_type.clone();
            if st.mismatched.contains(&later_step) {
                continue;
            }
            if let Some(field) = differing(first, second).into_iter().next() {
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::Mismatch,
                    step: later_step.clone(),
                    event_time: second.occurred_at,
                    duration_ms: None,
                    detail: json!({"field": field,
                        "expected": {"step": first.step, "value": first.fields[&field], "event": who(first)},
                        "found": {"step": second.step, "value": second.fields[&field], "event": who(second)}}),
                });
                st.mismatched.push(later_step);
            }
        }
    }
    if !st.settled() && st.complete(flow) {
        st.done = true;
        let t0 = st.start(flow).unwrap_or(at);
        let last = flow
            .steps
            .iter()
            .filter_map(|s| st.first_of(&s.event_type).map(|x| x.occurred_at))
            .max()
            .unwrap_or(at);
        let steps: Vec<serde_json::Value> = flow
            .steps
            .iter()
            .filter_map(|s| st.first_of(&s.event_type))
            .map(|s| json!({"step": s.step, "source": s.source, "event_id": s.event_id, "occurred_at": s.occurred_at}))
            .collect();
        let mut detail = json!({"steps": steps, "clouds": distinct_sources(st, flow)});
        if untrusted
            || st
                .sightings
                .iter()
                .any(|s| s.untrusted_occurred_at.is_some())
        {
            detail["untrusted_clock"] = json!(true);
        }
        fx.outcomes.push(Outcome {
            kind: OutcomeKind::Completed,
            step: String::new(),
            event_time: last,
            duration_ms: Some((last - t0).num_milliseconds()),
            detail,
        });
    }
    fx
}

fn keep(st: &mut FlowState, ev: Sighting) {
    if st.sightings.len() < MAX_SIGHTINGS {
        st.sightings.push(ev);
    } else {
        st.dropped += 1;
    }
}

/// A terminal event: the instance ends (once); `missing` outcomes of steps due after it are
/// resolved (the order was cancelled before they were due).
fn end(flow: &Flow, st: &mut FlowState, ev: Sighting) -> Effects {
    let mut fx = Effects::default();
    if st.ended.is_some() {
        keep(st, ev);
        return fx;
    }
    let at = ev.occurred_at;
    let step = ev.step.clone();
    let detail = json!({"event": who(&ev), "completed_before": st.done,
        "seen": st.sightings.iter().map(|s| s.step.as_str()).collect::<Vec<_>>()});
    keep(st, ev);
    st.ended = Some(step.clone());
    for (j, s) in flow.steps.iter().enumerate() {
        if st.missing.contains(&s.event_type) && deadline(flow, st, j).is_some_and(|d| d > at) {
            fx.resolved
                .push((OutcomeKind::Missing, s.event_type.clone()));
        }
    }
    if st.orphan {
        fx.resolved
            .push((OutcomeKind::Orphan, flow.steps[0].event_type.clone()));
    }
    fx.outcomes.push(Outcome {
        kind: OutcomeKind::Ended,
        step,
        event_time: at,
        duration_ms: st.start(flow).map(|t0| (at - t0).num_milliseconds()),
        detail,
    });
    fx
}

fn distinct_sources(st: &FlowState, flow: &Flow) -> Vec<String> {
    let mut v: Vec<String> = flow
        .steps
        .iter()
        .filter_map(|s| st.first_of(&s.event_type).map(|x| x.source.clone()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The mandatory steps not seen nor reported yet, with their deadlines.
fn open_steps(flow: &Flow, st: &FlowState) -> Vec<(usize, DateTime<Utc>)> {
    if st.settled() {
        return vec![];
    }
    (1..flow.steps.len())
        .filter(|&j| {
            let s = &flow.steps[j];
            !s.optional
                && st.first_of(&s.event_type).is_none()
                && !st.missing.contains(&s.event_type)
        })
        .filter_map(|j| deadline(flow, st, j).map(|d| (j, d)))
        .collect()
}

/// Fires the deadlines `watermark` has passed: `missing` steps, or `orphan` when the first
/// step never came within the longest deadline of the earliest event seen.
pub fn due(flow: &Flow, st: &mut FlowState, watermark: DateTime<Utc>) -> Effects {
    let mut fx = Effects::default();
    if let Some(t0) = st.start(flow) {
        for (j, d) in open_steps(flow, st) {
            if d > watermark {
                continue;
            }
            let step = flow.steps[j].event_type.clone();
            fx.outcomes.push(Outcome {
                kind: OutcomeKind::Missing,
                step: step.clone(),
                event_time: d,
                duration_ms: None,
                detail: json!({"deadline": d, "first_step_at": t0, "watermark": watermark,
                    "seen": st.sightings.iter().map(|s| s.step.as_str()).collect::<Vec<_>>()}),
            });
            st.missing.push(step);
        }
    } else if !st.orphan && st.ended.is_none() {
        if let Some(earliest) = st.sightings.iter().map(|s| s.occurred_at).min() {
            let d = earliest + ms(flow.longest());
            if d <= watermark {
                st.orphan = true;
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::Orphan,
                    step: flow.steps[0].event_type.clone(),
                    event_time: d,
                    duration_ms: None,
                    detail: json!({"deadline": d, "seen": st.sightings.iter().map(who).collect::<Vec<_>>()}),
                });
            }
        }
    }
    fx
}

/// When the instance next needs a look: the earliest deadline not yet fired (none when every
/// step was seen or reported).
pub fn next_due(flow: &Flow, st: &FlowState) -> Option<DateTime<Utc>> {
    match st.start(flow) {
        Some(_) => open_steps(flow, st).into_iter().map(|(_, d)| d).min(),
        None if !st.orphan && st.ended.is_none() => st
            .sightings
            .iter()
            .map(|s| s.occurred_at)
            .min()
            .map(|e| e + ms(flow.longest())),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::FlowStep;
    use std::time::Duration;

    fn flow() -> Flow {
        Flow::new(
            "f",
            vec![
                FlowStep::new("A", None),
                FlowStep::new("B", Some(Duration::from_secs(60))),
                FlowStep::new("C", Some(Duration::from_secs(120))),
            ],
            Duration::from_secs(10),
        )
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn ev(step: &str, id: &str, at: i64) -> Sighting {
        Sighting {
            step: step.into(),
            source: "aws".into(),
            event_id: id.into(),
            occurred_at: t(at),
            untrusted_occurred_at: None,
            fields: BTreeMap::new(),
            topic: "x".into(),
            partition: 0,
            offset: 0,
            raw: None,
            seen_at: t(at),
        }
    }

    fn kinds(fx: &Effects) -> Vec<(OutcomeKind, String)> {
        fx.outcomes
            .iter()
            .map(|o| (o.kind, o.step.clone()))
            .collect()
    }

    #[test]
    fn a_complete_flow_completes_once_and_replays_change_nothing() {
        let f = flow();
        let mut st = FlowState::default();
        assert!(apply(&f, &mut st, ev("A", "1", 0)).outcomes.is_empty());
        assert_eq!(next_due(&f, &st), Some(t(60)));
        assert!(apply(&f, &mut st, ev("B", "2", 30)).outcomes.is_empty());
        let fx = apply(&f, &mut st, ev("C", "3", 90));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Completed, String::new())]);
        assert_eq!(fx.outcomes[0].duration_ms, Some(90_000));
        assert_eq!(next_due(&f, &st), None);
        let again = apply(&f, &mut st, ev("C", "3", 90));
        assert!(again.already_counted && again.outcomes.is_empty());
        assert!(due(&f, &mut st, t(1000)).outcomes.is_empty());
    }

    #[test]
    fn missing_then_late_resolves_the_missing() {
        let f = flow();
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        assert!(due(&f, &mut st, t(59)).outcomes.is_empty());
        assert_eq!(
            kinds(&due(&f, &mut st, t(60))),
            vec![(OutcomeKind::Missing, "B".into())]
        );
        assert!(due(&f, &mut st, t(61)).outcomes.is_empty(), "reported once");
        let fx = apply(&f, &mut st, ev("B", "2", 70));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::ArrivedLate, "B".into())]);
        assert_eq!(fx.resolved, vec![(OutcomeKind::Missing, "B".into())]);
        assert_eq!(fx.outcomes[0].detail["late_by_ms"], 10_000);
        // Late by event time, never reported missing: `late`, within the skew: nothing.
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        assert_eq!(
            kinds(&apply(&f, &mut st, ev("B", "2", 63))),
            vec![(OutcomeKind::Late, "B".into())]
        );
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        assert!(
            apply(&f, &mut st, ev("B", "2", 61)).outcomes.is_empty(),
            "within clock_skew"
        );
    }

    #[test]
    fn out_of_order_compares_every_pair_beyond_the_clock_skew() {
        let f = flow();
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 10));
        assert!(
            apply(&f, &mut st, ev("B", "2", 9)).outcomes.is_empty(),
            "1 s: skew"
        );
        // C before A (not adjacent) by more than the skew.
        let fx = apply(&f, &mut st, ev("C", "3", 5));
        assert_eq!(
            kinds(&fx),
            vec![
                (OutcomeKind::OutOfOrder, "C".into()),
                (OutcomeKind::Completed, String::new())
            ]
        );
        assert_eq!(fx.outcomes[0].detail["predecessor"], "A");
    }

    #[test]
    fn terminal_optional_and_relative_steps() {
        let mut f = flow();
        f.ends_on = vec!["X".into()];
        f.steps[1].optional = true;
        f.steps[2].after_previous = true;
        f.steps[2].within = Some(Duration::from_secs(30));
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        // C is due 30 s after B, or after B's own deadline while B is not seen.
        assert_eq!(deadline(&f, &st, 2), Some(t(90)));
        apply(&f, &mut st, ev("B", "2", 20));
        assert_eq!(deadline(&f, &st, 2), Some(t(50)));
        assert_eq!(
            kinds(&due(&f, &mut st, t(50))),
            vec![(OutcomeKind::Missing, "C".into())]
        );
        // Optional B never missing; the order completes without it, and B later adds nothing.
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        assert!(due(&f, &mut st, t(85)).outcomes.is_empty());
        let fx = apply(&f, &mut st, ev("C", "3", 80));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Completed, String::new())]);
        assert!(apply(&f, &mut st, ev("B", "2", 10)).outcomes.is_empty());
        // A terminal type ends the instance: no missing after it, and a missing reported for
        // a deadline after it is resolved.
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        assert_eq!(
            kinds(&due(&f, &mut st, t(95))),
            vec![(OutcomeKind::Missing, "C".into())]
        );
        let fx = apply(&f, &mut st, ev("X", "9", 70));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Ended, "X".into())]);
        assert_eq!(fx.resolved, vec![(OutcomeKind::Missing, "C".into())]);
        assert_eq!(next_due(&f, &st), None);
        assert!(due(&f, &mut st, t(10_000)).outcomes.is_empty());
        // Ended before it started: never an orphan.
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("X", "9", 0));
        assert!(due(&f, &mut st, t(10_000)).outcomes.is_empty());
    }

    #[test]
    fn match_fields_give_a_mismatch_and_tell_a_second_charge_from_a_redelivery() {
        let mut f = flow();
        f.match_fields = vec!["amount".into()];
        let with = |step: &str, id: &str, at: i64, src: &str, amount: i64| {
            let mut e = ev(step, id, at);
            e.source = src.into();
            e.fields.insert("amount".into(), json!(amount));
            e
        };
        let mut st = FlowState::default();
        apply(&f, &mut st, with("A", "1", 0, "aws", 100));
        let fx = apply(&f, &mut st, with("B", "2", 10, "gcp", 90));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Mismatch, "B".into())]);
        assert_eq!(fx.outcomes[0].detail["field"], "amount");
        assert_eq!(fx.outcomes[0].detail["expected"]["value"], 100);
        assert_eq!(fx.outcomes[0].detail["found"]["value"], 90);
        let again = apply(&f, &mut st, with("B", "2b", 11, "azure", 90));
        assert_eq!(again.outcomes[0].detail["same_fields"], true);
        let other = apply(&f, &mut st, with("B", "2c", 12, "azure", 75));
        assert_eq!(other.outcomes[0].kind, OutcomeKind::DuplicateStep);
        assert_eq!(other.outcomes[0].detail["same_fields"], false);
        assert_eq!(other.outcomes[0].detail["differs"][0]["again"], 75);
    }

    #[test]
    fn arrival_order_does_not_matter_but_event_time_order_does() {
        let f = flow();
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("B", "2", 30));
        apply(&f, &mut st, ev("C", "3", 40));
        let fx = apply(&f, &mut st, ev("A", "1", 0));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Completed, String::new())]);

        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 50));
        let fx = apply(&f, &mut st, ev("B", "2", 40));
        assert_eq!(kinds(&fx), vec![(OutcomeKind::OutOfOrder, "B".into())]);
    }

    #[test]
    fn a_step_twice_is_a_duplicate_and_an_orphan_is_reported_after_the_longest_deadline() {
        let f = flow();
        let mut st = FlowState::default();
        apply(&f, &mut st, ev("A", "1", 0));
        let mut other = ev("B", "2b", 20);
        other.source = "gcp".into();
        apply(&f, &mut st, ev("B", "2", 10));
        assert_eq!(
            kinds(&apply(&f, &mut st, other)),
            vec![(OutcomeKind::DuplicateStep, "B".into())]
        );

        let mut st = FlowState::default();
        apply(&f, &mut st, ev("B", "2", 10));
        assert_eq!(next_due(&f, &st), Some(t(130)));
        assert!(due(&f, &mut st, t(129)).outcomes.is_empty());
        assert_eq!(
            kinds(&due(&f, &mut st, t(130))),
            vec![(OutcomeKind::Orphan, "A".into())]
        );
        assert_eq!(next_due(&f, &st), None);
        let fx = apply(&f, &mut st, ev("A", "1", 100));
        assert_eq!(fx.resolved, vec![(OutcomeKind::Orphan, "A".into())]);
    }
}
