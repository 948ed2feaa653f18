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
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::config::DeploymentMode;

/// Which cloud(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CloudChoice {
    Aws,
    Gcp,
    Azure,
    All,
}

/// Event Grid input schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AzureSchema {
    Eventgrid,
    Cloudevents,
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

fn payload(a: &PublishArgs, order_id: &str) -> anyhow::Result<Value> {
    let mut d = json!({"order_id": order_id, "customer_id": a.customer_id, "amount": a.amount});
    if let Some(extra) = &a.data {
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

fn azure_configured(a: &PublishArgs) -> bool {
    a.azure_endpoint.is_some() || a.azure_key.is_some() || a.azure_token.is_some()
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|x| !x.is_empty())
}

/// GCP publishing configured: a topic, an emulator, or Google credentials in the environment.
fn gcp_configured(a: &PublishArgs) -> bool {
    a.gcp_topic.is_some()
        || a.pubsub_emulator_host.is_some()
        || env_set("GOOGLE_APPLICATION_CREDENTIALS")
}

/// The topic's full name, `projects/P/topics/T`.
fn gcp_topic_path(a: &PublishArgs) -> Result<String, String> {
    let Some(topic) = a.gcp_topic.as_deref().filter(|t| !t.is_empty()) else {
        return Err(
            "set HELIOS_PUBSUB_TOPIC (or --gcp-topic) to the Pub/Sub topic to publish to".into(),
        );
    };
    if topic.starts_with("projects/") {
        return if topic.split('/').count() == 4 && topic.split('/').nth(2) == Some("topics") {
            Ok(topic.to_string())
        } else {
            Err(format!("HELIOS_PUBSUB_TOPIC `{topic}` is not of the form projects/<project>/topics/<topic>"))
        };
    }
    let project = a
        .gcp_project
        .clone()
        .or_else(|| std::env::var("GOOGLE_CLOUD_PROJECT").ok())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            format!("set GCP_PROJECT_ID (or --gcp-project), or give HELIOS_PUBSUB_TOPIC as projects/<project>/topics/{topic}")
        })?;
    Ok(format!("projects/{project}/topics/{topic}"))
}

/// Publishes through Pub/Sub with the official client: one message per event, the `eventType`
/// attribute set (HELIOS reads the event type from it), batched by the client.
async fn publish_gcp(a: &PublishArgs, events: &[Value]) -> Result<Vec<String>, String> {
    use google_cloud_gax::retry_policy::RetryPolicyExt;
    use google_cloud_pubsub::client::Publisher;
    use google_cloud_pubsub::model::Message;
    let topic = gcp_topic_path(a)?;
    let mut builder = Publisher::builder(topic.clone()).with_retry_policy(
        google_cloud_pubsub::retry_policy::RetryableErrors
            .with_time_limit(Duration::from_secs(a.timeout_secs)),
    );
    if let Some(host) = &a.pubsub_emulator_host {
        // The official client does not read PUBSUB_EMULATOR_HOST itself: an emulator speaks
        // plaintext gRPC and takes no credentials.
        builder = builder
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let publisher = builder.build().await.map_err(|e| {
        format!("cannot create the Pub/Sub publisher: {e} (Google credentials come from Application Default Credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run `gcloud auth application-default login`)")
    })?;
    let pending: Vec<_> = events
        .iter()
        .map(|d| {
            publisher.publish(
                Message::new()
                    .set_data(d.to_string())
                    .set_attributes([("eventType", a.event_type.as_str())]),
            )
        })
        .collect();
    let mut ids = vec![];
    for p in pending {
        match tokio::time::timeout(Duration::from_secs(a.timeout_secs + 5), p).await {
            Ok(Ok(id)) => ids.push(id),
            Ok(Err(e)) => {
                let detail = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                return Err(format!("Pub/Sub refused the publish to {topic}: {detail} (check that the topic exists and that the credentials may publish to it: roles/pubsub.publisher)"));
            }
            Err(_) => {
                return Err(format!(
                    "Pub/Sub did not answer within {} s (publishing to {topic})",
                    a.timeout_secs + 5
                ))
            }
        }
    }
    Ok(ids)
}

/// AWS credentials configured in the environment (the standard chain's usual sources).
fn aws_configured() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ]
    .iter()
    .any(|v| env_set(v))
}

async fn aws_client(a: &PublishArgs) -> aws_sdk_eventbridge::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &a.aws_region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    // AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EVENTBRIDGE (emulators) are honoured by the SDK itself.
    aws_sdk_eventbridge::Client::new(&loader.load().await)
}

/// PutEvents of up to 10 events (the API's limit per call); reports failures per entry.
async fn publish_aws(
    a: &PublishArgs,
    client: &aws_sdk_eventbridge::Client,
    events: &[Value],
) -> Result<Vec<String>, String> {
    use aws_sdk_eventbridge::types::PutEventsRequestEntry;
    let mut ids = vec![];
    for chunk in events.chunks(10) {
        let entries: Vec<PutEventsRequestEntry> = chunk
            .iter()
            .map(|d| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&a.aws_event_bus)
                    .source(&a.aws_source)
                    .detail_type(&a.event_type)
                    .detail(d.to_string())
                    .build()
            })
            .collect();
        let out = client
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "PutEvents failed: {} (check AWS credentials, AWS_REGION and the bus name {})",
                    aws_sdk_eventbridge::error::DisplayErrorContext(&e),
                    a.aws_event_bus
                )
            })?;
        let mut failures = vec![];
        for (i, e) in out.entries().iter().enumerate() {
            match (e.event_id(), e.error_code()) {
                (Some(id), None) => ids.push(id.to_string()),
                (_, code) => failures.push(format!(
                    "entry {i}: {} {}",
                    code.unwrap_or("error"),
                    e.error_message().unwrap_or("")
                )),
            }
        }
        if out.failed_entry_count() > 0 || !failures.is_empty() {
            return Err(format!(
                "PutEvents refused {} of {} entries on bus `{}`: {}",
                out.failed_entry_count().max(failures.len() as i32),
                chunk.len(),
                a.aws_event_bus,
                failures.join("; ")
            ));
        }
    }
    Ok(ids)
}

/// The Event Grid body (always an array) in the chosen schema.
pub fn azure_events(a: &PublishArgs, data: &Value, id: &str) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    match a.azure_schema {
        AzureSchema::Eventgrid => {
            json!([{"id": id, "eventType": format!("Helios.Orders.{}", a.event_type),
            "subject": format!("orders/{}", data["order_id"].as_str().unwrap_or("")), "eventTime": now,
            "data": data, "dataVersion": "1.0"}])
        }
        AzureSchema::Cloudevents => {
            json!([{"specversion": "1.0", "type": format!("Helios.Orders.{}", a.event_type),
            "source": "/helios/publisher", "id": id, "time": now, "datacontenttype": "application/json", "data": data}])
        }
    }
}

/// Sends Event Grid's `aeg-sas-key` header on every try.
#[derive(Debug)]
struct SasKeyPolicy(String);

#[async_trait::async_trait]
impl azure_core::http::policies::Policy for SasKeyPolicy {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn azure_core::http::policies::Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        request.insert_header("aeg-sas-key", self.0.clone());
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// An Entra access token obtained outside HELIOS (AZURE_EVENTGRID_TOKEN).
#[derive(Debug)]
struct StaticToken(String);

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for StaticToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        Ok(azure_core::credentials::AccessToken::new(
            self.0.clone(),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// The Event Grid publishing pipeline: azure_core's retry (exponential, on 408/429/5xx, bounded by
/// --timeout-secs), request-id and user-agent policies, then the key or the bearer token.
fn azure_pipeline(a: &PublishArgs, http: &reqwest::Client) -> azure_core::http::Pipeline {
    use azure_core::http::{
        policies::Policy, ClientOptions, ExponentialRetryOptions, RetryOptions, Transport,
    };
    let auth: Arc<dyn Policy> = match (&a.azure_key, &a.azure_token) {
        (Some(key), _) => Arc::new(SasKeyPolicy(key.clone())),
        (None, token) => Arc::new(
            azure_core::http::policies::auth::BearerTokenAuthorizationPolicy::new(
                Arc::new(StaticToken(token.clone().unwrap_or_default())),
                ["https://eventgrid.azure.net/.default"],
            ),
        ),
    };
    let options = ClientOptions {
        transport: Some(Transport::new(Arc::new(http.clone()))),
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: 4,
            max_total_elapsed: azure_core::time::Duration::seconds(a.timeout_secs as i64),
            max_delay: azure_core::time::Duration::seconds(5),
        }),
        ..Default::default()
    };
    azure_core::http::Pipeline::new(
        Some("helios"),
        Some(env!("CARGO_PKG_VERSION")),
        options,
        vec![],
        vec![auth],
        None,
    )
}

async fn publish_azure(
    a: &PublishArgs,
    pipeline: &azure_core::http::Pipeline,
    data: &Value,
    id: &str,
) -> Result<String, String> {
    let endpoint = a
        .azure_endpoint
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/');
    let url: azure_core::http::Url = format!("{endpoint}/api/events?api-version=2018-01-01")
        .parse()
        .map_err(|e| format!("AZURE_EVENTGRID_ENDPOINT `{endpoint}` is not a URL: {e}"))?;
    let content_type = match a.azure_schema {
        AzureSchema::Eventgrid => "application/json",
        AzureSchema::Cloudevents => "application/cloudevents-batch+json; charset=utf-8",
    };
    let mut req = azure_core::http::Request::new(url, azure_core::http::Method::Post);
    req.insert_header("content-type", content_type);
    req.set_body(azure_events(a, data, id).to_string());
    match pipeline
        .send(&azure_core::http::Context::new(), &mut req, None)
        .await
    {
        Ok(_) => Ok(id.to_string()),
        Err(e) => Err(match e.http_status().map(u16::from) {
            Some(s @ (401 | 403)) => format!(
                "Event Grid refused the credentials (HTTP {s}): check AZURE_EVENTGRID_KEY (or AZURE_EVENTGRID_TOKEN and its role: EventGrid Data Sender)"
            ),
            Some(404) => format!("Event Grid answered 404: check AZURE_EVENTGRID_ENDPOINT `{endpoint}` (the topic endpoint, without /api/events)"),
            Some(s) => format!("Event Grid answered HTTP {s}: {e}"),
            None if a.azure_key.is_none() && !endpoint.starts_with("https://") => format!(
                "an Entra token is only sent over https; AZURE_EVENTGRID_ENDPOINT is `{endpoint}` ({e})"
            ),
            None => format!("cannot reach {endpoint}: {e} (check AZURE_EVENTGRID_ENDPOINT)"),
        }),
    }
}

async fn deliver_demo(
    a: &PublishArgs,
    http: &reqwest::Client,
    cloud: &'static str,
    data: &Value,
    id: &str,
) -> Result<String, String> {
    let base = a.ingress_url.trim_end_matches('/');
    let now = chrono::Utc::now().to_rfc3339();
    let (path, body, mut headers): (String, Value, Vec<(String, String)>) = match cloud {
        "aws" => (
            "/api/v1/webhooks/aws/eventbridge".into(),
            json!({"version": "0", "id": id, "detail-type": a.event_type, "source": "helios.publisher",
                "account": "000000000000", "time": now, "region": "local", "resources": [], "detail": data}),
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
            json!({"message": {"data": base64::engine::general_purpose::STANDARD.encode(data.to_string()),
                "attributes": {"eventType": a.event_type}, "messageId": id, "message_id": id,
                "publishTime": now, "publish_time": now}, "subscription": "projects/demo/subscriptions/helios-push"}),
            vec![],
        ),
        _ => (
            match &a.eventgrid_secret {
                Some(s) => format!("/api/v1/webhooks/azure/eventgrid?code={s}"),
                None => "/api/v1/webhooks/azure/eventgrid".into(),
            },
            azure_events(a, data, id),
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

/// Publishes to the chosen clouds; prints one summary line per cloud.
pub async fn run(a: PublishArgs) -> anyhow::Result<ExitCode> {
    let clouds: Vec<&'static str> = match a.cloud {
        CloudChoice::Aws => vec!["aws"],
        CloudChoice::Gcp => vec!["gcp"],
        CloudChoice::Azure => vec!["azure"],
        CloudChoice::All => vec!["aws", "gcp", "azure"],
    };
    if a.deployment_mode == DeploymentMode::Production {
        let mut missing = vec![];
        for c in &clouds {
            match *c {
                "azure" => {
                    if a.azure_endpoint.is_none() {
                        missing.push("AZURE_EVENTGRID_ENDPOINT");
                    }
                    if a.azure_key.is_none() && a.azure_token.is_none() {
                        missing.push("AZURE_EVENTGRID_KEY (or AZURE_EVENTGRID_TOKEN)");
                    }
                }
                "gcp" => {
                    if a.gcp_topic.is_none() {
                        missing.push("HELIOS_PUBSUB_TOPIC");
                    }
                    let full = a
                        .gcp_topic
                        .as_deref()
                        .is_some_and(|t| t.starts_with("projects/"));
                    if !full && a.gcp_project.is_none() && !env_set("GOOGLE_CLOUD_PROJECT") {
                        missing.push("GCP_PROJECT_ID");
                    }
                }
                "aws" => {
                    if !aws_configured() {
                        missing.push("AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)");
                    }
                    if a.aws_region.is_none() && std::env::var("AWS_DEFAULT_REGION").is_err() {
                        missing.push("AWS_REGION");
                    }
                }
                _ => unreachable!("clouds are aws, gcp, azure"),
            }
        }
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
    let mut outcomes = vec![];
    for cloud in clouds {
        let production = match cloud {
            "azure" => azure_configured(&a),
            "aws" => aws_configured(),
            _ => gcp_configured(&a),
        };
        let mode = if production { "production" } else { "demo" };
        tracing::info!(cloud, mode, "publishing");
        if production && cloud != "azure" {
            let data: Vec<Value> = (0..a.count.max(1))
                .map(|_| {
                    let order_id = a.order_id.clone().unwrap_or_else(|| {
                        format!("O-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
                    });
                    payload(&a, &order_id)
                })
                .collect::<anyhow::Result<_>>()?;
            let result = if cloud == "aws" {
                publish_aws(&a, &aws_client(&a).await, &data).await
            } else {
                publish_gcp(&a, &data).await
            };
            outcomes.push(Outcome {
                cloud,
                mode,
                result,
            });
            continue;
        }
        // Past this point a production cloud is Azure (AWS and GCP were handled above).
        let pipeline = production.then(|| azure_pipeline(&a, &http));
        let mut ids = vec![];
        let mut error = None;
        for _ in 0..a.count.max(1) {
            let order_id = a.order_id.clone().unwrap_or_else(|| {
                format!("O-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
            });
            let data = payload(&a, &order_id)?;
            let id = uuid::Uuid::new_v4().to_string();
            let r = match &pipeline {
                Some(_)
                    if a.azure_endpoint.is_none()
                        || (a.azure_key.is_none() && a.azure_token.is_none()) =>
                {
                    Err("set AZURE_EVENTGRID_ENDPOINT and AZURE_EVENTGRID_KEY (or AZURE_EVENTGRID_TOKEN)".into())
                }
                Some(pipeline) => publish_azure(&a, pipeline, &data, &id).await,
                None => deliver_demo(&a, &http, cloud, &data, &id).await,
            };
            match r {
                Ok(id) => ids.push(id),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        outcomes.push(Outcome {
            cloud,
            mode,
            result: match error {
                None => Ok(ids),
                Some(e) => Err(e),
            },
        });
    }
    let mut ok = true;
    for o in &outcomes {
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
