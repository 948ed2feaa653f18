//! Schema evolution: `helios schemas check` / `register` against the in-test registry under its
//! compatibility modes, and the processor validating each event against the version it was
//! written with.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::common::*;
use crate::registry::start_registry;

const ORDER_V1: &str = r#"{"type": "record", "name": "OrderPlaced", "namespace": "io.helios.events",
  "helios.schema.version": 1,
  "fields": [{"name": "order_id", "type": ["null", "string"], "default": null},
             {"name": "customer_id", "type": ["null", "string"], "default": null},
             {"name": "amount", "type": ["null", "double"], "default": null}]}"#;

/// A folder with the repository's topology.yaml and its three schemas (InventoryReserved with
/// a required `warehouse`, so that removing it is a break for someone).
fn schema_dir(tag: &str) -> PathBuf {
    let dir = scratch_dir(tag);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    std::fs::copy(repo.join("topology.yaml"), dir.join("topology.yaml")).unwrap();
    for t in ["OrderPlaced", "PaymentProcessed"] {
        std::fs::copy(
            repo.join(format!("schemas/{t}.avsc")),
            dir.join(format!("schemas/{t}.avsc")),
        )
        .unwrap();
    }
    write_schema(
        &dir,
        "InventoryReserved",
        r#"{"type": "record", "name": "InventoryReserved", "namespace": "io.helios.events",
        "fields": [{"name": "order_id", "type": ["null", "string"], "default": null},
                   {"name": "sku", "type": ["null", "string"], "default": null},
                   {"name": "warehouse", "type": "string"}]}"#,
    );
    dir
}

fn write_schema(dir: &Path, t: &str, text: &str) {
    std::fs::write(dir.join(format!("schemas/{t}.avsc")), text).unwrap();
}

/// Adds a field to a schema file.
fn add_field(dir: &Path, t: &str, field: serde_json::Value) {
    let p = dir.join(format!("schemas/{t}.avsc"));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["fields"].as_array_mut().unwrap().push(field);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// `helios schemas <args>` off the test's runtime (the registry answers on it); (exit code, stdout).
async fn schemas(url: &str, dir: &Path, args: &[&str]) -> (i32, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_helios"));
    c.arg("schemas")
        .args(args)
        .arg("--registry")
        .arg(url)
        .arg("--topology")
        .arg(dir.join("topology.yaml"))
        .env("RUST_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || c.output().expect("run helios schemas"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        (0..=2).contains(&code),
        "exit {code}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

fn versions(reg: &crate::registry::Reg, subject: &str) -> usize {
    reg.lock()
        .unwrap()
        .subjects
        .get(subject)
        .map_or(0, |v| v.len())
}

#[tokio::test]
async fn schemas_check_names_what_breaks_whom_and_register_registers_only_what_passes() {
    let (url, reg) = start_registry().await;
    let dir = schema_dir("schemas-check");

    let (code, out) = schemas(&url, &dir, &["register"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches("new subject: registers as version 1").count(),
        3,
        "{out}"
    );
    assert_eq!(out.matches("registered: version 1").count(), 3, "{out}");
    for t in ["OrderPlaced", "PaymentProcessed", "InventoryReserved"] {
        assert_eq!(versions(&reg, &format!("io.helios.events.{t}")), 1, "{t}");
    }
    let (code, out) = schemas(&url, &dir, &["check"]).await;
    assert_eq!(
        (code, out.matches("unchanged (version 1)").count()),
        (0, 3),
        "{out}"
    );
    // A registry that does not answer is neither a pass nor a refusal.
    let (code, out) = schemas("http://127.0.0.1:1", &dir, &["check"]).await;
    assert_eq!(code, 2, "{out}");

    // An added optional field: compatible under BACKWARD (the registry's default mode).
    add_field(
        &dir,
        "OrderPlaced",
        json!({"name": "channel", "type": ["null", "string"], "default": null}),
    );
    // An added field without a default: consumers on the new schema cannot read old events.
    add_field(
        &dir,
        "PaymentProcessed",
        json!({"name": "method", "type": "string"}),
    );
    // A removed field: BACKWARD allows it (new readers ignore it), FORWARD does not (old
    // readers need `warehouse` and have no default for it).
    write_schema(
        &dir,
        "InventoryReserved",
        r#"{"type": "record", "name": "InventoryReserved", "namespace": "io.helios.events",
        "fields": [{"name": "order_id", "type": ["null", "string"], "default": null},
                   {"name": "sku", "type": ["null", "string"], "default": null}]}"#,
    );
    let (code, out) = schemas(&url, &dir, &["check"]).await;
    assert_eq!(code, 1, "{out}");
    let line = |t: &str| {
        out.lines()
            .find(|l| l.starts_with(t))
            .unwrap_or_else(|| panic!("no line for {t} in:\n{out}"))
            .to_string()
    };
    assert!(
        line("OrderPlaced").contains("compatible with version 1 under BACKWARD"),
        "{out}"
    );
    assert!(
        line("PaymentProcessed").contains("INCOMPATIBLE with version 1 under BACKWARD"),
        "{out}"
    );
    assert!(
        out.contains("field `method` (breaks consumers on the new schema, against v1): added without a default"),
        "{out}"
    );
    assert!(
        line("InventoryReserved").contains("compatible with version 1 under BACKWARD"),
        "{out}"
    );

    let client = reqwest::Client::new();
    let r = client
        .put(format!("{url}/config/io.helios.events.InventoryReserved"))
        .json(&json!({"compatibility": "FORWARD"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (code, out) = schemas(
        &url,
        &dir,
        &["check", "--json", "--type", "InventoryReserved"],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["schemas"][0];
    assert_eq!(s["subject"], "io.helios.events.InventoryReserved", "{v}");
    assert_eq!(s["mode"], "FORWARD", "{v}");
    assert_eq!(s["verdict"], "incompatible", "{v}");
    assert_eq!(s["breaks"][0]["field"], "warehouse", "{v}");
    assert_eq!(s["breaks"][0]["whom"], "old_readers", "{v}");
    assert!(
        s["breaks"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("removed, and v1 has no default"),
        "{v}"
    );
    assert_eq!(
        v["schemas"].as_array().unwrap().len(),
        1,
        "--type filters: {v}"
    );

    // Register: what passes goes in, what does not stays out.
    let (code, out) = schemas(&url, &dir, &["register"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("2 schema(s) refused"), "{out}");
    assert_eq!(versions(&reg, "io.helios.events.OrderPlaced"), 2);
    assert_eq!(versions(&reg, "io.helios.events.PaymentProcessed"), 1);
    assert_eq!(versions(&reg, "io.helios.events.InventoryReserved"), 1);
    let (_, out) = schemas(&url, &dir, &["check", "--type", "OrderPlaced"]).await;
    assert!(out.contains("unchanged (version 2)"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn events_written_with_version_1_still_validate_after_version_2_is_registered() {
    let (url, reg) = start_registry().await;
    let subject = "io.helios.events.OrderPlaced";
    // Version 2 adds a required `channel`: FORWARD-compatible (producers upgrade first; old
    // readers ignore it), so events of producers still on version 1 lack it.
    let mut v2: serde_json::Value = serde_json::from_str(ORDER_V1).unwrap();
    v2["helios.schema.version"] = json!(2);
    v2["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "channel", "type": "string"}));
    let client = reqwest::Client::new();
    client
        .put(format!("{url}/config/{subject}"))
        .json(&json!({"compatibility": "FORWARD"}))
        .send()
        .await
        .unwrap();
    for text in [ORDER_V1.to_string(), v2.to_string()] {
        let r = client
            .post(format!("{url}/subjects/{subject}/versions"))
            .json(&json!({"schema": text}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    let dir = scratch_dir("schemas-writer");
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    write_schema(&dir, "OrderPlaced", &v2.to_string());

    let app = spawn_app(|_| {}).await;
    let mut topology = app.topology.clone();
    topology.base_dir = Some(dir.clone());
    let proc = spawn_processor_with(
        &topology,
        ProcOpts {
            schema_registry_url: Some(url.clone()),
            ..ProcOpts::default()
        },
    )
    .await;
    let ev = |id: &str, extra: serde_json::Value, data: serde_json::Value| {
        let mut e = json!({"event_type": "OrderPlaced", "event_id": id,
            "occurred_at": "2026-12-04T10:00:00Z", "data": data});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let base = json!({"order_id": "O-W", "customer_id": "C-1", "amount": 3.0});
    let mut with_channel = base.clone();
    with_channel["channel"] = json!("web");
    let events = [
        // Written with version 1: valid there, though it lacks version 2's `channel`.
        ev("w-v1", json!({"schema_version": 1}), base.clone()),
        // The same through a CloudEvents-style `dataschema` naming the registry's version.
        ev(
            "w-ds1",
            json!({"dataschema": format!("{url}/subjects/{subject}/versions/1")}),
            base.clone(),
        ),
        // Says nothing: the current schema (version 2), which requires `channel`.
        ev("w-none", json!({}), base.clone()),
        ev("w-v2", json!({"schema_version": "2"}), with_channel),
        // A version the registry does not have.
        ev("w-v9", json!({"schema_version": 9}), base.clone()),
    ];
    for e in &events {
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .body(e.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    expect_count(&proc.pool, "SELECT count(*) FROM events", 3).await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events ORDER BY event_id")
        .fetch_all(&proc.pool)
        .await
        .unwrap();
    assert_eq!(stored, ["w-ds1", "w-v1", "w-v2"]);
    let dlq = read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 2).await;
    let by = |id: &str| {
        dlq.iter()
            .find(|r| String::from_utf8_lossy(&r.value).contains(&format!("\"{id}\"")))
            .unwrap_or_else(|| panic!("{id} not in the DLQ"))
    };
    let none = by("w-none");
    assert_eq!(none.header("helios-dlq-reason"), Some("schema_violation"));
    assert_eq!(none.header("helios-dlq-field"), Some("channel"));
    assert_eq!(none.header("helios-dlq-schema-subject"), Some(subject));
    assert_eq!(none.header("helios-dlq-schema-version"), Some("2"));
    let v9 = by("w-v9");
    assert_eq!(v9.header("helios-dlq-reason"), Some("schema_violation"));
    assert_eq!(v9.header("helios-dlq-schema-version"), Some("9"));
    assert!(
        v9.header("helios-dlq-detail")
            .unwrap_or("")
            .contains("does not have"),
        "{:?}",
        v9.header("helios-dlq-detail")
    );
    // Version 1 was read from the registry once, and kept.
    assert_eq!(reg.lock().unwrap().version_reads, 1);
    proc.stop().await;
    app.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
