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
