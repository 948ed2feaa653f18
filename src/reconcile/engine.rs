//! The reconciliation state machine of one flow instance (one order in one flow), without I/O:
//! [`apply`] counts an event, [`due`] fires the deadlines a watermark has passed. Both return
//! the outcomes they detect; each outcome is detected by exactly one state change, so replaying
//! the same events (already counted: nothing changes) never detects it twice.

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
    pub occurred_at: DateTime<Utc>,
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
    OutOfOrder,
    DuplicateStep,
    Orphan,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 6] = [
        OutcomeKind::Completed,
        OutcomeKind::Missing,
        OutcomeKind::Late,
        OutcomeKind::OutOfOrder,
        OutcomeKind::DuplicateStep,
        OutcomeKind::Orphan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Completed => "completed",
            OutcomeKind::Missing => "missing",
            OutcomeKind::Late => "late",
            OutcomeKind::OutOfOrder => "out_of_order",
            OutcomeKind::DuplicateStep => "duplicate_step",
            OutcomeKind::Orphan => "orphan",
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

    /// Every step has been seen.
    pub fn complete(&self, flow: &Flow) -> bool {
        flow.steps
            .iter()
            .all(|s| self.first_of(&s.event_type).is_some())
    }
}

fn deadline(t0: DateTime<Utc>, within: Option<std::time::Duration>) -> DateTime<Utc> {
    t0 + chrono::Duration::from_std(within.unwrap_or_default()).unwrap_or_default()
}

fn who(s: &Sighting) -> serde_json::Value {
    json!({"source": s.source, "event_id": s.event_id, "occurred_at": s.occurred_at})
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
    let Some(idx) = flow.step_index(&ev.step) else {
        return fx;
    };
    if let Some(first) = st.first_of(&ev.step) {
        fx.outcomes.push(Outcome {
            kind: OutcomeKind::DuplicateStep,
            step: ev.step.clone(),
            event_time: ev.occurred_at,
            duration_ms: None,
            detail: json!({"first": who(first), "again": who(&ev)}),
        });
        if st.sightings.len() < MAX_SIGHTINGS {
            st.sightings.push(ev);
        } else {
            st.dropped += 1;
        }
        return fx;
    }
    let at = ev.occurred_at;
    st.sightings.push(ev);
    let t0 = st.start(flow);
    if let Some(t0) = t0 {
        // Late: this step after its deadline; or, when the first step just arrived, the later
        // steps that came before it.
        let check: Vec<usize> = if idx == 0 {
            (1..flow.steps.len()).collect()
        } else {
            vec![idx]
        };
        for j in check {
            let step = &flow.steps[j];
            let Some(s) = st.first_of(&step.event_type) else {
                continue;
            };
            let due = deadline(t0, step.within);
            let was_missing = st.missing.contains(&step.event_type);
            if was_missing || s.occurred_at > due {
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::Late,
                    step: step.event_type.clone(),
                    event_time: s.occurred_at,
                    duration_ms: None,
                    detail: json!({"deadline": due, "late_by_ms": (s.occurred_at - due).num_milliseconds().max(0),
                        "event": who(s), "reported_missing": was_missing}),
                });
                if was_missing {
                    fx.resolved
                        .push((OutcomeKind::Missing, step.event_type.clone()));
                }
            }
        }
        if idx == 0 && st.orphan {
            fx.resolved
                .push((OutcomeKind::Orphan, flow.steps[0].event_type.clone()));
        }
    }
    // Out of order: a step whose event time is before its predecessor's.
    for j in [idx, idx + 1] {
        if j == 0 || j >= flow.steps.len() {
            continue;
        }
        let (prev, this) = (
            st.first_of(&flow.steps[j - 1].event_type),
            st.first_of(&flow.steps[j].event_type),
        );
        if let (Some(p), Some(t)) = (prev, this) {
            if t.occurred_at < p.occurred_at {
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::OutOfOrder,
                    step: flow.steps[j].event_type.clone(),
                    event_time: t.occurred_at,
                    duration_ms: None,
                    detail: json!({"predecessor": flow.steps[j - 1].event_type, "before_by_ms":
                        (p.occurred_at - t.occurred_at).num_milliseconds(), "event": who(t), "predecessor_event": who(p)}),
                });
            }
        }
    }
    if st.complete(flow) {
        let t0 = t0.unwrap_or(at);
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
        fx.outcomes.push(Outcome {
            kind: OutcomeKind::Completed,
            step: String::new(),
            event_time: last,
            duration_ms: Some((last - t0).num_milliseconds()),
            detail: json!({"steps": steps, "clouds": distinct_sources(st, flow)}),
        });
    }
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

/// Fires the deadlines `watermark` has passed: `missing` steps, or `orphan` when the first
/// step never came within the longest deadline of the earliest event seen.
pub fn due(flow: &Flow, st: &mut FlowState, watermark: DateTime<Utc>) -> Effects {
    let mut fx = Effects::default();
    if let Some(t0) = st.start(flow) {
        for step in &flow.steps[1..] {
            let d = deadline(t0, step.within);
            if d <= watermark
                && st.first_of(&step.event_type).is_none()
                && !st.missing.contains(&step.event_type)
            {
                st.missing.push(step.event_type.clone());
                fx.outcomes.push(Outcome {
                    kind: OutcomeKind::Missing,
                    step: step.event_type.clone(),
                    event_time: d,
                    duration_ms: None,
                    detail: json!({"deadline": d, "first_step_at": t0,
                        "seen": st.sightings.iter().map(|s| s.step.as_str()).collect::<Vec<_>>()}),
                });
            }
        }
    } else if !st.orphan {
        if let Some(earliest) = st.sightings.iter().map(|s| s.occurred_at).min() {
            let d = deadline(earliest, Some(flow.longest()));
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
        Some(t0) => flow.steps[1..]
            .iter()
            .filter(|s| st.first_of(&s.event_type).is_none() && !st.missing.contains(&s.event_type))
            .map(|s| deadline(t0, s.within))
            .min(),
        None if !st.orphan => st
            .sightings
            .iter()
            .map(|s| s.occurred_at)
            .min()
            .map(|e| deadline(e, Some(flow.longest()))),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::FlowStep;
    use std::time::Duration;

    fn flow() -> Flow {
        Flow {
            name: "f".into(),
            key: "order_id".into(),
            steps: vec![
                FlowStep {
                    event_type: "A".into(),
                    within: None,
                },
                FlowStep {
                    event_type: "B".into(),
                    within: Some(Duration::from_secs(60)),
                },
                FlowStep {
                    event_type: "C".into(),
                    within: Some(Duration::from_secs(120)),
                },
            ],
            allowed_lateness: Duration::from_secs(10),
        }
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
        assert_eq!(kinds(&fx), vec![(OutcomeKind::Late, "B".into())]);
        assert_eq!(fx.resolved, vec![(OutcomeKind::Missing, "B".into())]);
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
