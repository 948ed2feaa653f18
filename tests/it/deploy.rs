//! The files in `deploy/`: alert rules pass `promtool`, systemd units pass `systemd-analyze
//! verify`, and every metric the dashboard, the rules and the Kubernetes manifests name is
//! exported by a running ingress and processor (the manifests' own checks: `kubernetes.rs`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn tool(name: &str) -> std::process::Command {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.exists() {
            return std::process::Command::new(p);
        }
    }
    panic!("`{name}` is not installed (scripts/test.sh installs it)");
}

#[test]
fn alert_rules_pass_promtool() {
    let out = tool("promtool")
        .args([
            "check",
            "rules",
            &format!("{ROOT}/deploy/prometheus/alerts.yml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // The units name /usr/local/bin/helios; verify them against the binary just built.
    let dir = scratch_dir("systemd");
    let mut units = vec![];
    for name in [
        "helios-ingress.service",
        "helios-processor.service",
        "helios-reconcile.service",
        "helios-dlq-heal.service",
    ] {
        let text = std::fs::read_to_string(format!("{ROOT}/deploy/systemd/{name}")).unwrap();
        let path = dir.join(name);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/helios", env!("CARGO_BIN_EXE_helios")),
        )
        .unwrap();
        units.push(path);
    }
    let out = tool("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // In a container without systemd as PID 1 it still loads and checks the units; only lines
    // naming our units count.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("helios-")).collect();
    assert!(
        out.status.success() || ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    assert!(ours.is_empty(), "systemd-analyze verify: {ours:?}");
}

/// Metric names (`helios_*`) in a text, histogram suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("helios_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let before = start.checked_sub(1).map(|b| bytes[b]);
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_count", "_sum"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            names.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    names
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_the_rules_is_exported() {
    let dashboard = std::fs::read_to_string(format!("{ROOT}/deploy/grafana/helios.json")).unwrap();
    let rules = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yml")).unwrap();
    let mut kubernetes = String::new();
    for e in std::fs::read_dir(format!("{ROOT}/deploy/kubernetes")).unwrap() {
        kubernetes += &std::fs::read_to_string(e.unwrap().path()).unwrap();
    }
    let named: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&rules))
        .chain(metric_names(&kubernetes))
        // The dashboard's uid, not a metric.
        .filter(|n| n != "helios_overview")
        .collect();
    assert!(named.len() >= 15, "names found: {named:?}");

    // A running ingress and processor (one registry per process, as in `helios run`), with
    // traffic: an event, a duplicate, an invalid one, an Event Grid validation handshake.
    let app = spawn_app(|_| {}).await;
    let topology = app.topology.clone();
    let proc = spawn_processor(&topology).await;
    // And a reconciler (its series are exported from start-up).
    let reconciler = helios::reconcile::Reconciler::new(
        helios::reconcile::ReconcilerConfig {
            kafka: helios::config::KafkaSettings::new(kafka_bootstrap()),
            group: topology.reconciler_group.clone(),
            topology: topology.clone(),
            batch_size: 100,
            idle_after: Duration::from_secs(30),
            state_retention: Duration::from_secs(8 * 86_400),
            rejoin_after: helios::reconcile::DEFAULT_REJOIN_AFTER,
            backlog_every: helios::reconcile::DEFAULT_BACKLOG_EVERY,
        },
        helios::reconcile::ReconStore::Pg(proc.pool.clone()),
    )
    .expect("reconciler");
    let (stop_reconciler, reconciler_shutdown) = helios::shutdown::Shutdown::new();
    let reconciling = tokio::spawn(reconciler.run(reconciler_shutdown));
    let event = json!({"version": "0", "id": "m-1", "detail-type": "OrderPlaced", "detail": {"order_id": "O-1", "customer_id": "C"}});
    let invalid = json!({"version": "0", "id": "m-2", "detail-type": "OrderPlaced", "detail": {"order_id": "O-2"}});
    for body in [&event, &event, &invalid] {
        let r = app
            .client
            .post(app.url("/api/v1/webhooks/aws/eventbridge"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let validation = json!([{"id": "v-1", "topic": "/subscriptions/s", "subject": "", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2026-11-25T10:00:00Z", "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}, "dataVersion": "1", "metadataVersion": "1"}]);
    let r = app
        .client
        .post(app.url("/api/v1/webhooks/azure/eventgrid"))
        .header("aeg-event-type", "SubscriptionValidation")
        .json(&validation)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Until everything named is there (consumer lag comes with librdkafka's statistics, every 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let exported = metric_names(&text);
        let missing: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "named by deploy/ but not exported: {missing:?}"
    );
    stop_reconciler.trigger();
    reconciling
        .await
        .expect("reconciler task")
        .expect("reconciler ended cleanly");
    proc.stop().await;
    app.stop().await;
}
