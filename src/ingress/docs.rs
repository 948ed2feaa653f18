//! `/openapi.json` and a self-contained `/docs` page (no build-time or run-time download, so it
//! works on air-gapped installs).

use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn op(summary: &str, description: &str, tag: &str, body: Option<&str>, responses: Value) -> Value {
    let mut o = json!({
        "summary": summary,
        "description": description,
        "tags": [tag],
        "responses": responses,
    });
    if let Some(ct) = body {
        o["requestBody"] = json!({"required": true, "content": {ct: {"schema": {}}}});
    }
    o
}

fn delivery_responses(ok: &str) -> Value {
    json!({
        ok: {"description": "Landed in Kafka (acknowledged with acks=all)"},
        "400": {"description": "Body this endpoint can never accept (the message says why)"},
        "401": {"description": "Missing or wrong credentials"},
        "403": {"description": "Signature invalid or sender not allowed"},
        "408": {"description": "The body did not arrive within HELIOS_BODY_READ_TIMEOUT_MS"},
        "413": {"description": "Body over HELIOS_MAX_BODY_BYTES"},
        "429": {"description": "Over the source's rate limit or the in-flight cap: retry after Retry-After (the SNS endpoint answers 503 instead)"},
        "503": {"description": "Kafka did not acknowledge in time or is known to be down: retry (Retry-After)"}
    })
}

/// The OpenAPI 3.1 description of every endpoint.
pub fn spec() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "HELIOS ingress",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Lands AWS EventBridge/SNS, GCP Pub/Sub and Azure Event Grid pushes untouched in Kafka (helios.raw.<source>). A 2xx means Kafka acknowledged the raw record."
        },
        "paths": {
            "/api/v1/webhooks/aws/eventbridge": {"post": op("EventBridge API destination",
                "The EventBridge event JSON. Auth: API key header (HELIOS_EVENTBRIDGE_API_KEY_HEADER, default x-helios-key) or Basic. SNS envelopes are accepted here too, with the EventBridge credentials or a topic allow-list (HELIOS_SNS_TOPIC_ARNS).",
                "aws", Some("application/json"), delivery_responses("200"))},
            "/api/v1/webhooks/aws/sns": {"post": op("SNS HTTP(S) subscription",
                "SubscriptionConfirmation (confirmed after signature check), Notification, UnsubscribeConfirmation, raw delivery (?token=). Body is read whatever the Content-Type (SNS sends text/plain).",
                "aws", Some("text/plain"), delivery_responses("200"))},
            "/api/v1/webhooks/gcp/pubsub": {"post": op("Pub/Sub push",
                "Wrapped (base64 message.data) or unwrapped (x-goog-pubsub-* headers). Auth: OIDC bearer token (HELIOS_PUBSUB_OIDC_AUDIENCE + HELIOS_PUBSUB_OIDC_EMAIL) and/or ?token=.",
                "gcp", Some("application/json"), delivery_responses("200"))},
            "/api/v1/webhooks/azure/eventgrid": {
                "post": op("Event Grid delivery",
                    "Event Grid schema (array) or CloudEvents (object or array). SubscriptionValidationEvent is answered with {\"validationResponse\": code}. Secret: ?code= or x-helios-key header (HELIOS_EVENTGRID_SECRET).",
                    "azure", Some("application/json"), delivery_responses("200")),
                "options": op("CloudEvents webhook validation",
                    "Echoes WebHook-Request-Origin in WebHook-Allowed-Origin.",
                    "azure", None, json!({"200": {"description": "Consent: WebHook-Allowed-Origin, WebHook-Allowed-Rate: *"}, "400": {"description": "No WebHook-Request-Origin"}}))
            },
            "/api/v1/events/ingest": {"post": op("Direct ingestion",
                "One event object or a JSON array of event objects. Auth: x-api-key (HELIOS_INGEST_API_KEY).",
                "direct", Some("application/json"), delivery_responses("202"))},
            "/api/v1/health": {"get": op("Readiness", "200 when Kafka is reachable, else 503.", "ops", None,
                json!({"200": {"description": "ready"}, "503": {"description": "Kafka unreachable"}}))},
            "/api/v1/health/live": {"get": op("Liveness", "Always 200 while the process serves.", "ops", None, json!({"200": {"description": "alive"}}))},
            "/api/v1/webhooks/aws/health": {"get": op("AWS readiness", "Readiness plus the AWS checks in force.", "ops", None, json!({"200": {"description": "ready"}, "503": {"description": "Kafka unreachable"}}))},
            "/api/v1/webhooks/gcp/health": {"get": op("GCP readiness", "Readiness plus the GCP checks in force.", "ops", None, json!({"200": {"description": "ready"}, "503": {"description": "Kafka unreachable"}}))},
            "/api/v1/webhooks/azure/health": {"get": op("Azure readiness", "Readiness plus the Azure checks in force.", "ops", None, json!({"200": {"description": "ready"}, "503": {"description": "Kafka unreachable"}}))},
            "/metrics": {"get": op("Prometheus metrics", "Text exposition format.", "ops", None, json!({"200": {"description": "metrics"}}))},
            "/openapi.json": {"get": op("This document", "", "ops", None, json!({"200": {"description": "OpenAPI 3.1"}}))},
            "/docs": {"get": op("Human-readable API page", "", "ops", None, json!({"200": {"description": "HTML"}}))}
        }
    })
}

/// `GET /openapi.json`
pub async fn openapi() -> Response {
    Json(spec()).into_response()
}

/// `GET /docs`: the spec rendered as a plain HTML page, server-side.
pub async fn page() -> Html<String> {
    let spec = spec();
    let mut rows = String::new();
    if let Some(paths) = spec["paths"].as_object() {
        for (path, methods) in paths {
            for (method, o) in methods.as_object().into_iter().flatten() {
                let codes: Vec<String> = o["responses"]
                    .as_object()
                    .map(|r| {
                        r.iter()
                            .map(|(c, d)| {
                                format!(
                                    "<b>{c}</b> {}",
                                    esc(d["description"].as_str().unwrap_or(""))
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                rows.push_str(&format!(
                    "<tr><td><code>{}</code></td><td><code>{}</code></td><td><b>{}</b><br>{}</td><td>{}</td></tr>\n",
                    method.to_uppercase(),
                    esc(path),
                    esc(o["summary"].as_str().unwrap_or("")),
                    esc(o["description"].as_str().unwrap_or("")),
                    codes.join("<br>")
                ));
            }
        }
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>HELIOS ingress API</title>\
<style>body{{font-family:sans-serif;margin:2em}}td{{border-top:1px solid #ccc;padding:.4em;vertical-align:top}}</style></head>\
<body><h1>HELIOS ingress API {}</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>\
<table><tr><th>method</th><th>path</th><th>what</th><th>responses</th></tr>{rows}</table></body></html>",
        env!("CARGO_PKG_VERSION"),
        esc(spec["info"]["description"].as_str().unwrap_or(""))
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
