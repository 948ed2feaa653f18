//! Sending a DLQ record back to its raw topic, the one way both `helios dlq redrive` (a person
//! chose the records) and `helios dlq heal` (a check chose them) do it: the original raw record's
//! headers and bytes, `helios-redrive-count` + 1, `helios-redrive-of` (the first raw record,
//! whose dedup marks the redriven one takes over), and a row in `dlq_redrives` so a DLQ record is
//! sent back once.

use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::{load, DlqFilter, DlqRecord};
use crate::config::KafkaArgs;
use crate::model::headers::{dlq as dh, REDRIVEN_AT, REDRIVE_COUNT, REDRIVE_OF};

/// How `helios dlq redrive` treats the records it was given.
pub struct Options {
    pub max_redrives: u32,
    pub force: bool,
    pub dry_run: bool,
}

/// Why a DLQ record cannot be sent back.
#[derive(Debug)]
pub enum Refused {
    /// Redriven this many times already (`--max-redrives`).
    TooOften(u32),
    /// No `helios-dlq-raw-topic` header: not a record HELIOS dead-lettered.
    NoRawTopic,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::TooOften(n) => write!(f, "redriven {n} time(s) already"),
            Refused::NoRawTopic => write!(f, "no {} header", dh::RAW_TOPIC),
        }
    }
}

/// Where a record goes back to: its raw topic and the next redrive count, or why it may not.
pub fn target(r: &DlqRecord, max_redrives: u32) -> Result<(String, u32), Refused> {
    let count = r.redrive_count();
    if count >= max_redrives {
        return Err(Refused::TooOften(count));
    }
    let topic = r.header(dh::RAW_TOPIC).ok_or(Refused::NoRawTopic)?;
    Ok((topic.to_string(), count + 1))
}

/// The raw topic offset this DLQ record was redriven to, if it was.
pub async fn redriven(
    pool: &sqlx::PgPool,
    dlq_topic: &str,
    r: &DlqRecord,
) -> anyhow::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT raw_offset FROM dlq_redrives WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
    )
    .bind(dlq_topic)
    .bind(r.partition)
    .bind(r.offset)
    .fetch_optional(pool)
    .await
    .map_err(|e| anyhow::anyhow!("reading dlq_redrives (did `helios migrate` run?): {e}"))
}

/// Sends `r` back to `raw_topic` as redrive number `count` and records it (with the heal run
/// that chose it, if one did). Returns where it landed.
pub async fn send(
    producer: &FutureProducer,
    pool: &sqlx::PgPool,
    dlq_topic: &str,
    r: &DlqRecord,
    (raw_topic, count): (&str, u32),
    heal_run: Option<i64>,
) -> anyhow::Result<(i32, i64)> {
    let original = r.header(REDRIVE_OF).map(str::to_string).unwrap_or_else(|| {
        format!(
            "{raw_topic}/{}/{}",
            r.header(dh::RAW_PARTITION).unwrap_or("0"),
            r.header(dh::RAW_OFFSET).unwrap_or("0")
        )
    });
    let count_s = count.to_string();
    let now = Utc::now().to_rfc3339();
    let mut h = OwnedHeaders::new();
    for (k, v) in &r.headers {
        if !k.starts_with(dh::PREFIX) && k != REDRIVE_COUNT && k != REDRIVE_OF && k != REDRIVEN_AT {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
    }
    h = h
        .insert(Header {
            key: REDRIVE_COUNT,
            value: Some(count_s.as_str()),
        })
        .insert(Header {
            key: REDRIVE_OF,
            value: Some(original.as_str()),
        })
        .insert(Header {
            key: REDRIVEN_AT,
            value: Some(now.as_str()),
        });
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(raw_topic)
        .payload(r.value.as_slice())
        .headers(h);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    let (p, o) = producer
        .send(rec, Duration::from_secs(30))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| {
            anyhow::anyhow!(
                "sending {}:{} back to {raw_topic}: {e}",
                r.partition,
                r.offset
            )
        })?;
    sqlx::query(
        "INSERT INTO dlq_redrives (dlq_topic, dlq_partition, dlq_offset, raw_topic, raw_partition, raw_offset, redrive_count, reason, heal_run)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE SET raw_topic = EXCLUDED.raw_topic,
           raw_partition = EXCLUDED.raw_partition, raw_offset = EXCLUDED.raw_offset,
           redrive_count = EXCLUDED.redrive_count, redriven_at = now(), heal_run = EXCLUDED.heal_run",
    )
    .bind(dlq_topic)
    .bind(r.partition)
    .bind(r.offset)
    .bind(raw_topic)
    .bind(p)
    .bind(o)
    .bind(count as i32)
    .bind(r.header(dh::REASON))
    .bind(heal_run)
    .execute(pool)
    .await?;
    Ok((p, o))
}

/// `helios dlq redrive`.
pub async fn run(
    kafka: &KafkaArgs,
    filter: &DlqFilter,
    opts: Options,
    database_url: &str,
    db_schema: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if filter.reasons.is_empty()
        && filter.sources.is_empty()
        && filter.records.is_empty()
        && filter.since.is_none()
    {
        anyhow::bail!("choose what to redrive: --reason, --source, --since or --record PARTITION:OFFSET (redriving everything blindly is rarely what you want)");
    }
    let (topology, settings, recs) = load(kafka, filter).await?;
    let pool = crate::db::connect(database_url, db_schema).await?;
    let dlq_topic = topology.dlq_topic();
    let producer: FutureProducer = settings.durable_producer_config()?.create()?;
    let (mut sent, mut refused, mut already) = (0, 0, 0);
    for r in &recs {
        if redriven(&pool, &dlq_topic, r).await?.is_some() && !opts.force {
            already += 1;
            continue;
        }
        let (raw_topic, count) = match target(r, opts.max_redrives) {
            Ok(t) => t,
            Err(why) => {
                refused += 1;
                let hint = match why {
                    Refused::TooOften(_) => format!(" (--max-redrives {})", opts.max_redrives),
                    Refused::NoRawTopic => String::new(),
                };
                println!("  {}:{} refused: {why}{hint}", r.partition, r.offset);
                continue;
            }
        };
        if opts.dry_run {
            println!(
                "  {}:{} would go back to {raw_topic} (redrive {count})",
                r.partition, r.offset
            );
            sent += 1;
            continue;
        }
        let (p, o) = send(
            &producer,
            &pool,
            &dlq_topic,
            r,
            (raw_topic.as_str(), count),
            None,
        )
        .await?;
        println!(
            "  {}:{} -> {raw_topic}:{p}:{o} (redrive {count})",
            r.partition, r.offset
        );
        sent += 1;
    }
    println!(
        "{} {sent}, refused {refused} (redrive limit), skipped {already} already redriven (use --force to send again)",
        if opts.dry_run { "would redrive" } else { "redriven" }
    );
    Ok(ExitCode::SUCCESS)
}
