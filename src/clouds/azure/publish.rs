//! Publishing test events to Azure Event Grid: `POST {endpoint}/api/events?api-version=2018-01-01`
//! through the azure_core HTTP pipeline (its exponential retry on 408/429/5xx bounded by the
//! timeout, client request ids, user agent) with `aeg-sas-key` or an Entra bearer token (https
//! only). No maintained Event Grid client crate exists (`azure_messaging_eventgrid` is legacy, on
//! azure_core 0.21). Also the body Event Grid would push (demo mode).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// Event Grid input schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AzureSchema {
    Eventgrid,
    Cloudevents,
}

/// Where and how events are published.
#[derive(Debug, Clone)]
pub struct EventGridTarget {
    /// Topic endpoint, e.g. https://<topic>.<region>-1.eventgrid.azure.net
    pub endpoint: Option<String>,
    /// Topic access key (`aeg-sas-key`).
    pub key: Option<String>,
    /// An Entra access token (used when no key is given; sent only over https).
    pub token: Option<String>,
    pub schema: AzureSchema,
    /// How long publishing may keep retrying.
    pub timeout: Duration,
}

impl EventGridTarget {
    /// Publishing configured.
    pub fn configured(&self) -> bool {
        self.endpoint.is_some() || self.key.is_some() || self.token.is_some()
    }

    /// What production publishing still needs (environment variable names).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut m = vec![];
        if self.endpoint.is_none() {
            m.push("AZURE_EVENTGRID_ENDPOINT");
        }
        if self.key.is_none() && self.token.is_none() {
            m.push("AZURE_EVENTGRID_KEY (or AZURE_EVENTGRID_TOKEN)");
        }
        m
    }
}

/// The Event Grid body (always an array) in the chosen schema.
pub fn events_body(schema: AzureSchema, event_type: &str, data: &Value, id: &str) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    match schema {
        AzureSchema::Eventgrid => {
            json!([{"id": id, "eventType": format!("Helios.Orders.{event_type}"),
            "subject": format!("orders/{}", data["order_id"].as_str().unwrap_or("")), "eventTime": now,
            "data": data, "dataVersion": "1.0"}])
        }
        AzureSchema::Cloudevents => {
            json!([{"specversion": "1.0", "type": format!("Helios.Orders.{event_type}"),
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

/// The publishing pipeline: azure_core's retry (exponential, on 408/429/5xx, bounded by the
/// target's timeout), request-id and user-agent policies, then the key or the bearer token.
pub fn pipeline(target: &EventGridTarget, http: &reqwest::Client) -> azure_core::http::Pipeline {
    use azure_core::http::{
        policies::Policy, ClientOptions, ExponentialRetryOptions, RetryOptions, Transport,
    };
    let auth: Arc<dyn Policy> = match (&target.key, &target.token) {
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
            max_total_elapsed: azure_core::time::Duration::seconds(target.timeout.as_secs() as i64),
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

/// Publishes one event; errors name what to fix.
pub async fn publish(
    target: &EventGridTarget,
    pipeline: &azure_core::http::Pipeline,
    event_type: &str,
    data: &Value,
    id: &str,
) -> Result<String, String> {
    let endpoint = target
        .endpoint
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/');
    let url: azure_core::http::Url = format!("{endpoint}/api/events?api-version=2018-01-01")
        .parse()
        .map_err(|e| format!("AZURE_EVENTGRID_ENDPOINT `{endpoint}` is not a URL: {e}"))?;
    let content_type = match target.schema {
        AzureSchema::Eventgrid => "application/json",
        AzureSchema::Cloudevents => "application/cloudevents-batch+json; charset=utf-8",
    };
    let mut req = azure_core::http::Request::new(url, azure_core::http::Method::Post);
    req.insert_header("content-type", content_type);
    req.set_body(events_body(target.schema, event_type, data, id).to_string());
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
            None if target.key.is_none() && !endpoint.starts_with("https://") => format!(
                "an Entra token is only sent over https; AZURE_EVENTGRID_ENDPOINT is `{endpoint}` ({e})"
            ),
            None => format!("cannot reach {endpoint}: {e} (check AZURE_EVENTGRID_ENDPOINT)"),
        }),
    }
}
