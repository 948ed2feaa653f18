//! Typed configuration every command shares, layered: `topology.yaml` < environment (and
//! `.env`) < command-line flags: how to reach Kafka, the topology, the record size limit, and the
//! deployment mode. The ingress's options live with the ingress (each cloud's in its own
//! folder), the processor's with the pipeline.
//!
//! Clap does the environment + flag layering (`#[arg(env = ...)]`), so a bad value is reported
//! with the flag and the variable that carried it. The structs here are the runtime shape the
//! rest of the crate uses; tests build them directly.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::topology::Topology;

/// Default librdkafka bootstrap address when `KAFKA_BOOTSTRAP_SERVERS` is not set.
pub const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:9092";

/// Development accepts unauthenticated endpoints (with a warning); production refuses to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeploymentMode {
    #[default]
    #[value(alias = "demo", alias = "dev")]
    Development,
    #[value(alias = "prod")]
    Production,
}

/// Options every command that talks to Kafka shares.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// The topology file (topics, consumer group, business rules).
    #[arg(long, env = "HELIOS_TOPOLOGY", default_value = "topology.yaml")]
    pub topology: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = DEFAULT_BOOTSTRAP)]
    pub kafka_bootstrap_servers: String,
    /// Extra librdkafka property for every client, e.g. `security.protocol=SASL_SSL` (repeatable).
    /// Environment variables `KAFKA_<PROPERTY>` (e.g. `KAFKA_SASL_USERNAME`) work too.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_properties: Vec<String>,
    /// Prefix for every topic name (overrides `topic_prefix` in the topology file).
    #[arg(long, env = "HELIOS_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,
    /// Consumer group of the processors (overrides `consumer_group` in the topology file).
    #[arg(long, env = "HELIOS_CONSUMER_GROUP")]
    pub consumer_group: Option<String>,
    /// Largest request body the ingress accepts (larger ones get 413). Every other record size
    /// derives from it: raw records, the processor's fan-out and DLQ records, and the
    /// `max.message.bytes` each topic must allow (checked at start-up).
    #[arg(long, env = "HELIOS_MAX_BODY_BYTES", default_value_t = crate::limits::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
}

impl KafkaArgs {
    /// The record size limits (from `HELIOS_MAX_BODY_BYTES`).
    pub fn limits(&self) -> anyhow::Result<crate::limits::SizeLimits> {
        if self.max_body_bytes == 0 {
            bail!("HELIOS_MAX_BODY_BYTES / --max-body-bytes must be greater than 0");
        }
        Ok(crate::limits::SizeLimits {
            max_body_bytes: self.max_body_bytes,
        })
    }

    /// Loads the topology file and builds the Kafka settings from it, the environment and flags.
    pub fn resolve(&self) -> anyhow::Result<(Topology, KafkaSettings)> {
        let mut topology = Topology::load(&self.topology)?;
        if let Some(prefix) = &self.topic_prefix {
            crate::topology::check_topic_name(prefix)
                .map_err(|p| anyhow::anyhow!("HELIOS_TOPIC_PREFIX / --topic-prefix {p}"))?;
            topology.topic_prefix = prefix.clone();
        }
        if let Some(group) = self
            .consumer_group
            .as_ref()
            .filter(|g| !g.trim().is_empty())
        {
            topology.consumer_group = group.clone();
        }
        let mut properties = topology.kafka.clone();
        properties.extend(kafka_properties_from_env(std::env::vars()));
        for kv in &self.kafka_properties {
            let (k, v) = kv.split_once('=').with_context(|| {
                format!(
                    "--kafka-property `{kv}` must be KEY=VALUE, e.g. security.protocol=SASL_SSL"
                )
            })?;
            properties.insert(k.trim().to_string(), v.to_string());
        }
        let settings = KafkaSettings {
            bootstrap_servers: self.kafka_bootstrap_servers.clone(),
            properties,
        };
        settings.check()?;
        Ok((topology, settings))
    }
}

/// The librdkafka property naming a static group member (`KAFKA_GROUP_INSTANCE_ID`).
const GROUP_INSTANCE_ID: &str = "group.instance.id";

/// The longest wait between connection attempts to a broker (see [`KafkaSettings::client_config`]).
const RECONNECT_BACKOFF_MAX: &str = "reconnect.backoff.max.ms";

/// How to reach Kafka: bootstrap servers plus pass-through librdkafka properties.
#[derive(Debug, Clone, Default)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub properties: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// Settings for a plain broker at `bootstrap`.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        KafkaSettings {
            bootstrap_servers: bootstrap.into(),
            properties: BTreeMap::new(),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            bail!("KAFKA_BOOTSTRAP_SERVERS / --kafka-bootstrap-servers is empty");
        }
        if self.properties.contains_key("bootstrap.servers") {
            bail!(
                "set the bootstrap servers with KAFKA_BOOTSTRAP_SERVERS, not as a kafka property"
            );
        }
        Ok(())
    }

    /// A librdkafka config with the bootstrap servers and every pass-through property but the
    /// group member's identity (`group.instance.id`: see [`Self::member_config`]).
    ///
    /// One default differs from librdkafka's: `reconnect.backoff.max.ms` is 1000 (the Java
    /// client's default) instead of 10000. librdkafka doubles the wait after each refused
    /// connect, so a broker back after a 4 s restart was reached only 3–5 s later (the ingress
    /// answering 503 and the processor idle meanwhile, and a cloud that retries on its own
    /// schedule waiting longer still); a few clients per instance reconnecting once a second
    /// cost a broker nothing. `KAFKA_RECONNECT_BACKOFF_MAX_MS` sets it.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        if !self.properties.contains_key(RECONNECT_BACKOFF_MAX) {
            c.set(RECONNECT_BACKOFF_MAX, "1000");
        }
        for (k, v) in &self.properties {
            if k != GROUP_INSTANCE_ID {
                c.set(k, v);
            }
        }
        c
    }

    /// [`Self::client_config`] for the consumer that is the service's member of its group:
    /// with `group.instance.id` (static membership) when set. Producers, admin clients and
    /// helper readers never carry it (one identity per member; librdkafka warns otherwise).
    pub fn member_config(&self) -> rdkafka::ClientConfig {
        let mut c = self.client_config();
        if let Some(id) = self.properties.get(GROUP_INSTANCE_ID) {
            c.set(GROUP_INSTANCE_ID, id);
        }
        c
    }
}

/// librdkafka's property aliases (CONFIGURATION.md, "Alias for"): the same setting under two
/// names. rust-rdkafka applies a config map in hash order, so when both names are set either may
/// win; a pinned setting is therefore set under its name with every alias removed.
const ALIASES: &[(&str, &str)] = &[
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("linger.ms", "queue.buffering.max.ms"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("retries", "message.send.max.retries"),
    ("compression.type", "compression.codec"),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("enable.auto.commit", "auto.commit.enable"),
    ("bootstrap.servers", "metadata.broker.list"),
];

/// Every name of `key` (itself and its aliases).
pub fn property_names(key: &str) -> Vec<&str> {
    let mut names = vec![key];
    for (a, b) in ALIASES {
        if *a == key {
            names.push(b);
        } else if *b == key {
            names.push(a);
        }
    }
    names
}

/// Sets a property HELIOS's guarantees depend on: under every alias removed first, so no
/// pass-through property can override it (start-up refuses a conflicting one before this runs:
/// [`refuse_overrides`]).
pub fn pin(cfg: &mut rdkafka::ClientConfig, key: &str, value: &str) {
    for name in property_names(key) {
        cfg.remove(name);
    }
    cfg.set(key, value);
}

/// A setting HELIOS pins: the property, its value, and what depends on it (for the error).
pub struct Pinned<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub why: &'a str,
}

/// Refuses to start when a pass-through property (under its name or any alias) would change a
/// pinned setting, naming the property, where it can come from, and what it would break.
pub fn refuse_overrides(
    properties: &BTreeMap<String, String>,
    pinned: &[Pinned<'_>],
) -> anyhow::Result<()> {
    let mut problems = vec![];
    for p in pinned {
        for name in property_names(p.key) {
            if let Some(v) = properties.get(name) {
                if !v.trim().eq_ignore_ascii_case(p.value) {
                    let env = format!("KAFKA_{}", name.to_ascii_uppercase().replace('.', "_"));
                    let alias = if name == p.key {
                        String::new()
                    } else {
                        format!(", an alias of `{}`", p.key)
                    };
                    problems.push(format!(
                        "`{name}={v}` ({env}, --kafka-property or topology.yaml `kafka:`{alias}) would change a setting HELIOS pins: `{}={}` — {}",
                        p.key, p.value, p.why
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "Kafka properties refused (remove them):\n  - {}",
            problems.join("\n  - ")
        )
    }
}

/// `acks=all`, which every HELIOS producer pins.
pub const ACKS_ALL: Pinned<'static> = Pinned {
    key: "acks",
    value: "all",
    why: "a record counts as written only once every in-sync replica has it",
};

impl KafkaSettings {
    /// A producer config with `acks=all` pinned (refused at start-up when overridden).
    pub fn durable_producer_config(&self) -> anyhow::Result<rdkafka::ClientConfig> {
        refuse_overrides(&self.properties, &[ACKS_ALL])?;
        let mut c = self.client_config();
        pin(&mut c, "acks", "all");
        Ok(c)
    }
}

/// True when the user set `key` under any of its names.
pub fn property_set(properties: &BTreeMap<String, String>, key: &str) -> bool {
    property_names(key)
        .iter()
        .any(|n| properties.contains_key(*n))
}

/// `KAFKA_SASL_USERNAME=x` → `sasl.username=x`; `KAFKA_BOOTSTRAP_SERVERS` has its own option.
pub fn kafka_properties_from_env(
    vars: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    vars.filter_map(|(k, v)| {
        let rest = k.strip_prefix("KAFKA_")?;
        if rest == "BOOTSTRAP_SERVERS" || rest.is_empty() {
            return None;
        }
        Some((rest.to_ascii_lowercase().replace('_', "."), v))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_env_properties_map_to_librdkafka_names() {
        let vars = vec![
            ("KAFKA_BOOTSTRAP_SERVERS".to_string(), "x:1".to_string()),
            (
                "KAFKA_SECURITY_PROTOCOL".to_string(),
                "SASL_SSL".to_string(),
            ),
            ("KAFKA_SASL_USERNAME".to_string(), "u".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let m = kafka_properties_from_env(vars.into_iter());
        assert_eq!(m.len(), 2);
        assert_eq!(m["security.protocol"], "SASL_SSL");
        assert_eq!(m["sasl.username"], "u");
    }

    #[test]
    fn an_override_of_a_pinned_setting_under_any_name_is_refused() {
        let pinned = [Pinned {
            key: "acks",
            value: "all",
            why: "a 2xx means durable",
        }];
        for name in ["acks", "request.required.acks"] {
            let mut props = BTreeMap::new();
            props.insert(name.to_string(), "0".to_string());
            let e = refuse_overrides(&props, &pinned).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("acks=all"), "{e}");
        }
        let mut same = BTreeMap::new();
        same.insert("acks".to_string(), "ALL".to_string());
        assert!(refuse_overrides(&same, &pinned).is_ok());
        assert!(refuse_overrides(&BTreeMap::new(), &pinned).is_ok());
    }

    #[test]
    fn a_pinned_property_wins_over_every_alias() {
        let mut s = KafkaSettings::new("x:1");
        s.properties
            .insert("request.required.acks".into(), "0".into());
        s.properties
            .insert("delivery.timeout.ms".into(), "1".into());
        let mut c = s.client_config();
        pin(&mut c, "acks", "all");
        pin(&mut c, "message.timeout.ms", "30000");
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("request.required.acks"), None);
        assert_eq!(c.get("delivery.timeout.ms"), None);
        assert_eq!(c.get("message.timeout.ms"), Some("30000"));
        assert!(property_set(&s.properties, "acks"));
        assert!(!property_set(&s.properties, "linger.ms"));
    }

    #[test]
    fn clients_reconnect_within_a_second_unless_told_otherwise() {
        let mut s = KafkaSettings::new("x:1");
        assert_eq!(
            s.client_config().get("reconnect.backoff.max.ms"),
            Some("1000")
        );
        s.properties
            .insert("reconnect.backoff.max.ms".into(), "10000".into());
        assert_eq!(
            s.client_config().get("reconnect.backoff.max.ms"),
            Some("10000")
        );
        assert_eq!(
            s.member_config().get("reconnect.backoff.max.ms"),
            Some("10000")
        );
    }
}
