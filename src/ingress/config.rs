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
    /// Most requests handled at once; more are answered 429/503 with Retry-After.
    #[arg(long, env = "HELIOS_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Most open client connections; more wait in the listen backlog until one closes.
    #[arg(long, env = "HELIOS_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
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
    pub max_connections: usize,
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
            max_body_bytes: 1024 * 1024,
            produce_timeout: Duration::from_millis(4000),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            max_connections: 4096,
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
        if a.max_in_flight == 0 || a.max_connections == 0 {
            bail!("HELIOS_MAX_IN_FLIGHT and HELIOS_MAX_CONNECTIONS must be greater than 0");
        }
        c.max_in_flight = a.max_in_flight;
        c.max_connections = a.max_connections;
        (c.eventbridge, c.sns) = a.aws.resolve()?;
        c.pubsub = a.gcp.resolve()?;
        c.eventgrid = a.azure.resolve();
        c.ingest = a.direct.resolve();
        c.check_auth()?;
        Ok(c)
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
        Ok(())
    }
}
