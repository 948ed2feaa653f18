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
//!       - ShipmentBooked: { within: 2h, after: previous, optional: true }
//!     ends_on: [OrderCancelled, PaymentFailed]
//!     match: [amount, customer_id]
//!     allowed_lateness: 2m
//!     clock_skew: 2s
//!     max_clock_skew: 5m
//! ```
//!
//! `within` is measured from the first step's `occurred_at` (event time), or from the previous
//! step's with `after: previous`. An `optional` step is never reported missing. An `ends_on`
//! event type ends the instance with an `ended` outcome (no deadline fires after it). `match`
//! names payload fields every step that has them must agree on (`mismatch` otherwise).
//! `clock_skew` is how far two clouds' clocks may disagree before `late` or `out_of_order`
//! counts; an `occurred_at` more than `max_clock_skew` ahead of when HELIOS received the event
//! is not trusted (the reception time counts instead).

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
    /// Event types that end an instance (an outcome of their own, no `missing` after them).
    #[serde(default)]
    pub ends_on: Vec<String>,
    /// Payload fields (`data.<field>`, else top level) every step that has them must agree on.
    #[serde(default, rename = "match")]
    pub match_fields: Vec<String>,
    /// How far clocks of two clouds may disagree (default 2s).
    #[serde(default)]
    pub clock_skew: Option<String>,
    /// How far an `occurred_at` may be ahead of its reception before it is not trusted
    /// (default 5m).
    #[serde(default)]
    pub max_clock_skew: Option<String>,
    /// How long outcome rows are kept (default 30d; published ones only are deleted).
    #[serde(default)]
    pub results_retention: Option<String>,
    /// Most open instances (a deadline pending) per partition; events of new orders beyond it
    /// are skipped and counted (default 1000000).
    #[serde(default)]
    pub max_open_per_partition: Option<u64>,
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
    /// `first` (default): `within` counts from the first step; `previous`: from the step before.
    #[serde(default)]
    pub after: Option<String>,
    /// Never reported missing (a late one is still `late`).
    #[serde(default)]
    pub optional: bool,
}

fn default_key() -> String {
    "order_id".into()
}

/// One step of a validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowStep {
    pub event_type: String,
    /// Deadline from the first step's event time (or the previous step's, see
    /// `after_previous`); none for the first step.
    pub within: Option<Duration>,
    /// `within` counts from the previous step's event time.
    pub after_previous: bool,
    /// Never reported missing.
    pub optional: bool,
}

impl FlowStep {
    /// A mandatory step with a deadline from the first step.
    pub fn new(event_type: &str, within: Option<Duration>) -> FlowStep {
        FlowStep {
            event_type: event_type.into(),
            within,
            after_previous: false,
            optional: false,
        }
    }
}

/// A validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub name: String,
    pub key: String,
    pub steps: Vec<FlowStep>,
    pub allowed_lateness: Duration,
    /// Event types that end an instance.
    pub ends_on: Vec<String>,
    /// Fields the steps must agree on.
    pub match_fields: Vec<String>,
    /// Tolerance between clouds' clocks for `late` and `out_of_order`.
    pub clock_skew: Duration,
    /// An `occurred_at` further ahead of its reception is not trusted.
    pub max_clock_skew: Duration,
    /// Outcome rows older than this are deleted.
    pub results_retention: Duration,
    /// Most open instances per partition.
    pub max_open_per_partition: u64,
}

/// Defaults of the flow options.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
pub const DEFAULT_RESULTS_RETENTION: Duration = Duration::from_secs(30 * 86_400);
pub const DEFAULT_MAX_OPEN_PER_PARTITION: u64 = 1_000_000;

impl Flow {
    /// A flow with default options (`order_id` key, no terminal steps, no field checks).
    pub fn new(name: &str, steps: Vec<FlowStep>, allowed_lateness: Duration) -> Flow {
        Flow {
            name: name.into(),
            key: "order_id".into(),
            steps,
            allowed_lateness,
            ends_on: vec![],
            match_fields: vec![],
            clock_skew: DEFAULT_CLOCK_SKEW,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            results_retention: DEFAULT_RESULTS_RETENTION,
            max_open_per_partition: DEFAULT_MAX_OPEN_PER_PARTITION,
        }
    }

    /// Every event type the flow reads: its steps, then its terminal types.
    pub fn event_types(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| s.event_type.clone())
            .chain(self.ends_on.iter().cloned())
            .collect()
    }

    /// The position of an event type among the steps.
    pub fn step_index(&self, event_type: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.event_type == event_type)
    }

    /// `OrderPlaced → PaymentProcessed within 900s → …`.
    pub fn describe(&self) -> String {
        let steps = self
            .steps
            .iter()
            .map(|s| {
                let mut d = match s.within {
                    Some(w) if s.after_previous => {
                        format!("{} within {}s of the previous", s.event_type, w.as_secs())
                    }
                    Some(w) => format!("{} within {}s", s.event_type, w.as_secs()),
                    None => s.event_type.clone(),
                };
                if s.optional {
                    d.push_str(" (optional)");
                }
                d
            })
            .collect::<Vec<_>>()
            .join(" → ");
        if self.ends_on.is_empty() {
            steps
        } else {
            format!("{steps}; ends on {}", self.ends_on.join(", "))
        }
    }

    /// The longest deadline from the first step, relative ones chained (an instance without
    /// its first step is an orphan after it).
    pub fn longest(&self) -> Duration {
        let mut at = Duration::ZERO;
        let mut longest = Duration::ZERO;
        for s in &self.steps {
            let w = s.within.unwrap_or_default();
            at = if s.after_previous { at + w } else { w };
            longest = longest.max(at);
        }
        longest
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
        let (event_type, within, after, optional) = match s {
            StepSpec::Bare(t) => (t.clone(), None, None, false),
            StepSpec::WithOptions(m) if m.len() == 1 => {
                let (t, o) = m.iter().next().expect("one entry");
                (t.clone(), o.within.clone(), o.after.clone(), o.optional)
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
        let after_previous = match after.as_deref() {
            None | Some("first") => false,
            Some("previous") if i > 0 => true,
            Some(other) => {
                return Err((
                    format!("{at}.after"),
                    format!("is `{other}`: write `first` (the default) or `previous` (not on the first step)"),
                ))
            }
        };
        if optional && i == 0 {
            return Err((
                format!("{at}.optional"),
                "is set on the first step: every instance starts with it".into(),
            ));
        }
        steps.push(FlowStep {
            event_type,
            within,
            after_previous,
            optional,
        });
    }
    if steps.iter().all(|s| s.optional) {
        return Err((key(".steps"), "are all optional".into()));
    }
    for (i, t) in spec.ends_on.iter().enumerate() {
        let at = key(&format!(".ends_on[{i}]"));
        if partitions(t).is_none() {
            return Err((at, format!("`{t}` is not declared under `event_types`")));
        }
        if steps.iter().any(|s| &s.event_type == t) || spec.ends_on[..i].contains(t) {
            return Err((
                at,
                format!("`{t}` is already a step or a terminal type of this flow"),
            ));
        }
    }
    if spec.match_fields.len() > 16 {
        return Err((key(".match"), "names more than 16 fields".into()));
    }
    for (i, f) in spec.match_fields.iter().enumerate() {
        if f.is_empty()
            || f.len() > 64
            || !f
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err((
                key(&format!(".match[{i}]")),
                format!("`{f}` is not a field name: 1–64 letters, digits, `_` or `-`"),
            ));
        }
    }
    let counts: Vec<(String, i32)> = steps
        .iter()
        .map(|s| s.event_type.clone())
        .chain(spec.ends_on.iter().cloned())
        .map(|t| {
            let p = partitions(&t).unwrap_or(0);
            (t, p)
        })
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
    let skew = |k: &str, v: &Option<String>, d: Duration| match v {
        None => Ok(d),
        Some(s) => parse_duration(s).map_err(|p| (key(k), p)),
    };
    let clock_skew = skew(".clock_skew", &spec.clock_skew, DEFAULT_CLOCK_SKEW)?;
    let max_clock_skew = skew(
        ".max_clock_skew",
        &spec.max_clock_skew,
        DEFAULT_MAX_CLOCK_SKEW,
    )?;
    if max_clock_skew < clock_skew {
        return Err((
            key(".max_clock_skew"),
            "is less than `clock_skew`: an event within the tolerance would not be trusted".into(),
        ));
    }
    let results_retention = skew(
        ".results_retention",
        &spec.results_retention,
        DEFAULT_RESULTS_RETENTION,
    )?;
    if results_retention < Duration::from_secs(1) {
        return Err((key(".results_retention"), "must be at least 1s".into()));
    }
    let max_open_per_partition = spec
        .max_open_per_partition
        .unwrap_or(DEFAULT_MAX_OPEN_PER_PARTITION);
    if max_open_per_partition == 0 {
        return Err((key(".max_open_per_partition"), "must be at least 1".into()));
    }
    Ok(Flow {
        name: name.to_string(),
        key: spec.key.clone(),
        steps,
        allowed_lateness,
        ends_on: spec.ends_on.clone(),
        match_fields: spec.match_fields.clone(),
        clock_skew,
        max_clock_skew,
        results_retention,
        max_open_per_partition,
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
        assert_eq!(ok.clock_skew, DEFAULT_CLOCK_SKEW);
        let rich = validate_flow(
            "f",
            &spec("steps: [A, {B: {within: 1m, after: previous, optional: true}}, {C: {within: 2m, after: previous}}]\nends_on: [D]\nmatch: [amount]\nclock_skew: 1s\nmax_clock_skew: 1m"),
            |t| (t != "X").then_some(4),
        )
        .unwrap();
        assert!(rich.steps[1].after_previous && rich.steps[1].optional);
        assert_eq!(rich.longest(), Duration::from_secs(180), "chained");
        assert_eq!(rich.event_types(), vec!["A", "B", "C", "D"]);
        assert_eq!(rich.match_fields, vec!["amount"]);
        assert!(rich.describe().contains("ends on D"), "{}", rich.describe());
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
            (
                "steps: [A, {B: {within: 1m, after: last}}]",
                "flows.f.steps[1].after",
                "previous",
            ),
            (
                "steps: [A, {B: {within: 1m}}]\nends_on: [X]",
                "flows.f.ends_on[0]",
                "not declared",
            ),
            (
                "steps: [A, {B: {within: 1m}}]\nends_on: [B]",
                "flows.f.ends_on[0]",
                "already",
            ),
            (
                "steps: [A, {B: {within: 1m}}]\nends_on: [C]",
                "flows.f.steps",
                "different partition counts",
            ),
            (
                "steps: [A, {B: {within: 1m}}]\nmatch: [\"a.b\"]",
                "flows.f.match[0]",
                "field name",
            ),
            (
                "steps: [A, {B: {within: 1m}}]\nclock_skew: 1m\nmax_clock_skew: 1s",
                "flows.f.max_clock_skew",
                "less than",
            ),
        ] {
            let (k, p) = validate_flow("f", &spec(yaml), parts).unwrap_err();
            assert_eq!(k, key, "{yaml}");
            assert!(p.contains(words), "{yaml}: {p}");
        }
    }
}
