//! Typed configuration, layered: `topology.yaml` < environment (and `.env`) < command-line flags.
//!
//! Clap does the environment + flag layering (`#[arg(env = ...)]`), so a bad value is reported
//! with the flag and the variable that carried it. The structs here are the runtime shape the
//! rest of the crate uses; tests build them directly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

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
    #[arg(long, env = "HELIOS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
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

    /// A librdkafka config with the bootstrap servers and every pass-through property.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
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

/// Ingress options (HTTP server, limits, per-cloud authentication).
#[derive(Debug, Clone, clap::Args)]
pub struct IngressArgs {
    /// Address the HTTP server binds.
    #[arg(long, env = "API_HOST", default_value = "0.0.0.0")]
    pub api_host: String,
    /// Port the HTTP server binds (0 = any free port).
    #[arg(long, env = "API_PORT", default_value_t = 8000)]
    pub api_port: u16,
    /// development (unauthenticated endpoints allowed, with a warning) or production.
    #[arg(long, env = "DEPLOYMENT_MODE", value_enum, default_value_t = DeploymentMode::Development)]
    pub deployment_mode: DeploymentMode,
    /// How long a request waits for Kafka's acknowledgement before answering 503.
    /// Below EventBridge's 5 s response deadline by default.
    #[arg(long, env = "HELIOS_PRODUCE_TIMEOUT_MS", default_value_t = 4000)]
    pub produce_timeout_ms: u64,

    /// Header that carries the EventBridge API destination's API key.
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_API_KEY_HEADER",
        default_value = "x-helios-key"
    )]
    pub eventbridge_api_key_header: String,
    /// Expected API key value (EventBridge connection of type API key).
    #[arg(long, env = "HELIOS_EVENTBRIDGE_API_KEY", hide_env_values = true)]
    pub eventbridge_api_key: Option<String>,
    /// Expected Basic user (EventBridge connection of type Basic).
    #[arg(long, env = "HELIOS_EVENTBRIDGE_BASIC_USER")]
    pub eventbridge_basic_user: Option<String>,
    /// Expected Basic password.
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_BASIC_PASSWORD",
        hide_env_values = true
    )]
    pub eventbridge_basic_password: Option<String>,

    /// SNS topic ARNs allowed to deliver (comma-separated). Empty: any topic (warned at start).
    #[arg(long, env = "HELIOS_SNS_TOPIC_ARNS", value_delimiter = ',')]
    pub sns_topic_arns: Vec<String>,
    /// Verify SNS message signatures (turn off only for local experiments).
    #[arg(long, env = "HELIOS_SNS_VERIFY_SIGNATURES", default_value_t = true, action = clap::ArgAction::Set)]
    pub sns_verify_signatures: bool,
    /// Regex the origin (`scheme://host[:port]`) of SigningCertURL and SubscribeURL must match.
    #[arg(long, env = "HELIOS_SNS_HOST_PATTERN", default_value = crate::clouds::aws::sns::DEFAULT_SNS_HOST_PATTERN)]
    pub sns_host_pattern: String,
    /// Confirm SNS subscriptions automatically (GET SubscribeURL after the signature checked out).
    #[arg(long, env = "HELIOS_SNS_AUTO_CONFIRM", default_value_t = true, action = clap::ArgAction::Set)]
    pub sns_auto_confirm: bool,
    /// Secret expected in `?token=` for SNS raw message delivery (which carries no signature).
    #[arg(long, env = "HELIOS_SNS_RAW_DELIVERY_TOKEN", hide_env_values = true)]
    pub sns_raw_delivery_token: Option<String>,

    /// Expected `aud` of Pub/Sub push OIDC tokens; setting it turns JWT verification on.
    #[arg(long, env = "HELIOS_PUBSUB_OIDC_AUDIENCE")]
    pub pubsub_oidc_audience: Option<String>,
    /// Expected `email` (service account) of Pub/Sub push OIDC tokens.
    #[arg(long, env = "HELIOS_PUBSUB_OIDC_EMAIL")]
    pub pubsub_oidc_email: Option<String>,
    /// Where Google's signing keys (JWKS) are fetched from.
    #[arg(long, env = "HELIOS_PUBSUB_JWKS_URL", default_value = crate::clouds::gcp::oidc::GOOGLE_JWKS_URL)]
    pub pubsub_jwks_url: String,
    /// A JWKS file to use instead of fetching (air-gapped installs, tests).
    #[arg(long, env = "HELIOS_PUBSUB_JWKS_FILE")]
    pub pubsub_jwks_file: Option<PathBuf>,
    /// Shared secret expected in the push URL's `?token=` (alternative to OIDC).
    #[arg(long, env = "HELIOS_PUBSUB_TOKEN", hide_env_values = true)]
    pub pubsub_token: Option<String>,

    /// Shared secret for Event Grid deliveries (query parameter or header).
    #[arg(long, env = "HELIOS_EVENTGRID_SECRET", hide_env_values = true)]
    pub eventgrid_secret: Option<String>,
    /// Query parameter that carries the Event Grid secret.
    #[arg(long, env = "HELIOS_EVENTGRID_SECRET_PARAM", default_value = "code")]
    pub eventgrid_secret_param: String,
    /// Header (delivery property) that carries the Event Grid secret.
    #[arg(
        long,
        env = "HELIOS_EVENTGRID_SECRET_HEADER",
        default_value = "x-helios-key"
    )]
    pub eventgrid_secret_header: String,

    /// API key for `/api/v1/events/ingest`.
    #[arg(long, env = "HELIOS_INGEST_API_KEY", hide_env_values = true)]
    pub ingest_api_key: Option<String>,
    /// Header that carries the ingest API key.
    #[arg(
        long,
        env = "HELIOS_INGEST_API_KEY_HEADER",
        default_value = "x-api-key"
    )]
    pub ingest_api_key_header: String,
}

/// Runtime configuration of the ingress.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub host: String,
    pub port: u16,
    pub mode: DeploymentMode,
    pub max_body_bytes: usize,
    pub produce_timeout: Duration,
    pub kafka: KafkaSettings,
    pub topology: Topology,
    pub eventbridge: EventBridgeAuth,
    pub sns: SnsConfig,
    pub pubsub: PubSubConfig,
    pub eventgrid: EventGridConfig,
    pub ingest: IngestAuth,
}

/// EventBridge API destination connection secrets (either may be set; both = either accepted).
#[derive(Debug, Clone, Default)]
pub struct EventBridgeAuth {
    pub api_key_header: String,
    pub api_key: Option<String>,
    pub basic: Option<(String, String)>,
}

/// SNS subscription checks.
#[derive(Debug, Clone)]
pub struct SnsConfig {
    pub topic_arns: Vec<String>,
    pub verify_signatures: bool,
    pub host_pattern: String,
    pub auto_confirm: bool,
    pub raw_delivery_token: Option<String>,
}

/// Pub/Sub push checks.
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    pub oidc_audience: Option<String>,
    pub oidc_email: Option<String>,
    pub jwks_url: String,
    pub jwks_file: Option<PathBuf>,
    pub token: Option<String>,
}

/// Event Grid shared secret.
#[derive(Debug, Clone, Default)]
pub struct EventGridConfig {
    pub secret: Option<String>,
    pub secret_param: String,
    pub secret_header: String,
}

/// Direct ingest API key.
#[derive(Debug, Clone, Default)]
pub struct IngestAuth {
    pub api_key: Option<String>,
    pub header: String,
}

impl IngressConfig {
    /// Defaults (development mode, no authentication, port 0) for a broker and topology.
    pub fn new(kafka: KafkaSettings, topology: Topology) -> Self {
        IngressConfig {
            host: "127.0.0.1".into(),
            port: 0,
            mode: DeploymentMode::Development,
            max_body_bytes: 1024 * 1024,
            produce_timeout: Duration::from_millis(4000),
            kafka,
            topology,
            eventbridge: EventBridgeAuth {
                api_key_header: "x-helios-key".into(),
                ..Default::default()
            },
            sns: SnsConfig {
                topic_arns: vec![],
                verify_signatures: true,
                host_pattern: crate::clouds::aws::sns::DEFAULT_SNS_HOST_PATTERN.into(),
                auto_confirm: true,
                raw_delivery_token: None,
            },
            pubsub: PubSubConfig {
                oidc_audience: None,
                oidc_email: None,
                jwks_url: crate::clouds::gcp::oidc::GOOGLE_JWKS_URL.into(),
                jwks_file: None,
                token: None,
            },
            eventgrid: EventGridConfig {
                secret: None,
                secret_param: "code".into(),
                secret_header: "x-helios-key".into(),
            },
            ingest: IngestAuth {
                api_key: None,
                header: "x-api-key".into(),
            },
        }
    }

    /// Builds the runtime config from parsed flags/environment.
    pub fn from_args(kafka_args: &KafkaArgs, a: &IngressArgs) -> anyhow::Result<Self> {
        let (topology, kafka) = kafka_args.resolve()?;
        let mut c = IngressConfig::new(kafka, topology);
        c.host = a.api_host.clone();
        c.port = a.api_port;
        c.mode = a.deployment_mode;
        c.max_body_bytes = kafka_args.limits()?.max_body_bytes;
        if a.produce_timeout_ms == 0 {
            bail!("HELIOS_PRODUCE_TIMEOUT_MS / --produce-timeout-ms must be greater than 0");
        }
        c.produce_timeout = Duration::from_millis(a.produce_timeout_ms);
        c.eventbridge = EventBridgeAuth {
            api_key_header: a.eventbridge_api_key_header.clone(),
            api_key: a.eventbridge_api_key.clone().filter(|s| !s.is_empty()),
            basic: match (&a.eventbridge_basic_user, &a.eventbridge_basic_password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                (None, None) => None,
                _ => bail!(
                    "HELIOS_EVENTBRIDGE_BASIC_USER and HELIOS_EVENTBRIDGE_BASIC_PASSWORD must be set together"
                ),
            },
        };
        c.sns = SnsConfig {
            topic_arns: a
                .sns_topic_arns
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            verify_signatures: a.sns_verify_signatures,
            host_pattern: a.sns_host_pattern.clone(),
            auto_confirm: a.sns_auto_confirm,
            raw_delivery_token: a.sns_raw_delivery_token.clone().filter(|s| !s.is_empty()),
        };
        regex::Regex::new(&c.sns.host_pattern)
            .with_context(|| "HELIOS_SNS_HOST_PATTERN / --sns-host-pattern is not a valid regex")?;
        c.pubsub = PubSubConfig {
            oidc_audience: a.pubsub_oidc_audience.clone().filter(|s| !s.is_empty()),
            oidc_email: a.pubsub_oidc_email.clone().filter(|s| !s.is_empty()),
            jwks_url: a.pubsub_jwks_url.clone(),
            jwks_file: a.pubsub_jwks_file.clone(),
            token: a.pubsub_token.clone().filter(|s| !s.is_empty()),
        };
        if c.pubsub.oidc_email.is_some() && c.pubsub.oidc_audience.is_none() {
            bail!("HELIOS_PUBSUB_OIDC_EMAIL is set but HELIOS_PUBSUB_OIDC_AUDIENCE is not: set the audience to turn OIDC verification on");
        }
        c.eventgrid = EventGridConfig {
            secret: a.eventgrid_secret.clone().filter(|s| !s.is_empty()),
            secret_param: a.eventgrid_secret_param.clone(),
            secret_header: a.eventgrid_secret_header.clone(),
        };
        c.ingest = IngestAuth {
            api_key: a.ingest_api_key.clone().filter(|s| !s.is_empty()),
            header: a.ingest_api_key_header.clone(),
        };
        c.check_auth()?;
        Ok(c)
    }

    /// Which endpoints accept unauthenticated requests (a list of human-readable warnings).
    pub fn open_endpoints(&self) -> Vec<String> {
        let mut open = vec![];
        if self.eventbridge.api_key.is_none() && self.eventbridge.basic.is_none() {
            open.push("EventBridge: set HELIOS_EVENTBRIDGE_API_KEY or HELIOS_EVENTBRIDGE_BASIC_USER/PASSWORD".into());
        }
        if !self.sns.verify_signatures {
            open.push(
                "SNS: signature verification is off (HELIOS_SNS_VERIFY_SIGNATURES=false)".into(),
            );
        }
        if self.sns.topic_arns.is_empty() {
            open.push("SNS: any topic may deliver; set HELIOS_SNS_TOPIC_ARNS".into());
        }
        if self.pubsub.oidc_audience.is_none() && self.pubsub.token.is_none() {
            open.push("Pub/Sub: set HELIOS_PUBSUB_OIDC_AUDIENCE (+ HELIOS_PUBSUB_OIDC_EMAIL) or HELIOS_PUBSUB_TOKEN".into());
        }
        if self.eventgrid.secret.is_none() {
            open.push("Event Grid: set HELIOS_EVENTGRID_SECRET".into());
        }
        if self.ingest.api_key.is_none() {
            open.push("Direct ingest: set HELIOS_INGEST_API_KEY".into());
        }
        open
    }

    fn check_auth(&self) -> anyhow::Result<()> {
        let open = self.open_endpoints();
        if self.mode == DeploymentMode::Production && !open.is_empty() {
            bail!(
                "DEPLOYMENT_MODE=production refuses unauthenticated endpoints:\n  - {}",
                open.join("\n  - ")
            );
        }
        Ok(())
    }
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
}

/// Processor options (PostgreSQL, Redis, batching).
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    /// PostgreSQL URL, e.g. postgres://helios@db:5432/helios.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema for HELIOS's tables (created if missing); default: the URL's search_path.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Apply the migrations at start-up.
    #[arg(long, env = "HELIOS_MIGRATE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub migrate: bool,
    /// Redis URL for dedup marks.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// How long a dedup mark lives.
    #[arg(long, env = "HELIOS_DEDUP_TTL_SECS", default_value_t = 86_400)]
    pub dedup_ttl_secs: u64,
    /// Prefix of dedup keys in Redis.
    #[arg(long, env = "HELIOS_DEDUP_PREFIX", default_value = "helios:dedup:")]
    pub dedup_prefix: String,
    /// Most raw records per batch.
    #[arg(long, env = "HELIOS_BATCH_SIZE", default_value_t = crate::pipeline::processor::DEFAULT_BATCH_RECORDS)]
    pub batch_size: usize,
    /// Most bytes (values, keys, headers) per batch; a single larger record is a batch alone.
    #[arg(long, env = "HELIOS_BATCH_MAX_BYTES", default_value_t = crate::pipeline::processor::DEFAULT_BATCH_BYTES)]
    pub batch_max_bytes: usize,
    /// How long a batch waits to fill after its first record.
    #[arg(long, env = "HELIOS_BATCH_LINGER_MS", default_value_t = 50)]
    pub batch_linger_ms: u64,
    /// Exactly-once fan-out: Kafka transactions around fan-out, DLQ and offsets (needs a broker
    /// with transactions; Tansu 0.6.0 has none).
    #[arg(long, env = "HELIOS_EXACTLY_ONCE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub exactly_once: bool,
    /// Confluent-compatible schema registry: fan-out values become Avro (Confluent wire format).
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Transactional id of this instance in exactly-once mode; keep it stable across restarts
    /// (default: helios-<consumer group>-<host name>).
    #[arg(long, env = "HELIOS_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
}

impl ProcessArgs {
    /// Checks the values that clap cannot.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 {
            bail!("HELIOS_BATCH_SIZE / --batch-size must be at least 1");
        }
        if self.batch_max_bytes == 0 {
            bail!("HELIOS_BATCH_MAX_BYTES / --batch-max-bytes must be at least 1");
        }
        if self.dedup_ttl_secs == 0 {
            bail!("HELIOS_DEDUP_TTL_SECS / --dedup-ttl-secs must be at least 1");
        }
        Ok(())
    }
}
