//! Flows: the lifecycles `helios reconcile` follows across event types and clouds, declared in
//! topology.yaml under `flows:` and validated here, e.g.
//!
//! ```yaml
//! flows:
//!   order_lifecycle:
//!     key: order_id
//!     steps:
//!       - OrderPlaced
//!       - PaymentProcessed: { within: 15m }
//!       - InventoryReserved: { within: 30m }
//!     allowed_lateness: 2m
//! ```
//!
//! `within` is measured from the first step's `occurred_at` (event time).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A flow as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// The field that names one instance of the flow; `order_id` (what the fan-out is keyed by).
    #[serde(default = "default_key")]
    pub key: String,
    /// The event types in lifecycle order; each later step with `{ within: <duration> }`.
    pub steps: Vec<StepSpec>,
    /// How far event time may run behind the newest event seen before a deadline counts as
    /// passed (default 1m).
    #[serde(default)]
    pub allowed_lateness: Option<String>,
}

/// `- OrderPlaced` or `- PaymentProcessed: { within: 15m }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StepSpec {
    Bare(String),
    WithOptions(BTreeMap<String, StepOptions>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepOptions {
    pub within: Option<String>,
}

fn default_key() -> String {
    "order_id".into()
}

/// One step of a validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowStep {
    pub event_type: String,
    /// Deadline from the first step's event time; none for the first step.
    pub within: Option<Duration>,
}

/// A validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub name: String,
    pub key: String,
    pub steps: Vec<FlowStep>,
    pub allowed_lateness: Duration,
}

impl Flow {
    /// The position of an event type among the steps.
    pub fn step_index(&self, event_type: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.event_type == event_type)
    }

    /// `OrderPlaced → PaymentProcessed within 900s → …`.
    pub fn describe(&self) -> String {
        self.steps
            .iter()
            .map(|s| match s.within {
                Some(w) => format!("{} within {}s", s.event_type, w.as_secs()),
                None => s.event_type.clone(),
            })
            .collect::<Vec<_>>()
            .join(" → ")
    }

    /// The longest deadline (an instance without its first step is an orphan after it).
    pub fn longest(&self) -> Duration {
        self.steps
            .iter()
            .filter_map(|s| s.within)
            .max()
            .unwrap_or_default()
    }
}

/// Checks a flow; `Err((key, problem))` names the key at fault. `partitions` gives an event
/// type's fan-out partitions (None: the type is not declared).
pub fn validate_flow(
    name: &str,
    spec: &FlowSpec,
    partitions: impl Fn(&str) -> Option<i32>,
) -> Result<Flow, (String, String)> {
    let key = |k: &str| format!("flows.{name}{k}");
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err((
            key(""),
            "is not a valid flow name: 1–64 letters, digits, `_` or `-`".into(),
        ));
    }
    if spec.key != "order_id" {
        return Err((
            key(".key"),
            format!(
                "is `{}`; only `order_id` is supported: the fan-out topics are keyed by the order id, which puts one order's events on the same partition of every topic",
                spec.key
            ),
        ));
    }
    if spec.steps.len() < 2 {
        return Err((
            key(".steps"),
            "needs at least two steps (the first, then what must follow it)".into(),
        ));
    }
    let mut steps: Vec<FlowStep> = Vec::with_capacity(spec.steps.len());
    for (i, s) in spec.steps.iter().enumerate() {
        let at = key(&format!(".steps[{i}]"));
        let (event_type, within) = match s {
            StepSpec::Bare(t) => (t.clone(), None),
            StepSpec::WithOptions(m) if m.len() == 1 => {
                let (t, o) = m.iter().next().expect("one entry");
                (t.clone(), o.within.clone())
            }
            StepSpec::WithOptions(_) => {
                return Err((
                    at,
                    "must be an event type, or one `Type: { within: 15m }`".into(),
                ))
            }
        };
        let within =
            match (i, within) {
                (0, Some(_)) => return Err((
                    at,
                    "is the first step: deadlines are measured from it, so it takes no `within`"
                        .into(),
                )),
                (0, None) => None,
                (_, None) => {
                    return Err((
                        at,
                        format!(
                        "`{event_type}` needs a deadline, e.g. `- {event_type}: {{ within: 15m }}`"
                    ),
                    ))
                }
                (_, Some(w)) => {
                    let d = parse_duration(&w).map_err(|p| (format!("{at}.within"), p))?;
                    if d.is_zero() {
                        return Err((format!("{at}.within"), "must be more than 0".into()));
                    }
                    Some(d)
                }
            };
        if partitions(&event_type).is_none() {
            return Err((
                at,
                format!("`{event_type}` is not declared under `event_types`"),
            ));
        }
        if steps.iter().any(|s| s.event_type == event_type) {
            return Err((at, format!("`{event_type}` is already a step of this flow")));
        }
        steps.push(FlowStep { event_type, within });
    }
    let counts: Vec<(String, i32)> = steps
        .iter()
        .map(|s| (s.event_type.clone(), partitions(&s.event_type).unwrap_or(0)))
        .collect();
    if counts.iter().any(|(_, p)| *p != counts[0].1) {
        let list: Vec<String> = counts.iter().map(|(t, p)| format!("{t}: {p}")).collect();
        return Err((
            key(".steps"),
            format!(
                "have fan-out topics with different partition counts ({}); one reconciler must own partition p of every step topic, so they must be equal",
                list.join(", ")
            ),
        ));
    }
    let allowed_lateness = match &spec.allowed_lateness {
        None => Duration::from_secs(60),
        Some(s) => parse_duration(s).map_err(|p| (key(".allowed_lateness"), p))?,
    };
    Ok(Flow {
        name: name.to_string(),
        key: spec.key.clone(),
        steps,
        allowed_lateness,
    })
}

/// `500ms`, `30s`, `15m`, `2h`, `1d` (a number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` has no unit: write e.g. 30s, 15m, 2h"))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: write e.g. 30s, 15m, 2h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> FlowSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("15 weeks").is_err());
    }

    #[test]
    fn a_flow_is_validated_with_errors_naming_the_key() {
        let parts = |t: &str| match t {
            "A" | "B" => Some(4),
            "C" => Some(2),
            _ => None,
        };
        let ok = validate_flow(
            "f",
            &spec("steps: [A, {B: {within: 15m}}]\nallowed_lateness: 2m"),
            parts,
        )
        .unwrap();
        assert_eq!(ok.steps[1].within, Some(Duration::from_secs(900)));
        assert_eq!(ok.allowed_lateness, Duration::from_secs(120));
        for (yaml, key, words) in [
            ("steps: [A]", "flows.f.steps", "two steps"),
            ("steps: [A, B]", "flows.f.steps[1]", "needs a deadline"),
            (
                "steps: [{A: {within: 1m}}, {B: {within: 1m}}]",
                "flows.f.steps[0]",
                "first step",
            ),
            (
                "steps: [A, {X: {within: 1m}}]",
                "flows.f.steps[1]",
                "not declared",
            ),
            (
                "steps: [A, {A: {within: 1m}}]",
                "flows.f.steps[1]",
                "already a step",
            ),
            (
                "steps: [A, {C: {within: 1m}}]",
                "flows.f.steps",
                "different partition counts",
            ),
            (
                "key: customer_id\nsteps: [A, {B: {within: 1m}}]",
                "flows.f.key",
                "order_id",
            ),
            (
                "steps: [A, {B: {within: soon}}]",
                "flows.f.steps[1].within",
                "duration",
            ),
        ] {
            let (k, p) = validate_flow("f", &spec(yaml), parts).unwrap_err();
            assert_eq!(k, key, "{yaml}");
            assert!(p.contains(words), "{yaml}: {p}");
        }
    }
}
