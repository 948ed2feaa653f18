//! `helios replay`: re-process a range of raw topics through the processor's own pipeline
//! (`Processor::for_replay`: same normalization, dedup, validation and sinks), with its own
//! assigned consumer so live processing goes on. Every run leaves one `replay_history` row.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::Consumer;

use crate::config::{KafkaArgs, KafkaSettings};
use crate::pipeline::dedup::RedisDedup;
use crate::pipeline::plan::{DedupPolicy, ReplaySpec};
use crate::pipeline::processor::{Processor, ProcessorConfig};
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::topology::Topology;

/// `helios replay` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Raw topics to replay: a source (aws, gcp, azure, direct) or a raw topic name (repeatable;
    /// default: all four).
    #[arg(long = "topic", value_name = "SOURCE|TOPIC")]
    pub topics: Vec<String>,
    /// Start of the time range (RFC 3339, inclusive), by the raw records' Kafka timestamps.
    #[arg(long)]
    pub from: Option<String>,
    /// End of the time range (RFC 3339, exclusive); default: now.
    #[arg(long)]
    pub to: Option<String>,
    /// Explicit range instead of times: TOPIC:PARTITION:START-END (END exclusive; repeatable).
    #[arg(long = "offsets", value_name = "TOPIC:PARTITION:START-END")]
    pub offsets: Vec<String>,
    /// Only events from these sources (repeatable).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Only events of these types (repeatable).
    #[arg(long = "event-type")]
    pub event_types: Vec<String>,
    /// respect: skip events already processed (counted as duplicates); bypass: process again,
    /// replacing rows and re-emitting fan-out records marked with helios-replay-id.
    #[arg(long, value_enum, default_value_t = DedupPolicy::Respect)]
    pub dedup: DedupPolicy,
    /// Report what would happen without writing anything (no rows, records or dedup marks).
    #[arg(long)]
    pub dry_run: bool,
    /// Cap the replay at this many raw records per second.
    #[arg(long)]
    pub max_rate: Option<u64>,
    /// Who asked (recorded in replay_history); default: $USER.
    #[arg(long)]
    pub requested_by: Option<String>,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema of HELIOS's tables.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Redis URL for dedup marks.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of dedup keys in Redis.
    #[arg(long, env = "HELIOS_DEDUP_PREFIX", default_value = "helios:dedup:")]
    pub dedup_prefix: String,
    /// How long a dedup mark lives.
    #[arg(long, env = "HELIOS_DEDUP_TTL_SECS", default_value_t = 86_400)]
    pub dedup_ttl_secs: u64,
}

/// (topic, partition, start, end-exclusive)
pub type Range = (String, i32, i64, i64);

fn resolve_topic(t: &Topology, name: &str) -> anyhow::Result<String> {
    if let Some(s) = Source::parse(name) {
        return Ok(t.raw_topic(s));
    }
    let raws: Vec<String> = Source::ALL.iter().map(|s| t.raw_topic(*s)).collect();
    if raws.iter().any(|r| r == name) {
        return Ok(name.to_string());
    }
    anyhow::bail!(
        "unknown topic `{name}`: write a source (aws, gcp, azure, direct) or one of the raw topics {}",
        raws.join(", ")
    )
}

fn parse_time(flag: &str, v: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            anyhow::anyhow!(
                "{flag} `{v}` is not an RFC 3339 time ({e}); write e.g. 2026-11-22T09:00:00Z"
            )
        })
}

fn parse_offsets(t: &Topology, spec: &str) -> anyhow::Result<Range> {
    let bad = || {
        anyhow::anyhow!("--offsets `{spec}`: write TOPIC:PARTITION:START-END, e.g. aws:0:100-200 (END exclusive)")
    };
    let mut parts = spec.rsplitn(3, ':');
    let range = parts.next().ok_or_else(bad)?;
    let partition: i32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let topic = resolve_topic(t, parts.next().ok_or_else(bad)?)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (start, end): (i64, i64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if end <= start || start < 0 {
        anyhow::bail!(
            "--offsets `{spec}`: the range {start}-{end} is empty; END must be greater than START"
        );
    }
    Ok((topic, partition, start, end))
}

/// Resolves a time range into per-partition offset ranges, with the broker's offsets-for-times.
/// A time after the last record means "the end" (some brokers answer offset 0 there: checked
/// against the last record's timestamp).
pub fn resolve_times(
    settings: &KafkaSettings,
    topics: &[String],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Vec<Range>> {
    let c = crate::kafka::reader(settings, "replay-resolve")?;
    let timeout = Duration::from_secs(15);
    let mut out = vec![];
    for topic in topics {
        let md = c.fetch_metadata(Some(topic), timeout)?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            anyhow::bail!(
                "topic `{topic}` does not exist on {}",
                settings.bootstrap_servers
            );
        }
        for p in parts {
            let (low, high) = c.fetch_watermarks(topic, p, timeout)?;
            if high <= low {
                continue;
            }
            let at = crate::kafka::offsets_at_times(
                &c,
                topic,
                p,
                (low, high),
                &[from.timestamp_millis(), to.timestamp_millis()],
            )?;
            let (start, end) = (at[0], at[1]);
            if end > start {
                out.push((topic.clone(), p, start, end));
            }
        }
    }
    Ok(out)
}

fn progress_reporter() -> impl FnMut(u64, u64) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_line = Instant::now();
    move |done, total| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let pct = if total > 0 {
            100.0 * done as f64 / total as f64
        } else {
            100.0
        };
        if tty {
            let width = 30;
            let filled = ((pct / 100.0) * width as f64) as usize;
            eprint!(
                "\r[{}{}] {done}/{total} ({pct:.0}%) {rate:.0} rec/s ETA {eta:.0}s   ",
                "#".repeat(filled.min(width)),
                " ".repeat(width - filled.min(width))
            );
            if done >= total {
                eprintln!();
            }
        } else if last_line.elapsed() >= Duration::from_secs(5) || done >= total {
            last_line = Instant::now();
            eprintln!("replay progress: {done}/{total} raw records ({pct:.0}%), {rate:.0} rec/s, ETA {eta:.0}s");
        }
    }
}

/// Runs `helios replay`.
pub async fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (topology, settings) = args.kafka.resolve()?;
    let topics: Vec<String> = if args.topics.is_empty() {
        Source::ALL.iter().map(|s| topology.raw_topic(*s)).collect()
    } else {
        args.topics
            .iter()
            .map(|t| resolve_topic(&topology, t))
            .collect::<anyhow::Result<_>>()?
    };
    let sources: Vec<Source> = args
        .sources
        .iter()
        .map(|s| {
            Source::parse(s)
                .ok_or_else(|| anyhow::anyhow!("--source `{s}`: write aws, gcp, azure or direct"))
        })
        .collect::<anyhow::Result<_>>()?;
    let ranges: Vec<Range> = match (&args.from, &args.to, args.offsets.is_empty()) {
        (None, None, true) => anyhow::bail!(
            "say what to replay: --from/--to (RFC 3339 times) or --offsets TOPIC:PARTITION:START-END"
        ),
        (Some(_), _, false) | (_, Some(_), false) => {
            anyhow::bail!("use either --from/--to or --offsets, not both")
        }
        (None, Some(_), true) => anyhow::bail!("--to needs --from (the start of the range)"),
        (Some(f), to, true) => {
            let from = parse_time("--from", f)?;
            let to = match to {
                Some(t) => parse_time("--to", t)?,
                None => Utc::now(),
            };
            if to < from {
                anyhow::bail!("--to ({to}) is before --from ({from}): swap them");
            }
            if to == from {
                anyhow::bail!("--from and --to are the same instant: the range is empty");
            }
            let s = settings.clone();
            let t = topics.clone();
            tokio::task::spawn_blocking(move || resolve_times(&s, &t, from, to)).await??
        }
        (None, None, false) => args
            .offsets
            .iter()
            .map(|o| parse_offsets(&topology, o))
            .collect::<anyhow::Result<_>>()?,
    };
    let total: i64 = ranges.iter().map(|(_, _, a, b)| b - a).sum();
    if total == 0 {
        anyhow::bail!(
            "the range holds no records in {}: check --from/--to against the data (times are the raw records' Kafka timestamps)",
            topics.join(", ")
        );
    }

    let pool = crate::db::connect(&args.database_url, args.db_schema.as_deref()).await?;
    let store = crate::db::PgStore::new(pool.clone());
    let dedup = RedisDedup::connect(
        &args.redis_url,
        &args.dedup_prefix,
        Duration::from_secs(args.dedup_ttl_secs),
    )
    .await?;
    let replay_id = format!("replay-{}", uuid::Uuid::now_v7());
    let requested_by = args
        .requested_by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let filters = serde_json::json!({"sources": args.sources, "event_types": args.event_types,
        "offsets": args.offsets, "ranges": ranges.iter().map(|(t, p, a, b)| format!("{t}:{p}:{a}-{b}")).collect::<Vec<_>>()});
    let policy = match args.dedup {
        DedupPolicy::Respect => "respect",
        DedupPolicy::Bypass => "bypass",
    };
    sqlx::query(
        "INSERT INTO replay_history (replay_id, requested_by, topics, range_from, range_to, filters, dedup_policy, dry_run)
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)",
    )
    .bind(&replay_id)
    .bind(&requested_by)
    .bind(&topics)
    .bind(&args.from)
    .bind(&args.to)
    .bind(filters.to_string())
    .bind(policy)
    .bind(args.dry_run)
    .execute(&pool)
    .await
    .map_err(|e| anyhow::anyhow!("cannot record the run in replay_history (did `helios migrate` run?): {e}"))?;
    eprintln!(
        "{replay_id}: {} raw records in {} partition range(s) of {}; dedup {policy}{}",
        total,
        ranges.len(),
        topics.join(", "),
        if args.dry_run { ", dry run" } else { "" }
    );

    let spec = ReplaySpec {
        replay_id: replay_id.clone(),
        policy: args.dedup,
        dry_run: args.dry_run,
        sources,
        event_types: args.event_types.clone(),
    };
    let mut cfg = ProcessorConfig::new(settings, topology);
    // With a rate cap, small batches so the pacing is smooth.
    cfg.batch.records = args
        .max_rate
        .map_or(500, |r| (r / 5).clamp(1, 500) as usize);
    cfg.schema_registry_url = std::env::var("SCHEMA_REGISTRY_URL")
        .ok()
        .filter(|s| !s.is_empty());
    cfg.limits = args.kafka.limits()?;
    let runner = Processor::for_replay(cfg, dedup, store, spec)?;
    let stats = runner.stats();
    let result = runner
        .run_replay(
            &ranges,
            Shutdown::on_signals(),
            args.max_rate,
            progress_reporter(),
        )
        .await;
    let by_type = stats.by_type.lock().map(|m| m.clone()).unwrap_or_default();
    let dlq = stats
        .dlq_by_reason
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let (raw, units, out, dups, dlq_n) = stats.snapshot();
    let filtered = stats.filtered.load(Ordering::Relaxed);
    let counts = serde_json::json!({"raw_records": raw, "events_in": units, "events_out": out,
        "duplicates": dups, "dlq": dlq_n, "filtered": filtered, "by_type": by_type, "dlq_by_reason": dlq});
    let (outcome, error, code) = match &result {
        Ok(true) => ("completed", None, ExitCode::SUCCESS),
        Ok(false) => ("interrupted", None, ExitCode::from(130)),
        Err(e) => ("failed", Some(e.to_string()), ExitCode::FAILURE),
    };
    sqlx::query(
        "UPDATE replay_history SET finished_at = now(), counts = $2::jsonb, outcome = $3, error = $4 WHERE replay_id = $1",
    )
    .bind(&replay_id)
    .bind(counts.to_string())
    .bind(outcome)
    .bind(&error)
    .execute(&pool)
    .await?;
    let verb = if args.dry_run { "would be" } else { "were" };
    println!("{replay_id} {outcome}: {raw} raw records, {units} events");
    for (t, n) in &by_type {
        println!("  {t:<24} {n} {verb} processed");
    }
    println!("  duplicates (skipped)     {dups}");
    for (r, n) in &dlq {
        println!("  DLQ {r:<20} {n} {verb} dead-lettered");
    }
    if filtered > 0 {
        println!("  filtered out             {filtered}");
    }
    if let Some(e) = error {
        eprintln!("error: {e}");
    }
    Ok(code)
}
