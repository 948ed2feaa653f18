//! `helios publish`: send a test event through a cloud and watch it come back through that
//! cloud's push into HELIOS.
//!
//! Modes, per cloud: **production** when that cloud's publishing settings are configured (or
//! `DEPLOYMENT_MODE=production`, which then requires them and names what is missing), **demo**
//! otherwise: the event is delivered straight to a HELIOS ingress (`--ingress-url`) in exactly the
//! format that cloud's push uses (EventBridge event, Pub/Sub wrapped push, Event Grid schema or
//! CloudEvents), so the whole path can be exercised without any cloud account.
//!
//! Production publishing: AWS EventBridge (`PutEvents` with the official SDK, credentials from the
//! standard AWS chain), GCP Pub/Sub (the official `google-cloud-pubsub` client over gRPC,
//! credentials from Application Default Credentials, `PUBSUB_EMULATOR_HOST` honoured with anonymous
//! credentials) and Azure Event Grid (`POST {endpoint}/api/events` through the azure_core pipeline,
//! with `aeg-sas-key` or an Entra bearer token).

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::clouds::aws::publish::{self as aws, EventBridgeTarget};
use crate::clouds::azure::publish::{self as azure, AzureSchema, EventGridTarget};
use crate::clouds::gcp::publish::{self as gcp, PubSubTarget};
use crate::config::DeploymentMode;

/// Which cloud(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CloudChoice {
    Aws,
    Gcp,
    Azure,
    All,
}

/// `helios publish` options.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Where to publish.
    #[arg(long, value_enum)]
    pub cloud: CloudChoice,
    /// Event type.
    #[arg(long, default_value = "OrderPlaced")]
    pub event_type: String,
    /// order_id of the payload (default: a fresh one).
    #[arg(long)]
    pub order_id: Option<String>,
    /// customer_id of the payload.
    #[arg(long, default_value = "C-demo")]
    pub customer_id: String,
    /// amount of the payload.
    #[arg(long, default_value_t = 42.0)]
    pub amount: f64,
    /// More payload fields, as a JSON object (merged over the ones above).
    #[arg(long)]
    pub data: Option<String>,
    /// How many events per cloud.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// The HELIOS ingress that demo mode delivers to.
    #[arg(
        long,
        env = "HELIOS_INGRESS_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub ingress_url: String,
    /// production requires every chosen cloud's settings; development picks per cloud.
    #[arg(long, env = "DEPLOYMENT_MODE", value_enum, default_value_t = DeploymentMode::Development)]
    pub deployment_mode: DeploymentMode,
    /// EventBridge bus to publish to.
    #[arg(long, env = "HELIOS_EVENTBRIDGE_BUS", default_value = "default")]
    pub aws_event_bus: String,
    /// EventBridge `source` of published events.
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_SOURCE",
        default_value = "helios.publisher"
    )]
    pub aws_source: String,
    /// AWS region (else the standard chain: AWS_REGION, profile).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Event Grid topic endpoint, e.g. https://<topic>.<region>-1.eventgrid.azure.net
    #[arg(long, env = "AZURE_EVENTGRID_ENDPOINT")]
    pub azure_endpoint: Option<String>,
    /// Event Grid topic access key (sent as aeg-sas-key).
    #[arg(long, env = "AZURE_EVENTGRID_KEY", hide_env_values = true)]
    pub azure_key: Option<String>,
    /// A Microsoft Entra access token for Event Grid (scope https://eventgrid.azure.net/.default,
    /// e.g. from `az account get-access-token --resource https://eventgrid.azure.net`); used
    /// instead of the key. Sent only over https.
    #[arg(long, env = "AZURE_EVENTGRID_TOKEN", hide_env_values = true)]
    pub azure_token: Option<String>,
    /// GCP project of the Pub/Sub topic (not needed when --gcp-topic is a full path).
    #[arg(long, env = "GCP_PROJECT_ID")]
    pub gcp_project: Option<String>,
    /// Pub/Sub topic to publish to: a topic id (with --gcp-project) or `projects/P/topics/T`.
    #[arg(long, env = "HELIOS_PUBSUB_TOPIC")]
    pub gcp_topic: Option<String>,
    /// A Pub/Sub emulator (host:port): plaintext gRPC with anonymous credentials.
    #[arg(long, env = "PUBSUB_EMULATOR_HOST")]
    pub pubsub_emulator_host: Option<String>,
    /// How long one cloud's publishing may keep retrying before it is reported as failed.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Event Grid schema or CloudEvents schema.
    #[arg(long, value_enum, default_value_t = AzureSchema::Eventgrid)]
    pub azure_schema: AzureSchema,
    /// Secrets the ingress expects in demo mode (same variables as `helios ingress`).
    #[arg(long, env = "HELIOS_EVENTBRIDGE_API_KEY", hide_env_values = true)]
    pub eventbridge_api_key: Option<String>,
    #[arg(
        long,
        env = "HELIOS_EVENTBRIDGE_API_KEY_HEADER",
        default_value = "x-helios-key"
    )]
    pub eventbridge_api_key_header: String,
    #[arg(long, env = "HELIOS_PUBSUB_TOKEN", hide_env_values = true)]
    pub pubsub_token: Option<String>,
    #[arg(long, env = "HELIOS_EVENTGRID_SECRET", hide_env_values = true)]
    pub eventgrid_secret: Option<String>,
}

/// One cloud's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub cloud: &'static str,
    pub mode: &'static str,
    pub result: Result<Vec<String>, String>,
}

impl PublishArgs {
    fn aws(&self) -> EventBridgeTarget {
        EventBridgeTarget {
            bus: self.aws_event_bus.clone(),
            source: self.aws_source.clone(),
            region: self.aws_region.clone(),
        }
    }

    fn gcp(&self) -> PubSubTarget {
        PubSubTarget {
            topic: self.gcp_topic.clone(),
            project: self.gcp_project.clone(),
            emulator_host: self.pubsub_emulator_host.clone(),
            timeout: Duration::from_secs(self.timeout_secs),
        }
    }

    fn azure(&self) -> EventGridTarget {
        EventGridTarget {
            endpoint: self.azure_endpoint.clone(),
            key: self.azure_key.clone(),
            token: self.azure_token.clone(),
            schema: self.azure_schema,
            timeout: Duration::from_secs(self.timeout_secs),
        }
    }

    /// The payload of one event (a fresh order id unless one was given).
    fn payload(&self) -> anyhow::Result<Value> {
        let order_id = self
            .order_id
            .clone()
            .unwrap_or_else(|| format!("O-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let mut d =
            json!({"order_id": order_id, "customer_id": self.customer_id, "amount": self.amount});
        if let Some(extra) = &self.data {
            let v: Value = serde_json::from_str(extra).map_err(|e| {
                anyhow::anyhow!("--data is not JSON ({e}); write e.g. '{{\"currency\":\"EUR\"}}'")
            })?;
            let Value::Object(m) = v else {
                anyhow::bail!("--data must be a JSON object, e.g. '{{\"currency\":\"EUR\"}}'");
            };
            for (k, v) in m {
                d[k] = v;
            }
        }
        Ok(d)
    }

    fn payloads(&self) -> anyhow::Result<Vec<Value>> {
        (0..self.count.max(1)).map(|_| self.payload()).collect()
    }
}

/// Demo mode: the event straight to a HELIOS ingress, in exactly the format that cloud's push
/// uses.
async fn deliver_demo(
    a: &PublishArgs,
    http: &reqwest::Client,
    cloud: &'static str,
    data: &Value,
    id: &str,
) -> Result<String, String> {
    let base = a.ingress_url.trim_end_matches('/');
    let (path, body, mut headers): (String, Value, Vec<(String, String)>) = match cloud {
        "aws" => (
            "/api/v1/webhooks/aws/eventbridge".into(),
            aws::push_body(id, &a.event_type, data),
            a.eventbridge_api_key
                .iter()
                .map(|k| (a.eventbridge_api_key_header.clone(), k.clone()))
                .collect(),
        ),
        "gcp" => (
            match &a.pubsub_token {
                Some(t) => format!("/api/v1/webhooks/gcp/pubsub?token={t}"),
                None => "/api/v1/webhooks/gcp/pubsub".into(),
            },
            gcp::push_body(id, &a.event_type, data),
            vec![],
        ),
        _ => (
            match &a.eventgrid_secret {
                Some(s) => format!("/api/v1/webhooks/azure/eventgrid?code={s}"),
                None => "/api/v1/webhooks/azure/eventgrid".into(),
            },
            azure::events_body(a.azure_schema, &a.event_type, data, id),
            vec![
                ("aeg-event-type".into(), "Notification".into()),
                ("aeg-subscription-name".into(), "HELIOS-DEMO".into()),
            ],
        ),
    };
    headers.push((
        "content-type".into(),
        "application/json; charset=utf-8".into(),
    ));
    let mut req = http.post(format!("{base}{path}")).body(body.to_string());
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach the ingress at {base}: {e} (start `helios demo` or `helios ingress`, or set --ingress-url)"))?;
    if resp.status().is_success() {
        Ok(id.to_string())
    } else {
        Err(format!(
            "the ingress answered HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ))
    }
}

/// One cloud: production publishing when configured, else demo delivery.
async fn publish_one(
    a: &PublishArgs,
    http: &reqwest::Client,
    cloud: &'static str,
) -> anyhow::Result<Outcome> {
    let production = match cloud {
        "aws" => aws::configured(),
        "gcp" => a.gcp().configured(),
        _ => a.azure().configured(),
    };
    let mode = if production { "production" } else { "demo" };
    tracing::info!(cloud, mode, "publishing");
    let data = a.payloads()?;
    let result = match (cloud, production) {
        ("aws", true) => {
            let target = a.aws();
            aws::put_events(&aws::client(&target).await, &target, &a.event_type, &data).await
        }
        ("gcp", true) => gcp::publish(&a.gcp(), &a.event_type, &data).await,
        ("azure", true) => {
            async {
                let target = a.azure();
                let missing = target.missing();
                if !missing.is_empty() {
                    return Err(format!("set {}", missing.join(" and ")));
                }
                let pipeline = azure::pipeline(&target, http);
                let mut ids = vec![];
                for d in &data {
                    let id = uuid::Uuid::new_v4().to_string();
                    ids.push(azure::publish(&target, &pipeline, &a.event_type, d, &id).await?);
                }
                Ok(ids)
            }
            .await
        }
        _ => {
            async {
                let mut ids = vec![];
                for d in &data {
                    let id = uuid::Uuid::new_v4().to_string();
                    ids.push(deliver_demo(a, http, cloud, d, &id).await?);
                }
                Ok(ids)
            }
            .await
        }
    };
    Ok(Outcome {
        cloud,
        mode,
        result,
    })
}

/// Publishes to the chosen clouds; prints one summary line per cloud.
pub async fn run(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let clouds: Vec<&'static str> = match a.cloud {
        CloudChoice::Aws => vec!["aws"],
        CloudChoice::Gcp => vec!["gcp"],
        CloudChoice::Azure => vec!["azure"],
        CloudChoice::All => vec!["aws", "gcp", "azure"],
    };
    if a.deployment_mode == DeploymentMode::Production {
        let missing: Vec<&str> = clouds
            .iter()
            .flat_map(|c| match *c {
                "aws" => aws::missing(&a.aws()),
                "gcp" => a.gcp().missing(),
                _ => a.azure().missing(),
            })
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "DEPLOYMENT_MODE=production needs these variables: {}",
                missing.join(", ")
            );
        }
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(a.timeout_secs.clamp(1, 15)))
        .build()?;
    let mut ok = true;
    for cloud in clouds {
        let o = publish_one(&a, &http, cloud).await?;
        match &o.result {
            Ok(ids) => println!(
                "{:<6} {:<10} ok      {} event(s): {}",
                o.cloud,
                o.mode,
                ids.len(),
                ids.join(", ")
            ),
            Err(e) => {
                ok = false;
                println!("{:<6} {:<10} FAILED  {e}", o.cloud, o.mode);
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
