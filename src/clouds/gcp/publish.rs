//! Publishing test events to GCP Pub/Sub with the official `google-cloud-pubsub` client (gRPC;
//! Application Default Credentials; `PUBSUB_EMULATOR_HOST` honoured with anonymous credentials,
//! which the official client does not do by itself), and the wrapped push body a push
//! subscription would deliver (demo mode).

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// Where events are published.
#[derive(Debug, Clone)]
pub struct PubSubTarget {
    /// A topic id (with `project`) or `projects/P/topics/T`.
    pub topic: Option<String>,
    pub project: Option<String>,
    /// An emulator (host:port): plaintext gRPC, anonymous credentials.
    pub emulator_host: Option<String>,
    /// How long publishing may keep retrying.
    pub timeout: Duration,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|x| !x.is_empty())
}

impl PubSubTarget {
    /// Publishing configured: a topic, an emulator, or Google credentials in the environment.
    pub fn configured(&self) -> bool {
        self.topic.is_some()
            || self.emulator_host.is_some()
            || env_set("GOOGLE_APPLICATION_CREDENTIALS")
    }

    /// What production publishing still needs (environment variable names).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = vec![];
        if self.topic.is_none() {
            m.push("HELIOS_PUBSUB_TOPIC");
        }
        let full = self
            .topic
            .as_deref()
            .is_some_and(|t| t.starts_with("projects/"));
        if !full && self.project.is_none() && !env_set("GOOGLE_CLOUD_PROJECT") {
            m.push("GCP_PROJECT_ID");
        }
        m
    }

    /// The topic's full name, `projects/P/topics/T`.
    pub fn topic_path(&self) -> Result<String, String> {
        let Some(topic) = self.topic.as_deref().filter(|t| !t.is_empty()) else {
            return Err(
                "set HELIOS_PUBSUB_TOPIC (or --gcp-topic) to the Pub/Sub topic to publish to"
                    .into(),
            );
        };
        if topic.starts_with("projects/") {
            return if topic.split('/').count() == 4 && topic.split('/').nth(2) == Some("topics") {
                Ok(topic.to_string())
            } else {
                Err(format!("HELIOS_PUBSUB_TOPIC `{topic}` is not of the form projects/<project>/topics/<topic>"))
            };
        }
        let project = self
            .project
            .clone()
            .or_else(|| std::env::var("GOOGLE_CLOUD_PROJECT").ok())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                format!("set GCP_PROJECT_ID (or --gcp-project), or give HELIOS_PUBSUB_TOPIC as projects/<project>/topics/{topic}")
            })?;
        Ok(format!("projects/{project}/topics/{topic}"))
    }
}

/// Publishes one message per event, the `eventType` attribute set (HELIOS reads the event type
/// from it), batched by the client.
pub async fn publish(
    target: &PubSubTarget,
    event_type: &str,
    events: &[Value],
) -> Result<Vec<String>, String> {
    use google_cloud_gax::retry_policy::RetryPolicyExt;
    use google_cloud_pubsub::client::Publisher;
    use google_cloud_pubsub::model::Message;
    let topic = target.topic_path()?;
    let mut builder = Publisher::builder(topic.clone()).with_retry_policy(
        google_cloud_pubsub::retry_policy::RetryableErrors.with_time_limit(target.timeout),
    );
    if let Some(host) = &target.emulator_host {
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
                    .set_attributes([("eventType", event_type)]),
            )
        })
        .collect();
    let deadline = target.timeout + Duration::from_secs(5);
    let mut ids = vec![];
    for p in pending {
        match tokio::time::timeout(deadline, p).await {
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
                    deadline.as_secs()
                ))
            }
        }
    }
    Ok(ids)
}

/// The wrapped body a push subscription delivers (demo mode).
pub fn push_body(id: &str, event_type: &str, data: &Value) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    json!({"message": {"data": base64::engine::general_purpose::STANDARD.encode(data.to_string()),
        "attributes": {"eventType": event_type}, "messageId": id, "message_id": id,
        "publishTime": now, "publish_time": now}, "subscription": "projects/demo/subscriptions/helios-push"})
}
