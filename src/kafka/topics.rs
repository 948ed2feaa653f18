//! `topology apply` through the admin API, and the start-up checks of the topics HELIOS
//! writes: record sizes against `max.message.bytes`, `min.insync.replicas`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaSettings;
use crate::limits::{SizeLimits, TopicKind};
use crate::topology::{PlannedTopic, Topology};

/// What `topology apply` did (or, for `--dry-run`, would do) to one topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicAction {
    Created,
    WouldCreate,
    Exists { partitions: i32 },
}

/// One line of the `topology apply` report.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub topic: PlannedTopic,
    pub action: TopicAction,
    pub warning: Option<String>,
}

/// Existing topics and their partition counts.
pub fn existing_topics(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let md = admin.inner().fetch_metadata(None, timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Creates every topic of the topology that is missing. Idempotent: existing topics are left
/// alone (a partition-count difference is reported, never "fixed" silently).
pub async fn apply_topology(
    settings: &KafkaSettings,
    topology: &Topology,
    dry_run: bool,
) -> anyhow::Result<Vec<TopicReport>> {
    let timeout = Duration::from_secs(15);
    let s = settings.clone();
    let existing = tokio::task::spawn_blocking(move || existing_topics(&s, timeout))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the topic list from Kafka at {}: {e}",
                settings.bootstrap_servers
            )
        })?;
    let mut reports = vec![];
    let mut to_create = vec![];
    for t in topology.planned_topics() {
        match existing.get(&t.name) {
            Some(&partitions) => {
                let warning = (partitions != t.partitions).then(|| {
                    format!(
                        "has {partitions} partitions, topology declares {}; HELIOS does not change partition counts",
                        t.partitions
                    )
                });
                reports.push(TopicReport {
                    topic: t,
                    action: TopicAction::Exists { partitions },
                    warning,
                });
            }
            None => to_create.push(t),
        }
    }
    if dry_run {
        for t in to_create {
            reports.push(TopicReport {
                topic: t,
                action: TopicAction::WouldCreate,
                warning: None,
            });
        }
        return Ok(reports);
    }
    if !to_create.is_empty() {
        let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
        let new: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|t| {
                let mut n = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication_factor),
                );
                for (k, v) in &t.config {
                    n = n.set(k, v);
                }
                n
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        let results = admin.create_topics(new.iter(), &opts).await?;
        let mut failures = vec![];
        for (t, r) in to_create.into_iter().zip(results) {
            match r {
                Ok(_) => reports.push(TopicReport {
                    topic: t,
                    action: TopicAction::Created,
                    warning: None,
                }),
                // Another `apply` (or a test) created it in between: that is the goal reached.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => reports.push(TopicReport {
                    action: TopicAction::Exists {
                        partitions: t.partitions,
                    },
                    topic: t,
                    warning: None,
                }),
                Err((name, code)) => failures.push(format!("{name}: {code}")),
            }
        }
        if !failures.is_empty() {
            anyhow::bail!("could not create topics: {}", failures.join("; "));
        }
    }
    Ok(reports)
}

/// Checks that every topic of `kinds` allows the records HELIOS writes to it (see
/// [`crate::limits`]): the broker's `max.message.bytes` for topics that exist (asked with
/// DescribeConfigs), else the value topology.yaml declares for the topics `topology apply` will
/// create. A broker that cannot describe configs is reported and the declared values are used.
pub async fn check_topic_sizes(
    settings: &KafkaSettings,
    topology: &Topology,
    limits: &SizeLimits,
    kinds: &[TopicKind],
) -> anyhow::Result<()> {
    use rdkafka::admin::ResourceSpecifier;
    let planned: Vec<(PlannedTopic, TopicKind)> = topology
        .planned_topics()
        .into_iter()
        .map(|t| {
            let kind = if t.role.starts_with("raw") {
                TopicKind::Raw
            } else {
                TopicKind::Output
            };
            (t, kind)
        })
        .filter(|(_, k)| kinds.contains(k))
        .collect();
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let specs: Vec<ResourceSpecifier<'_>> = planned
        .iter()
        .map(|(t, _)| ResourceSpecifier::Topic(&t.name))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = match tokio::time::timeout(
        Duration::from_secs(12),
        admin.describe_configs(&specs, &opts),
    )
    .await
    {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read topic configs from the broker; checking topology.yaml's max.message.bytes only");
            None
        }
        Err(_) => {
            tracing::warn!("the broker did not answer DescribeConfigs; checking topology.yaml's max.message.bytes only");
            None
        }
    };
    let mut problems = vec![];
    for (i, (t, kind)) in planned.iter().enumerate() {
        let from_broker = described
            .as_ref()
            .and_then(|d| d.get(i))
            .and_then(|r| r.as_ref().ok())
            .and_then(|c| c.get("max.message.bytes"))
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok())
            .map(|v| (v, "on the broker"));
        let declared = t
            .config
            .get("max.message.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .map(|v| (v, "declared in topology.yaml"));
        if let Some((found, origin)) = from_broker.or(declared) {
            if let Err(p) = limits.check_topic(&t.name, *kind, found, origin) {
                problems.push(p);
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "record size settings disagree:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// Warns for each raw topic whose `min.insync.replicas` is below 2: with `acks=all` a 2xx then
/// means one broker has the record, and losing that broker loses acknowledged events.
pub async fn warn_min_insync(settings: &KafkaSettings, topology: &Topology) {
    use rdkafka::admin::ResourceSpecifier;
    let Ok(admin) = settings
        .client_config()
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let topics: Vec<String> = crate::source::Source::ALL
        .iter()
        .map(|s| topology.raw_topic(*s))
        .collect();
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let Ok(Ok(described)) = tokio::time::timeout(
        Duration::from_secs(12),
        admin.describe_configs(&specs, &opts),
    )
    .await
    else {
        tracing::warn!("cannot read the raw topics' min.insync.replicas from the broker");
        return;
    };
    for (t, r) in topics.iter().zip(described) {
        let value = r
            .ok()
            .and_then(|c| c.get("min.insync.replicas").and_then(|e| e.value.clone()))
            .and_then(|v| v.parse::<i64>().ok());
        if value.is_some_and(|v| v < 2) {
            tracing::warn!(topic = %t, min_insync_replicas = value, "min.insync.replicas is below 2: an acknowledged event may live on one broker only (set it to 2 with 3 replicas)");
        }
    }
}
