//! The ingress's configuration: the HTTP server (address, deployment mode, timeouts, caps) and
//! each cloud's settings, flattened from the clouds' own option groups.

use std::time::Duration;

use anyhow::bail;

use crate::clouds::aws::config::{AwsArgs, EventBridgeAuth, SnsConfig};
use crate::clouds::azure::config::{AzureArgs, EventGridConfig};
use crate::clouds::direct::config::{DirectArgs, IngestAuth};
use crate::clouds::gcp::config::{GcpArgs, PubSubConfig};
use crate::config::{DeploymentMode, KafkaArgs, KafkaSettings};
use crate::topology::Topology;

/// Ingress options: the server, then each cloud's (flags and environment variables).
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
    /// How long a client may take to send a request's headers (then the connection is closed).
    #[arg(long, env = "HELIOS_HEADER_READ_TIMEOUT_MS", default_value_t = 5000)]
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body (then 408 and the connection closes).
    #[arg(long, env = "HELIOS_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,
    /// Most requests handled at once per endpoint; more are answered 429/503 with Retry-After.
    #[arg(long, env = "HELIOS_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Most request-body bytes in flight per endpoint (reserved by Content-Length); more are
    /// answered 429/503 with Retry-After.
    #[arg(long, env = "HELIOS_MAX_BODY_MEMORY", default_value_t = 64 * 1024 * 1024)]
    pub max_body_memory: usize,
    /// Most open client connections; more wait in the listen backlog until one closes.
    #[arg(long, env = "HELIOS_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,
    /// Requests served on one connection before it is closed (the client opens another).
    #[arg(
        long,
        env = "HELIOS_MAX_REQUESTS_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_requests_per_connection: u64,
    /// Age after which a connection is closed once its current request is answered.
    #[arg(long, env = "HELIOS_MAX_CONNECTION_AGE_SECS", default_value_t = 600)]
    pub max_connection_age_secs: u64,
    /// Endpoints without credentials serve loopback clients only (Redis's protected mode);
    /// `false` lets anyone in (development only; production refuses open endpoints anyway).
    #[arg(long, env = "HELIOS_PROTECTED_MODE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub protected_mode: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub gcp: GcpArgs,
    #[command(flatten)]
    pub azure: AzureArgs,
    #[command(flatten)]
    pub direct: DirectArgs,
}

/// Runtime configuration of the ingress.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub host: String,
    pub port: u16,
    pub mode: DeploymentMode,
    pub max_body_bytes: usize,
    pub produce_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_in_flight: usize,
    pub max_body_memory: usize,
    pub max_connections: usize,
    pub max_requests_per_connection: u64,
    pub max_connection_age: Duration,
    pub protected_mode: bool,
    pub kafka: KafkaSettings,
    pub topology: Topology,
    pub eventbridge: EventBridgeAuth,
    pub sns: SnsConfig,
    pub pubsub: PubSubConfig,
    pub eventgrid: EventGridConfig,
    pub ingest: IngestAuth,
}

impl IngressConfig {
    /// Defaults (development mode, no authentication, port 0) for a broker and topology.
    pub fn new(kafka: KafkaSettings, topology: Topology) -> Self {
        IngressConfig {
            host: "127.0.0.1".into(),
            port: 0,
            mode: DeploymentMode::Development,
            max_body_bytes: crate::limits::DEFAULT_MAX_BODY_BYTES,
            produce_timeout: Duration::from_millis(4000),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            max_body_memory: 64 * 1024 * 1024,
            max_connections: 2048,
            max_requests_per_connection: 1000,
            max_connection_age: Duration::from_secs(600),
            protected_mode: true,
            kafka,
            topology,
            eventbridge: EventBridgeAuth {
                api_key_header: "x-helios-key".into(),
                ..Default::default()
            },
            sns: SnsConfig::default(),
            pubsub: PubSubConfig::default(),
            eventgrid: EventGridConfig::default(),
            ingest: IngestAuth::default(),
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
        let positive = |v: u64, what: &str| -> anyhow::Result<Duration> {
            if v == 0 {
                bail!("{what} must be greater than 0");
            }
            Ok(Duration::from_millis(v))
        };
        c.produce_timeout = positive(
            a.produce_timeout_ms,
            "HELIOS_PRODUCE_TIMEOUT_MS / --produce-timeout-ms",
        )?;
        c.header_timeout = positive(
            a.header_read_timeout_ms,
            "HELIOS_HEADER_READ_TIMEOUT_MS / --header-read-timeout-ms",
        )?;
        c.body_timeout = positive(
            a.body_read_timeout_ms,
            "HELIOS_BODY_READ_TIMEOUT_MS / --body-read-timeout-ms",
        )?;
        if a.max_in_flight == 0
            || a.max_connections == 0
            || a.max_requests_per_connection == 0
            || a.max_connection_age_secs == 0
        {
            bail!("HELIOS_MAX_IN_FLIGHT, HELIOS_MAX_CONNECTIONS, HELIOS_MAX_REQUESTS_PER_CONNECTION and HELIOS_MAX_CONNECTION_AGE_SECS must be greater than 0");
        }
        if a.max_body_memory < c.max_body_bytes {
            bail!(
                "HELIOS_MAX_BODY_MEMORY ({}) must hold at least one body of HELIOS_MAX_BODY_BYTES ({})",
                a.max_body_memory,
                c.max_body_bytes
            );
        }
        c.max_in_flight = a.max_in_flight;
        c.max_body_memory = a.max_body_memory;
        c.max_connections = a.max_connections;
        c.max_requests_per_connection = a.max_requests_per_connection;
        c.max_connection_age = Duration::from_secs(a.max_connection_age_secs);
        c.protected_mode = a.protected_mode;
        (c.eventbridge, c.sns) = a.aws.resolve()?;
        c.pubsub = a.gcp.resolve()?;
        c.eventgrid = a.azure.resolve();
        c.ingest = a.direct.resolve();
        c.check_auth()?;
        c.check_pinned()?;
        Ok(c)
    }

    /// Refuses pass-through Kafka properties that would change what the ingress pins.
    pub fn check_pinned(&self) -> anyhow::Result<()> {
        let limits = crate::limits::SizeLimits {
            max_body_bytes: self.max_body_bytes,
        };
        crate::config::refuse_overrides(
            &self.kafka.properties,
            &[
                crate::config::ACKS_ALL,
                crate::config::Pinned {
                    key: "message.timeout.ms",
                    value: &self.produce_timeout.as_millis().to_string(),
                    why: "it is how long a request waits for Kafka: set HELIOS_PRODUCE_TIMEOUT_MS instead",
                },
                crate::config::Pinned {
                    key: "message.max.bytes",
                    value: &limits.raw_record_max().to_string(),
                    why: "it derives from HELIOS_MAX_BODY_BYTES: set that instead",
                },
            ],
        )
    }

    /// Which endpoints accept unauthenticated requests (a list of human-readable warnings).
    pub fn open_endpoints(&self) -> Vec<String> {
        let mut open = crate::clouds::aws::config::open_endpoints(&self.eventbridge, &self.sns);
        open.extend(self.pubsub.open_endpoints());
        open.extend(self.eventgrid.open_endpoints());
        open.extend(self.ingest.open_endpoints());
        open
    }

    /// Header names that carry secrets: never landed.
    pub fn secret_headers(&self) -> Vec<String> {
        let mut h = vec![
            self.eventbridge.api_key_header.clone(),
            self.eventgrid.secret_header.clone(),
            self.ingest.header.clone(),
        ];
        h.retain(|h| !h.is_empty());
        h
    }

    fn check_auth(&self) -> anyhow::Result<()> {
        let open = self.open_endpoints();
        if self.mode == DeploymentMode::Production && !open.is_empty() {
            bail!(
                "DEPLOYMENT_MODE=production refuses unauthenticated endpoints:\n  - {}",
                open.join("\n  - ")
            );
        }
        if self.mode == DeploymentMode::Production && !self.protected_mode {
            bail!("DEPLOYMENT_MODE=production refuses HELIOS_PROTECTED_MODE=false");
        }
        if self.mode == DeploymentMode::Production
            && (0..2).contains(&self.topology.replication_factor)
        {
            bail!(
                "DEPLOYMENT_MODE=production refuses replication_factor {} in topology.yaml: \
                 an acknowledged event would live on one broker only (use 3, or -1 for the broker default)",
                self.topology.replication_factor
            );
        }
        Ok(())
    }
}
