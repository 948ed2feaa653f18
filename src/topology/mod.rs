//! `topology.yaml`: the topics HELIOS owns, the consumer group, and the business rules per event
//! type. It is the one file an operator edits to add an event type or rename a topic; everything
//! else (addresses, secrets) comes from the environment. `helios topology validate` checks it
//! without a broker, `helios topology apply` creates what it declares.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::source::Source;

pub mod events_table;
pub mod flows;
pub use events_table::{EventsTableSpec, Partitioning, Period};
pub use flows::{Flow, FlowSpec, FlowStep, DEFAULT_CLOCK_SKEW, DEFAULT_MAX_CLOCK_SKEW};

/// Why a topology file cannot be used; every variant names the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("topology file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("topology file {path}: `{key}` {problem}")]
    Invalid {
        path: String,
        key: String,
        problem: String,
    },
}

/// One topic HELIOS creates: its name (before the prefix), partitions and topic configs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Topic-level configs (`retention.ms`, `max.message.bytes`, ...), on top of `topic_config`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Only under `dlq`: what `helios dlq heal` does per reason (see [`HealPolicy`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub heal: BTreeMap<String, HealPolicy>,
}

/// What `helios dlq heal` does with the DLQ records of one reason (`dlq.heal` in topology.yaml).
/// Every reason a deploy can cure is `auto` unless set: a record is healed only when the check
/// in memory says its cause is gone, so `auto` moves nothing that would fail again.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealPolicy {
    /// Checked against the current topology and schemas; redriven when it passes.
    Auto,
    /// Left for a person (`helios dlq redrive`); `heal` lists them as waiting.
    Manual,
}

/// The raw landing topic of each source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTopics {
    pub aws: TopicSpec,
    pub gcp: TopicSpec,
    pub azure: TopicSpec,
    pub direct: TopicSpec,
}

/// How the fan-out topics are named and sized.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventTopics {
    /// Must contain `{event_type}`.
    #[serde(default = "default_event_template")]
    pub name_template: String,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// Business rules of one event type.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventTypeSpec {
    /// Fields of the business payload that must be present and not null/empty.
    #[serde(default)]
    pub required: Vec<String>,
    /// Avro schema file (relative to the topology file); default `schemas/<Type>.avsc` when present.
    #[serde(default)]
    pub schema: Option<String>,
    /// Partitions of this type's fan-out topic (default: `event_topics.partitions`).
    #[serde(default)]
    pub partitions: Option<i32>,
}

/// A request rate limit of one source's endpoints (a token bucket).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once above the sustained rate (default: one second's worth).
    #[serde(default)]
    pub burst: u32,
}

/// What the processor does with an event type the topology does not declare.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownEventTypePolicy {
    /// Fan out when `helios.events.<Type>` exists on the broker, else DLQ (`unknown_event_type`).
    #[default]
    FanOutIfTopicExists,
    /// Always DLQ with reason `unknown_event_type`.
    Dlq,
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Prepended to every topic name (environments, tenants, tests). `HELIOS_TOPIC_PREFIX` wins.
    #[serde(default)]
    pub topic_prefix: String,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Topic configs applied to every topic HELIOS creates.
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    pub raw_topics: RawTopics,
    pub dlq: TopicSpec,
    #[serde(default = "default_event_topics")]
    pub event_topics: EventTopics,
    #[serde(default = "default_group")]
    pub consumer_group: String,
    /// librdkafka properties for every Kafka client (SASL, TLS, tuning). Environment `KAFKA_*` wins.
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
    #[serde(default)]
    pub event_types: BTreeMap<String, EventTypeSpec>,
    #[serde(default)]
    pub unknown_event_types: UnknownEventTypePolicy,
    /// Per-source request rate limits of the ingress (`aws`, `gcp`, `azure`, `direct`); a source
    /// without one is not limited (the in-flight cap still applies).
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// Lifecycles `helios reconcile` follows across event types (see [`flows`]).
    #[serde(default)]
    pub flows: BTreeMap<String, FlowSpec>,
    /// Where `helios reconcile` writes one record per outcome, keyed by the flow key.
    #[serde(default = "default_reconciliation_topic")]
    pub reconciliation: TopicSpec,
    /// The consumer group of `helios reconcile`.
    #[serde(default = "default_reconciler_group")]
    pub reconciler_group: String,
    /// The layout of the PostgreSQL `events` table: partitioning by `occurred_at`, retention.
    #[serde(default)]
    pub events_table: EventsTableSpec,
    /// Directory of the topology file (schemas are found relative to it); none when built in.
    #[serde(skip)]
    pub base_dir: Option<std::path::PathBuf>,
}

fn default_partitions() -> i32 {
    4
}
fn default_replication() -> i32 {
    1
}
fn default_group() -> String {
    "helios-processor".into()
}
fn default_reconciler_group() -> String {
    "helios-reconciler".into()
}
fn default_reconciliation_topic() -> TopicSpec {
    TopicSpec {
        name: "helios.reconciliation".into(),
        partitions: default_partitions(),
        config: BTreeMap::new(),
        heal: BTreeMap::new(),
    }
}
fn default_event_template() -> String {
    "helios.events.{event_type}".into()
}
fn default_event_topics() -> EventTopics {
    EventTopics {
        name_template: default_event_template(),
        partitions: default_partitions(),
        config: BTreeMap::new(),
    }
}

/// A topic as it should exist on the broker: full name (prefix applied) and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTopic {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
    pub role: String,
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: p.clone(),
            source,
        })?;
        let mut t = Self::parse(&text, &p)?;
        t.base_dir = Some(
            path.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(|d| d.to_path_buf())
                .unwrap_or_else(|| std::path::PathBuf::from(".")),
        );
        Ok(t)
    }

    /// Parses and validates topology text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Topology, TopologyError> {
        let topo: Topology = serde_norway::from_str(text).map_err(|e| TopologyError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        topo.validate(origin)?;
        Ok(topo)
    }

    /// The built-in topology (same as the repository's `topology.yaml`), for the demo and tests.
    pub fn builtin() -> Topology {
        Self::parse(
            include_str!("../../topology.yaml"),
            "built-in topology.yaml",
        )
        .expect("the built-in topology.yaml is valid (checked by a unit test)")
    }

    fn validate(&self, origin: &str) -> Result<(), TopologyError> {
        let bad = |key: &str, problem: String| TopologyError::Invalid {
            path: origin.to_string(),
            key: key.to_string(),
            problem,
        };
        if self.replication_factor < 1 && self.replication_factor != -1 {
            return Err(bad(
                "replication_factor",
                format!(
                    "is {}; use a positive number, or -1 for the broker's default",
                    self.replication_factor
                ),
            ));
        }
        if !self.topic_prefix.is_empty() {
            check_topic_name(&self.topic_prefix).map_err(|p| bad("topic_prefix", p))?;
        }
        let mut specs: Vec<(String, &TopicSpec)> = Source::ALL
            .iter()
            .map(|s| (format!("raw_topics.{}", s.as_str()), self.raw_spec(*s)))
            .collect();
        specs.push(("dlq".into(), &self.dlq));
        specs.push(("reconciliation".into(), &self.reconciliation));
        for reason in self.dlq.heal.keys() {
            match crate::model::DlqReason::parse(reason) {
                Some(r) if r.curable_by_deploy() => {}
                Some(_) => {
                    return Err(bad(
                        &format!("dlq.heal.{reason}"),
                        "names a reason no deploy can cure: it is never healed (use `helios dlq redrive` for a record you know is fixed)".into(),
                    ))
                }
                None => {
                    return Err(bad(
                        &format!("dlq.heal.{reason}"),
                        format!(
                            "is no DLQ reason; healable: {}",
                            crate::model::DlqReason::ALL
                                .iter()
                                .filter(|r| r.curable_by_deploy())
                                .map(|r| r.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ))
                }
            }
        }
        let mut seen = BTreeMap::new();
        for (key, spec) in &specs {
            if !spec.heal.is_empty() && key != "dlq" {
                return Err(bad(
                    &format!("{key}.heal"),
                    "is only for the `dlq` topic".into(),
                ));
            }
            check_topic_name(&spec.name).map_err(|p| bad(&format!("{key}.name"), p))?;
            if spec.partitions < 1 {
                return Err(bad(
                    &format!("{key}.partitions"),
                    format!("is {}; a topic needs at least 1 partition", spec.partitions),
                ));
            }
            if let Some(other) = seen.insert(spec.name.clone(), key.clone()) {
                return Err(bad(
                    &format!("{key}.name"),
                    format!("`{}` is already used by `{other}`", spec.name),
                ));
            }
        }
        if !self.event_topics.name_template.contains("{event_type}") {
            return Err(bad(
                "event_topics.name_template",
                "must contain `{event_type}`, e.g. `helios.events.{event_type}`".into(),
            ));
        }
        if self.event_topics.partitions < 1 {
            return Err(bad("event_topics.partitions", "must be at least 1".into()));
        }
        if self.consumer_group.trim().is_empty() {
            return Err(bad("consumer_group", "must not be empty".into()));
        }
        for (name, limit) in &self.rate_limits {
            let key = format!("rate_limits.{name}");
            if Source::parse(name).is_none() {
                return Err(bad(
                    &key,
                    "is not a source: use aws, gcp, azure or direct".into(),
                ));
            }
            if limit.per_second == 0 {
                return Err(bad(
                    &format!("{key}.per_second"),
                    "must be at least 1".into(),
                ));
            }
        }
        for (name, spec) in &self.event_types {
            let key = format!("event_types.{name}");
            if name.is_empty()
                || !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(bad(
                    &key,
                    "is not a valid event type name: use letters, digits and `_`, starting with a letter (e.g. OrderPlaced)".into(),
                ));
            }
            let topic = self.event_topic_unprefixed(name);
            check_topic_name(&topic)
                .map_err(|p| bad(&key, format!("gives topic `{topic}`: {p}")))?;
            if let Some(other) = seen.insert(topic.clone(), key.clone()) {
                return Err(bad(
                    &key,
                    format!("topic `{topic}` is already used by `{other}`"),
                ));
            }
            for (i, field) in spec.required.iter().enumerate() {
                if field.trim().is_empty() {
                    return Err(bad(&format!("{key}.required[{i}]"), "is empty".into()));
                }
            }
            if spec.partitions.is_some_and(|p| p < 1) {
                return Err(bad(
                    &format!("{key}.partitions"),
                    "must be at least 1".into(),
                ));
            }
        }
        if self.reconciler_group.trim().is_empty() {
            return Err(bad("reconciler_group", "must not be empty".into()));
        }
        if self.reconciler_group == self.consumer_group {
            return Err(bad(
                "reconciler_group",
                "must differ from `consumer_group` (they read different topics)".into(),
            ));
        }
        self.flows_in(origin)?;
        self.events_table
            .validate()
            .map_err(|(key, problem)| bad(&key, problem))?;
        Ok(())
    }

    /// The partitioned layout `events_table:` asks for; `None` for one unpartitioned table.
    pub fn events_partitioning(&self) -> Option<Partitioning> {
        // Validated when the file was read.
        self.events_table.validate().ok().flatten()
    }

    /// The validated flows, by name.
    pub fn flows(&self) -> Result<Vec<Flow>, TopologyError> {
        self.flows_in("topology.yaml")
    }

    fn flows_in(&self, origin: &str) -> Result<Vec<Flow>, TopologyError> {
        self.flows
            .iter()
            .map(|(name, spec)| {
                flows::validate_flow(name, spec, |t| self.event_partitions(t)).map_err(
                    |(key, problem)| TopologyError::Invalid {
                        path: origin.to_string(),
                        key,
                        problem,
                    },
                )
            })
            .collect()
    }

    /// Partitions of a declared event type's fan-out topic.
    pub fn event_partitions(&self, event_type: &str) -> Option<i32> {
        self.event_types
            .get(event_type)
            .map(|s| s.partitions.unwrap_or(self.event_topics.partitions))
    }

    /// Full name of the reconciliation topic.
    pub fn reconciliation_topic(&self) -> String {
        format!("{}{}", self.topic_prefix, self.reconciliation.name)
    }

    /// The rate limits by source (a missing `burst` is one second's worth).
    pub fn source_rate_limits(&self) -> BTreeMap<Source, RateLimit> {
        self.rate_limits
            .iter()
            .filter_map(|(k, l)| {
                Source::parse(k).map(|s| {
                    let burst = if l.burst == 0 { l.per_second } else { l.burst };
                    (
                        s,
                        RateLimit {
                            per_second: l.per_second,
                            burst,
                        },
                    )
                })
            })
            .collect()
    }

    /// What `helios dlq heal` does with `reason`: `None` when it is never healed.
    pub fn heal_policy(&self, reason: crate::model::DlqReason) -> Option<HealPolicy> {
        reason.curable_by_deploy().then(|| {
            self.dlq
                .heal
                .get(reason.as_str())
                .copied()
                .unwrap_or(HealPolicy::Auto)
        })
    }

    fn raw_spec(&self, source: Source) -> &TopicSpec {
        match source {
            Source::Aws => &self.raw_topics.aws,
            Source::Gcp => &self.raw_topics.gcp,
            Source::Azure => &self.raw_topics.azure,
            Source::Direct => &self.raw_topics.direct,
        }
    }

    fn event_topic_unprefixed(&self, event_type: &str) -> String {
        self.event_topics
            .name_template
            .replace("{event_type}", event_type)
    }

    /// Full name of a source's raw topic.
    pub fn raw_topic(&self, source: Source) -> String {
        format!("{}{}", self.topic_prefix, self.raw_spec(source).name)
    }

    /// Full name of the dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        format!("{}{}", self.topic_prefix, self.dlq.name)
    }

    /// Full name of an event type's fan-out topic.
    pub fn event_topic(&self, event_type: &str) -> String {
        format!(
            "{}{}",
            self.topic_prefix,
            self.event_topic_unprefixed(event_type)
        )
    }

    /// Every topic the topology declares, with its final name and settings.
    pub fn planned_topics(&self) -> Vec<PlannedTopic> {
        let plan = |spec: &TopicSpec, role: String| PlannedTopic {
            name: format!("{}{}", self.topic_prefix, spec.name),
            partitions: spec.partitions,
            replication_factor: self.replication_factor,
            config: merged(&self.topic_config, &spec.config),
            role,
        };
        let mut out: Vec<PlannedTopic> = Source::ALL
            .iter()
            .map(|s| plan(self.raw_spec(*s), format!("raw ({})", s.as_str())))
            .collect();
        out.push(plan(&self.dlq, "dead-letter".into()));
        out.push(plan(&self.reconciliation, "reconciliation".into()));
        for name in self.event_types.keys() {
            out.push(PlannedTopic {
                name: self.event_topic(name),
                partitions: self
                    .event_partitions(name)
                    .unwrap_or(self.event_topics.partitions),
                replication_factor: self.replication_factor,
                config: merged(&self.topic_config, &self.event_topics.config),
                role: format!("events ({name})"),
            });
        }
        out
    }
}

fn merged(
    base: &BTreeMap<String, String>,
    over: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut m = base.clone();
    m.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}

/// Kafka's own rule: 1–249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > 249 {
        return Err(format!("is {} characters; Kafka allows 249", name.len()));
    }
    if name == "." || name == ".." {
        return Err("cannot be `.` or `..`".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` has `{c}`; Kafka topic names use only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_topology_is_valid_and_has_the_original_rules() {
        let t = Topology::builtin();
        assert_eq!(t.raw_topic(Source::Aws), "helios.raw.aws");
        assert_eq!(t.dlq_topic(), "helios.dlq");
        assert_eq!(t.event_topic("OrderPlaced"), "helios.events.OrderPlaced");
        assert_eq!(
            t.event_types["OrderPlaced"].required,
            vec!["customer_id", "order_id"]
        );
        assert_eq!(
            t.event_types["PaymentProcessed"].required,
            vec!["amount", "order_id"]
        );
        assert_eq!(
            t.event_types["InventoryReserved"].required,
            vec!["order_id"]
        );
        let names: Vec<_> = t.planned_topics().into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"helios.raw.direct".to_string()));
        assert!(names.contains(&"helios.events.PaymentProcessed".to_string()));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = include_str!("../../topology.yaml").replace("consumer_group:", "consumer_grup:");
        let err = Topology::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("consumer_grup"), "{err}");
        assert!(err.contains("t.yaml"), "{err}");
    }

    #[test]
    fn heal_policies_default_to_auto_for_what_a_deploy_cures_only() {
        let t = Topology::parse(include_str!("../../topology.yaml"), "t.yaml").unwrap();
        use crate::model::DlqReason as R;
        assert_eq!(t.heal_policy(R::UnknownEventType), Some(HealPolicy::Auto));
        assert_eq!(t.heal_policy(R::SchemaViolation), Some(HealPolicy::Manual));
        assert_eq!(t.heal_policy(R::InvalidJson), None);
        assert_eq!(t.heal_policy(R::SinkRejected), None);
        let mut bare = t.clone();
        bare.dlq.heal.clear();
        assert_eq!(bare.heal_policy(R::SchemaViolation), Some(HealPolicy::Auto));
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = include_str!("../../topology.yaml");
        let cases = [
            (
                base.replacen("name: helios.dlq", "name: helios dlq", 1),
                "dlq.name",
            ),
            (
                base.replacen("name: helios.raw.gcp", "name: helios.raw.aws", 1),
                "raw_topics.gcp.name",
            ),
            (
                base.replacen("OrderPlaced:", "Order-Placed:", 1),
                "event_types.Order-Placed",
            ),
            (
                base.replacen("schema_violation: manual", "invalid_json: auto", 1),
                "dlq.heal.invalid_json",
            ),
            (
                base.replacen("schema_violation: manual", "no_such_reason: auto", 1),
                "dlq.heal.no_such_reason",
            ),
            (
                base.replacen(
                    "name: helios.raw.gcp",
                    "name: helios.raw.gcp\n    heal: {unknown_event_type: auto}",
                    1,
                ),
                "raw_topics.gcp.heal",
            ),
        ];
        for (text, key) in cases {
            let err = Topology::parse(&text, "t.yaml").unwrap_err().to_string();
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
    }

    #[test]
    fn a_flow_over_topics_with_different_partition_counts_is_refused() {
        let base = include_str!("../../topology.yaml");
        let text = base.replacen(
            "  InventoryReserved:\n    required: [order_id]",
            "  InventoryReserved:\n    required: [order_id]\n    partitions: 8",
            1,
        );
        assert_ne!(text, base);
        let err = Topology::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("flows.order_lifecycle.steps"), "{err}");
        assert!(err.contains("InventoryReserved: 8"), "{err}");
        let t = Topology::builtin();
        let f = &t.flows().unwrap()[0];
        assert_eq!(f.steps.len(), 3);
        assert_eq!(t.reconciliation_topic(), "helios.reconciliation");
    }

    #[test]
    fn prefix_applies_to_every_topic() {
        let mut t = Topology::builtin();
        t.topic_prefix = "test1.".into();
        assert!(t
            .planned_topics()
            .iter()
            .all(|p| p.name.starts_with("test1.")));
    }
}
