//! A small in-test schema registry speaking the Confluent REST API for what HELIOS calls:
//! register, versions, schema by id and by version, per-subject and global compatibility
//! config, and the compatibility test. Its compatibility rules are the registry's for Avro,
//! written here independently of HELIOS: a mode's direction decides who must read whom
//! (BACKWARD: the new schema reads data of the old; FORWARD: the old reads the new; FULL:
//! both; `_TRANSITIVE`: against every version, else the latest), decided by Avro schema
//! resolution (`apache_avro`'s `SchemaCompatibility::can_read`). No Confluent-compatible
//! registry installs from the package registries here (Karapace is not on PyPI; the others
//! are JVM services or a broker's built-in), so this stands in for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::json;

#[derive(Default)]
pub struct Registry {
    /// Schema texts by id (id = index + 1).
    pub schemas: Vec<String>,
    /// Each subject's ids, by version (version = index + 1).
    pub subjects: HashMap<String, Vec<u32>>,
    /// Successful registrations (a schema already there counts too).
    pub registrations: usize,
    /// Requests for one version of a subject (`GET /subjects/{s}/versions/{v}`).
    pub version_reads: usize,
    pub global: String,
    pub config: HashMap<String, String>,
}

pub type Reg = Arc<Mutex<Registry>>;

fn error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

impl Registry {
    fn mode(&self, subject: &str) -> String {
        self.config
            .get(subject)
            .cloned()
            .unwrap_or_else(|| self.global.clone())
    }

    /// The registry's verdict on `candidate` for `subject`: the messages of what fails.
    fn incompatibilities(&self, subject: &str, candidate: &Schema) -> Vec<String> {
        let mode = self.mode(subject);
        let ids = self.subjects.get(subject).cloned().unwrap_or_default();
        let against: Vec<(usize, &u32)> = if mode.ends_with("_TRANSITIVE") {
            ids.iter().enumerate().collect()
        } else {
            ids.iter().enumerate().next_back().into_iter().collect()
        };
        let (backward, forward) = match mode.trim_end_matches("_TRANSITIVE") {
            "BACKWARD" => (true, false),
            "FORWARD" => (false, true),
            "FULL" => (true, true),
            _ => (false, false),
        };
        let mut out = vec![];
        for (i, id) in against {
            let old = Schema::parse_str(&self.schemas[*id as usize - 1]).unwrap();
            if backward {
                if let Err(e) = SchemaCompatibility::can_read(&old, candidate) {
                    out.push(format!(
                        "version {}: the new schema cannot read it: {e}",
                        i + 1
                    ));
                }
            }
            if forward {
                if let Err(e) = SchemaCompatibility::can_read(candidate, &old) {
                    out.push(format!(
                        "version {}: it cannot read the new schema's data: {e}",
                        i + 1
                    ));
                }
            }
        }
        out
    }
}

async fn register(
    State(r): State<Reg>,
    Path(subject): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let mut r = r.lock().unwrap();
    let text = body["schema"].as_str().unwrap_or_default().to_string();
    assert!(
        matches!(body["schemaType"].as_str(), None | Some("AVRO")),
        "{body}"
    );
    let Ok(schema) = Schema::parse_str(&text) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "invalid Avro schema",
        );
    };
    let canonical = schema.canonical_form();
    let existing = r
        .schemas
        .iter()
        .position(|s| Schema::parse_str(s).unwrap().canonical_form() == canonical);
    if let Some(i) = existing {
        let id = i as u32 + 1;
        if r.subjects
            .get(&subject)
            .is_some_and(|ids| ids.contains(&id))
        {
            r.registrations += 1;
            return Json(json!({"id": id})).into_response();
        }
    }
    let bad = r.incompatibilities(&subject, &schema);
    if !bad.is_empty() {
        return error(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible: {}",
                bad.join("; ")
            ),
        );
    }
    let id = match existing {
        Some(i) => i as u32 + 1,
        None => {
            r.schemas.push(text);
            r.schemas.len() as u32
        }
    };
    r.subjects.entry(subject).or_default().push(id);
    r.registrations += 1;
    Json(json!({"id": id})).into_response()
}

async fn by_id(State(r): State<Reg>, Path(id): Path<u32>) -> Response {
    let r = r.lock().unwrap();
    match r.schemas.get((id as usize).wrapping_sub(1)) {
        Some(s) => Json(json!({"schema": s})).into_response(),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

async fn versions(State(r): State<Reg>, Path(subject): Path<String>) -> Response {
    let r = r.lock().unwrap();
    match r.subjects.get(&subject) {
        Some(ids) => Json(json!((1..=ids.len() as u32).collect::<Vec<_>>())).into_response(),
        None => error(StatusCode::NOT_FOUND, 40401, "Subject not found"),
    }
}

async fn version(State(r): State<Reg>, Path((subject, v)): Path<(String, String)>) -> Response {
    let mut r = r.lock().unwrap();
    r.version_reads += 1;
    let Some(ids) = r.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, "Subject not found");
    };
    let n = match v.as_str() {
        "latest" => ids.len(),
        v => v.parse().unwrap_or(0),
    };
    match n.checked_sub(1).and_then(|i| ids.get(i)) {
        Some(id) => Json(json!({"subject": subject, "version": n, "id": id,
            "schema": r.schemas[*id as usize - 1]}))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, 40402, "Version not found"),
    }
}

async fn config(
    State(r): State<Reg>,
    Path(subject): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = r.lock().unwrap();
    match r.config.get(&subject) {
        Some(m) => Json(json!({"compatibilityLevel": m})).into_response(),
        None if q.get("defaultToGlobal").is_some_and(|v| v == "true") => {
            Json(json!({"compatibilityLevel": r.global})).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            40408,
            "Subject does not have subject-level compatibility configured",
        ),
    }
}

async fn set_config(
    State(r): State<Reg>,
    Path(subject): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let mode = body["compatibility"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    r.lock().unwrap().config.insert(subject, mode.clone());
    Json(json!({"compatibility": mode})).into_response()
}

async fn global(State(r): State<Reg>) -> Response {
    Json(json!({"compatibilityLevel": r.lock().unwrap().global})).into_response()
}

async fn test_latest(
    State(r): State<Reg>,
    Path(subject): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let r = r.lock().unwrap();
    if !r.subjects.contains_key(&subject) {
        return error(StatusCode::NOT_FOUND, 40401, "Subject not found");
    }
    let Ok(schema) = Schema::parse_str(body["schema"].as_str().unwrap_or_default()) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "invalid Avro schema",
        );
    };
    let bad = r.incompatibilities(&subject, &schema);
    Json(json!({"is_compatible": bad.is_empty(), "messages": bad})).into_response()
}

/// Starts the registry (global mode BACKWARD, the registry's default); returns its URL.
pub async fn start_registry() -> (String, Reg) {
    let reg: Reg = Arc::new(Mutex::new(Registry {
        global: "BACKWARD".into(),
        ..Registry::default()
    }));
    let router = axum::Router::new()
        .route("/subjects/{subject}/versions", post(register).get(versions))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route("/schemas/ids/{id}", get(by_id))
        .route("/config", get(global))
        .route("/config/{subject}", get(config).put(set_config))
        .route(
            "/compatibility/subjects/{subject}/versions/latest",
            post(test_latest),
        )
        .with_state(reg.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), reg)
}
