//! `deploy/kubernetes/`: the manifests pass checkov, and everything they name exists in HELIOS —
//! the subcommands, the environment variables, the ports, the probe and scrape paths (asked of a
//! running ingress and metrics endpoint), and the processor group's raw topics and partitions in
//! KEDA's triggers (from topology.yaml).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn dir() -> std::path::PathBuf {
    std::path::Path::new(ROOT).join("deploy/kubernetes")
}

/// Every document of every manifest (kustomization.yaml aside), as JSON values.
fn documents() -> Vec<(String, Value)> {
    let mut docs = vec![];
    let mut files: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"] == kind)
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[test]
fn kubernetes_manifests_pass_checkov() {
    let bin = std::env::var("CHECKOV_BIN").expect(
        "CHECKOV_BIN is not set: run the suite with scripts/test.sh, which installs checkov",
    );
    let out = std::process::Command::new(&bin)
        .arg("-d")
        .arg(dir())
        .args([
            "--framework",
            "kubernetes",
            "--compact",
            "--quiet",
            "--skip-download",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "checkov: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Failed checks: 0"), "checkov: {stdout}");
    // It looked at the workloads (a directory it could not read would pass as well).
    let passed: u32 = stdout
        .split("Passed checks: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        passed >= 100,
        "checkov passed only {passed} checks: {stdout}"
    );
    // A check is skipped only where a manifest says why, and only these two.
    for (file, doc) in documents() {
        if let Some(notes) = doc["metadata"]["annotations"].as_object() {
            for (k, v) in notes
                .iter()
                .filter(|(k, _)| k.starts_with("checkov.io/skip"))
            {
                let id = s(v).split('=').next().unwrap_or_default();
                assert!(
                    ["CKV_K8S_43", "CKV_K8S_35"].contains(&id) && s(v).contains('='),
                    "{file}: {k}: {v} (a skip needs a reason and a review)"
                );
            }
        }
    }
}

/// The processor group's raw topics in topology.yaml, with their partitions, and the group.
fn raw_topics() -> (BTreeMap<String, u64>, String) {
    let text = std::fs::read_to_string(format!("{ROOT}/topology.yaml")).unwrap();
    let t: Value = serde_norway::from_str(&text).unwrap();
    let topics = t["raw_topics"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| (s(&r["name"]).to_string(), r["partitions"].as_u64().unwrap()))
        .collect();
    (topics, s(&t["consumer_group"]).to_string())
}

#[test]
fn the_scaled_object_follows_the_processor_groups_lag_on_every_raw_topic() {
    let docs = documents();
    let (topics, group) = raw_topics();
    let scaled = of_kind(&docs, "ScaledObject");
    assert_eq!(scaled.len(), 1, "one ScaledObject (the processor's)");
    let so = scaled[0];
    let target = s(&so["spec"]["scaleTargetRef"]["name"]);
    let deployment = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| s(&d["metadata"]["name"]) == target)
        .unwrap_or_else(|| panic!("the ScaledObject scales {target}, which is no Deployment here"));
    assert_eq!(
        s(&deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]),
        "process"
    );
    // Never more members than raw partitions (one would sit idle).
    let partitions: u64 = topics.values().sum();
    assert_eq!(so["spec"]["maxReplicaCount"].as_u64(), Some(partitions));
    let triggers = so["spec"]["triggers"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    for t in triggers {
        assert_eq!(s(&t["type"]), "kafka");
        let m = &t["metadata"];
        assert_eq!(s(&m["consumerGroup"]), group);
        assert_eq!(s(&m["limitToPartitionsWithLag"]), "true", "{t}");
        assert_eq!(s(&m["excludePersistentLag"]), "true", "{t}");
        // KEDA refuses allowIdleConsumers beside limitToPartitionsWithLag.
        assert!(m.get("allowIdleConsumers").is_none(), "{t}");
        assert_eq!(
            s(&m["offsetResetPolicy"]),
            "earliest",
            "as the processor's auto.offset.reset"
        );
        assert!(s(&m["lagThreshold"]).parse::<u64>().is_ok_and(|n| n > 0));
        let from_env = s(&m["bootstrapServersFromEnv"]);
        assert_eq!(from_env, "KAFKA_BOOTSTRAP_SERVERS");
        let auth = s(&t["authenticationRef"]["name"]);
        assert!(
            of_kind(&docs, "TriggerAuthentication")
                .iter()
                .any(|a| s(&a["metadata"]["name"]) == auth),
            "no TriggerAuthentication {auth}"
        );
        assert!(seen.insert(s(&m["topic"]).to_string()), "{t}");
    }
    let want: BTreeSet<String> = topics.keys().cloned().collect();
    assert_eq!(seen, want, "one trigger per raw topic of topology.yaml");
}

/// `helios <command…> --help`.
fn help(command: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
        .args(command)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "helios {command:?} --help failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The port of a `host:port` value.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_command_variable_port_and_path_the_workloads_name_exists() {
    let docs = documents();
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(
        deployments.len(),
        4,
        "ingress, processor, reconciler, DLQ healing"
    );
    // A real ingress, and a real metrics endpoint (the processor's and the reconciler's).
    let app = spawn_app(|_| {}).await;
    let (stop, shutdown) = helios::shutdown::Shutdown::new();
    let metrics = helios::pipeline::serve_metrics("127.0.0.1:0", shutdown)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut commands = BTreeSet::new();
    let mut container_ports = BTreeSet::new();
    for d in &deployments {
        let name = s(&d["metadata"]["name"]);
        let pod = &d["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        assert_eq!(
            &d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            &labels["app.kubernetes.io/name"],
            "{name}: the selector picks its own pods"
        );
        let c = &pod["spec"]["containers"][0];
        // The subcommand: the arguments before the first flag (`dlq heal --every 5m`).
        let words: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(s)
            .take_while(|a| !a.starts_with('-'))
            .collect();
        let command = words.join(" ");
        let command = command.as_str();
        commands.insert(command.to_string());
        let help = help(&words);
        let env: BTreeMap<&str, &str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (s(&e["name"]), s(&e["value"])))
            .collect();
        for var in env.keys() {
            assert!(
                help.contains(&format!("env: {var}")),
                "{name}: `helios {command}` reads no {var}"
            );
        }
        // The port it listens on is the port it declares, probes and scrape.
        let ports: BTreeMap<&str, u64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (s(&p["name"]), p["containerPort"].as_u64().unwrap()))
            .collect();
        let listens = match command {
            "ingress" => env["API_PORT"].parse().unwrap(),
            "process" => port_of(env["HELIOS_METRICS_ADDR"]),
            "reconcile" => port_of(env["HELIOS_RECONCILE_METRICS_ADDR"]),
            "dlq heal" => port_of(env["HELIOS_DLQ_HEAL_METRICS_ADDR"]),
            other => panic!("{name}: unexpected command {other}"),
        };
        assert_eq!(
            ports.values().copied().collect::<Vec<_>>(),
            vec![listens],
            "{name}"
        );
        container_ports.insert(listens);
        let scrape = &pod["metadata"]["annotations"];
        assert_eq!(
            s(&scrape["prometheus.io/port"]),
            listens.to_string(),
            "{name}"
        );
        // Where that port is served here: the ingress, or the metrics endpoint.
        let base = if command == "ingress" {
            app.url("")
        } else {
            format!("http://{metrics}")
        };
        let mut paths = vec![s(&scrape["prometheus.io/path"]).to_string()];
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &c[probe]["httpGet"];
            assert!(get.is_object(), "{name}: no {probe}");
            assert!(
                ports.contains_key(s(&get["port"])),
                "{name}: {probe} on a port it does not declare"
            );
            paths.push(s(&get["path"]).to_string());
        }
        for path in paths {
            // Readiness follows Kafka: polled until the ingress has reached the broker.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let status = client
                    .get(format!("{base}{path}"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 200 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: GET {path} answers {status}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Read-only root, a topology mounted where HELIOS_TOPOLOGY says.
        let mount = s(&c["volumeMounts"][0]["mountPath"]);
        assert!(
            env["HELIOS_TOPOLOGY"].starts_with(&format!("{mount}/")),
            "{name}"
        );
    }
    assert_eq!(
        commands,
        ["ingress", "process", "reconcile", "dlq heal"]
            .map(String::from)
            .into(),
        "the long-running commands"
    );
    // Each workload's port is let in by a NetworkPolicy (the rest is denied).
    let allowed: BTreeSet<u64> = of_kind(&docs, "NetworkPolicy")
        .iter()
        .flat_map(|p| p["spec"]["ingress"].as_array().cloned().unwrap_or_default())
        .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(allowed, container_ports);
    // Every manifest is in the kustomization.
    let k: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir().join("kustomization.yaml")).unwrap())
            .unwrap();
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(r).to_string())
        .collect();
    let files: BTreeSet<String> = docs.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(listed, files);
    stop.trigger();
    app.stop().await;
}
