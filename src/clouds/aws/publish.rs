//! Publishing test events to AWS EventBridge (`PutEvents` with the official SDK; credentials from
//! the standard AWS chain; `AWS_ENDPOINT_URL_EVENTBRIDGE` for emulators), and the EventBridge
//! event an API destination would push (demo mode).

use serde_json::{json, Value};

/// Where and as what events are put.
#[derive(Debug, Clone)]
pub struct EventBridgeTarget {
    pub bus: String,
    pub source: String,
    pub region: Option<String>,
}

/// AWS credentials configured in the environment (the standard chain's usual sources).
pub fn configured() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|x| !x.is_empty()))
}

/// What production publishing still needs (environment variable names).
pub fn missing(target: &EventBridgeTarget) -> Vec<&'static str> {
    let mut m = vec![];
    if !configured() {
        m.push("AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)");
    }
    if target.region.is_none() && std::env::var("AWS_DEFAULT_REGION").is_err() {
        m.push("AWS_REGION");
    }
    m
}

/// The EventBridge client (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EVENTBRIDGE are honoured by the
/// SDK itself).
pub async fn client(target: &EventBridgeTarget) -> aws_sdk_eventbridge::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &target.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    aws_sdk_eventbridge::Client::new(&loader.load().await)
}

/// PutEvents of up to 10 events per call (the API's limit); reports failures per entry.
pub async fn put_events(
    client: &aws_sdk_eventbridge::Client,
    target: &EventBridgeTarget,
    event_type: &str,
    events: &[Value],
) -> Result<Vec<String>, String> {
    use aws_sdk_eventbridge::types::PutEventsRequestEntry;
    let mut ids = vec![];
    for chunk in events.chunks(10) {
        let entries: Vec<PutEventsRequestEntry> = chunk
            .iter()
            .map(|d| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&target.bus)
                    .source(&target.source)
                    .detail_type(event_type)
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
                    target.bus
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
                target.bus,
                failures.join("; ")
            ));
        }
    }
    Ok(ids)
}

/// The event an EventBridge API destination pushes (demo mode).
pub fn push_body(id: &str, event_type: &str, data: &Value) -> Value {
    json!({"version": "0", "id": id, "detail-type": event_type, "source": "helios.publisher",
        "account": "000000000000", "time": chrono::Utc::now().to_rfc3339(), "region": "local",
        "resources": [], "detail": data})
}
