//! `topology apply` creates what is missing, is idempotent, and reports what it did.

use helios::kafka::{apply_topology, existing_topics, TopicAction};

use crate::common::*;

#[tokio::test]
async fn apply_creates_then_is_idempotent() {
    let kafka = helios::config::KafkaSettings::new(kafka_bootstrap());
    let topology = test_topology();
    let dry = apply_topology(&kafka, &topology, true).await.unwrap();
    assert!(dry.iter().all(|r| r.action == TopicAction::WouldCreate));
    let planned = topology.planned_topics();
    assert_eq!(dry.len(), planned.len());

    let first = apply_topology(&kafka, &topology, false).await.unwrap();
    assert!(
        first.iter().all(|r| r.action == TopicAction::Created),
        "{first:?}"
    );
    let existing = existing_topics(&kafka, std::time::Duration::from_secs(10)).unwrap();
    for p in &planned {
        assert_eq!(existing.get(&p.name), Some(&p.partitions), "{}", p.name);
    }
    let second = apply_topology(&kafka, &topology, false).await.unwrap();
    assert!(second
        .iter()
        .all(|r| matches!(r.action, TopicAction::Exists { .. })));
    assert!(second.iter().all(|r| r.warning.is_none()));
}

#[tokio::test]
async fn sizes_that_disagree_are_refused_at_start_up_naming_the_settings() {
    let limits = helios::limits::SizeLimits::default();
    let raw = [helios::limits::TopicKind::Raw];
    let kafka = helios::config::KafkaSettings::new(kafka_bootstrap());
    // Raw topics that allow less than the ingress accepts, declared in the topology.
    let small = applied_topology(|t| {
        t.topic_config
            .insert("max.message.bytes".into(), "500000".into());
    })
    .await;
    let err = helios::kafka::check_topic_sizes(&kafka, &small, &limits, &raw)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&small.raw_topic(helios::source::Source::Aws)),
        "{err}"
    );
    assert!(err.contains("HELIOS_MAX_BODY_BYTES=1179648"), "{err}");
    assert!(err.contains("max.message.bytes=500000"), "{err}");
    // The same topics described by a topology that declares enough: the broker's own value
    // decides when the broker can say it.
    let mut declared_big = small.clone();
    declared_big
        .topic_config
        .insert("max.message.bytes".into(), "2097152".into());
    let err = helios::kafka::check_topic_sizes(&kafka, &declared_big, &limits, &raw)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("on the broker"), "{err}");
    // `helios ingress` refuses to start on those topics, saying why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
        .arg("ingress")
        .env(
            "HELIOS_TOPOLOGY",
            concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
        .env("HELIOS_TOPIC_PREFIX", &small.topic_prefix)
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", "0")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the ingress started: {stderr}");
    assert!(stderr.contains("HELIOS_MAX_BODY_BYTES"), "{stderr}");
    // A smaller body limit fits the small topics.
    let fits = helios::limits::SizeLimits {
        max_body_bytes: 300_000,
    };
    helios::kafka::check_topic_sizes(&kafka, &small, &fits, &raw)
        .await
        .unwrap();
}
