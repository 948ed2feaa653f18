//! `helios dlq list | summary | redrive | heal`: look into `helios.dlq` and send records whose
//! cause was fixed back to their raw topic, chosen by a person (`redrive`, [`redrive`]) or by a
//! check against the current topology and schemas (`heal`, [`heal`]). A redriven record carries
//! `helios-redrive-count` (so one that keeps failing cannot loop: past `--max-redrives` it is
//! refused) and `helios-redrive-of` (the original raw record, whose dedup marks it takes over).
//! Each redrive is recorded in `dlq_redrives`, so a DLQ record is sent back once unless `--force`.

pub mod heal;
pub mod redrive;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{KafkaArgs, KafkaSettings};
use crate::model::headers::{dlq as dh, REDRIVE_COUNT};

/// Which DLQ records a command looks at.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqFilter {
    /// Only this reason (e.g. missing_required_field; repeatable).
    #[arg(long = "reason")]
    pub reasons: Vec<String>,
    /// Only records from this source (repeatable).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Only records dead-lettered at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only these DLQ records: PARTITION:OFFSET (repeatable).
    #[arg(long = "record", value_name = "PARTITION:OFFSET")]
    pub records: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List DLQ records with their reason headers.
    List {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        filter: DlqFilter,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Counts by reason, stage and source.
    Summary {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Send chosen DLQ records back to their raw topic (after fixing their cause).
    Redrive {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        filter: DlqFilter,
        /// Records already redriven this many times are refused.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Redrive records that were already redriven once from the DLQ.
        #[arg(long)]
        force: bool,
        /// Show what would be redriven, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// PostgreSQL URL (redrives are recorded in dlq_redrives).
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// PostgreSQL schema of HELIOS's tables.
        #[arg(long, env = "HELIOS_DB_SCHEMA")]
        db_schema: Option<String>,
    },
    /// Send back the DLQ records whose cause is gone: each is checked first, in memory, against
    /// the current topology and schemas (policies per reason: `dlq.heal` in topology.yaml).
    Heal(heal::HealArgs),
}

/// One DLQ record.
#[derive(Debug, Clone)]
pub struct DlqRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DlqRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn redrive_count(&self) -> u32 {
        self.header(REDRIVE_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Reads the whole DLQ topic (up to its current end).
pub fn read_dlq(settings: &KafkaSettings, topic: &str) -> anyhow::Result<Vec<DlqRecord>> {
    let c = crate::kafka::reader(settings, "dlq-reader")?;
    let timeout = Duration::from_secs(15);
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
                ends.insert(p.id(), high);
            }
        }
    }
    if ends.is_empty() {
        return Ok(vec![]);
    }
    c.assign(&tpl)?;
    let mut out = vec![];
    let mut remaining = ends.clone();
    let mut idle = std::time::Instant::now();
    while !remaining.is_empty() {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle = std::time::Instant::now();
                let end = ends.get(&m.partition()).copied().unwrap_or(0);
                if m.offset() < end {
                    out.push(DlqRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|x| {
                                        (x.key.to_string(), x.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
                if m.offset() + 1 >= end {
                    remaining.remove(&m.partition());
                }
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None if idle.elapsed() > Duration::from_secs(30) => {
                anyhow::bail!("reading {topic}: no records for 30 s before its end")
            }
            None => {}
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

fn select(records: Vec<DlqRecord>, f: &DlqFilter) -> anyhow::Result<Vec<DlqRecord>> {
    let since = f
        .since
        .as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| anyhow::anyhow!("--since `{s}` is not an RFC 3339 time ({e}); write e.g. 2026-11-22T09:00:00Z"))
        })
        .transpose()?;
    let wanted: Vec<(i32, i64)> = f
        .records
        .iter()
        .map(|r| {
            let bad = || anyhow::anyhow!("--record `{r}`: write PARTITION:OFFSET, e.g. 0:42");
            let (p, o) = r.split_once(':').ok_or_else(bad)?;
            Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(records
        .into_iter()
        .filter(|r| {
            f.reasons.is_empty()
                || r.header(dh::REASON)
                    .is_some_and(|x| f.reasons.iter().any(|w| w == x))
        })
        .filter(|r| {
            f.sources.is_empty()
                || r.header("helios-source")
                    .is_some_and(|x| f.sources.iter().any(|w| w == x))
        })
        .filter(|r| {
            since.is_none_or(|s| {
                r.header(dh::FAILED_AT)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t.with_timezone(&Utc) >= s)
            })
        })
        .filter(|r| wanted.is_empty() || wanted.contains(&(r.partition, r.offset)))
        .collect())
}

async fn load(
    kafka: &KafkaArgs,
    filter: &DlqFilter,
) -> anyhow::Result<(crate::topology::Topology, KafkaSettings, Vec<DlqRecord>)> {
    let (topology, settings) = kafka.resolve()?;
    let topic = topology.dlq_topic();
    let s = settings.clone();
    let all = tokio::task::spawn_blocking(move || read_dlq(&s, &topic)).await??;
    let chosen = select(all, filter)?;
    Ok((topology, settings, chosen))
}

/// Runs a `helios dlq` subcommand.
pub async fn run(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List {
            kafka,
            filter,
            limit,
        } => {
            let (topology, _, recs) = load(&kafka, &filter).await?;
            println!("{} record(s) in {} match", recs.len(), topology.dlq_topic());
            for r in recs.iter().take(limit) {
                println!(
                    "{}:{}  {}  {} ({})  source={}  raw={}:{}:{}  redrives={}{}",
                    r.partition,
                    r.offset,
                    r.header(dh::FAILED_AT).unwrap_or("-"),
                    r.header(dh::REASON).unwrap_or("-"),
                    r.header(dh::STAGE).unwrap_or("-"),
                    r.header("helios-source").unwrap_or("-"),
                    r.header(dh::RAW_TOPIC).unwrap_or("-"),
                    r.header(dh::RAW_PARTITION).unwrap_or("-"),
                    r.header(dh::RAW_OFFSET).unwrap_or("-"),
                    r.redrive_count(),
                    r.header(dh::FIELD)
                        .map(|f| format!("  field={f}"))
                        .unwrap_or_default(),
                );
                println!("    {}", r.header(dh::DETAIL).unwrap_or(""));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Summary { kafka, filter } => {
            let (topology, _, recs) = load(&kafka, &filter).await?;
            let mut by: BTreeMap<(String, String, String), usize> = BTreeMap::new();
            for r in &recs {
                let k = (
                    r.header(dh::REASON).unwrap_or("-").to_string(),
                    r.header(dh::STAGE).unwrap_or("-").to_string(),
                    r.header("helios-source").unwrap_or("-").to_string(),
                );
                *by.entry(k).or_default() += 1;
            }
            println!("{} record(s) in {}", recs.len(), topology.dlq_topic());
            println!(
                "{:<26} {:<10} {:<8} {:>7}",
                "reason", "stage", "source", "count"
            );
            for ((reason, stage, source), n) in by {
                println!("{reason:<26} {stage:<10} {source:<8} {n:>7}");
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive {
            kafka,
            filter,
            max_redrives,
            force,
            dry_run,
            database_url,
            db_schema,
        } => {
            redrive::run(
                &kafka,
                &filter,
                redrive::Options {
                    max_redrives,
                    force,
                    dry_run,
                },
                &database_url,
                db_schema.as_deref(),
            )
            .await
        }
        DlqCommand::Heal(args) => heal::run(args).await,
    }
}
