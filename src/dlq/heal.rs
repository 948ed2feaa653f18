//! `helios dlq heal`: the dead-letter queue drains itself when the cause of a record is gone.
//!
//! Each DLQ record not yet sent back is looked at once per run. Its reason decides first: a reason
//! no deploy can cure ([`DlqReason::curable_by_deploy`]: the bytes are not JSON, have no id, are
//! too large, …) is never retried; a reason set to `manual` in topology.yaml (`dlq.heal`) waits
//! for a person. For the rest, the original raw record is planned again, in memory and without
//! side effects, exactly as the processor would plan it now ([`crate::pipeline::plan::prepare`]:
//! normalization, the rules, the schemas, the unknown-type policy against the broker's topics,
//! the size guards). Only a record whose every event now passes is sent back, through the same
//! redrive as `helios dlq redrive` (derived ids kept, dedup marks taken over, one row in
//! `dlq_redrives`, so it is healed once). Every run leaves an audit row (`dlq_heal_runs`), sends at
//! most `--limit` records at most `--rate` a second, and with `--every` runs again on a schedule,
//! serving `/metrics` (`helios_dlq_healed_total{reason}`, `helios_dlq_waiting{reason}`,
//! `helios_dlq_waiting_oldest_seconds{reason}`).
//!
//! The check reads the topology file and the schemas this command is given: run it with the same
//! files as the processors. A record sent back before the processors were restarted on the new
//! file fails again, comes back to the DLQ with its redrive count raised, and is healed by a later
//! run (up to `--max-redrives`).

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::producer::FutureProducer;

use super::redrive::{self, Refused};
use super::DlqRecord;
use crate::config::KafkaArgs;
use crate::model::headers::dlq as dh;
use crate::model::{DlqReason, RawRecord};
use crate::pipeline::plan::{prepare, PlanContext};
use crate::pipeline::schema::SchemaSet;
use crate::pipeline::validate::Validator;
use crate::topology::{HealPolicy, Topology};

#[derive(Debug, clap::Args)]
pub struct HealArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Only this reason (repeatable; default: every reason).
    #[arg(long = "reason")]
    pub reasons: Vec<String>,
    /// Check and say what would be sent back and why; send nothing (the run is still audited).
    #[arg(long)]
    pub dry_run: bool,
    /// At most this many records sent back per run.
    #[arg(long, env = "HELIOS_DLQ_HEAL_LIMIT", default_value_t = 1000)]
    pub limit: usize,
    /// At most this many records sent back per second.
    #[arg(long, env = "HELIOS_DLQ_HEAL_RATE", default_value_t = 100)]
    pub rate: u32,
    /// Records already redriven this many times are left alone.
    #[arg(long, default_value_t = 3)]
    pub max_redrives: u32,
    /// Run again every DURATION (e.g. 5m) until stopped, serving /metrics: the self-healing
    /// service. Without it: one run.
    #[arg(long, env = "HELIOS_DLQ_HEAL_EVERY")]
    pub every: Option<String>,
    /// Where the service serves /metrics (with --every).
    #[arg(
        long,
        env = "HELIOS_DLQ_HEAL_METRICS_ADDR",
        default_value = "0.0.0.0:9103"
    )]
    pub metrics_addr: String,
    /// PostgreSQL URL (`dlq_redrives`, `dlq_heal_runs`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema of HELIOS's tables.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// The schema registry: events that say which schema version they were written with are
    /// checked against that version, as the processor does.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
}

/// What a run decided for one DLQ record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its cause is gone: sent back (or would be, in a dry run).
    Heal,
    /// Planned again, it still fails: the reason and detail it would fail with now.
    StillFailing(String),
    /// `manual` in topology.yaml: left for `helios dlq redrive`.
    Manual,
    /// A reason no deploy can cure (or no reason header at all).
    Never,
    /// Redriven too often already, or not a record HELIOS dead-lettered.
    Refused(String),
}

/// The raw record a DLQ record was made from: its bytes, headers and position.
pub fn raw_of(r: &DlqRecord) -> RawRecord {
    let num = |h: &str| r.header(h).and_then(|v| v.parse().ok());
    RawRecord {
        topic: r.header(dh::RAW_TOPIC).unwrap_or_default().to_string(),
        partition: num(dh::RAW_PARTITION).unwrap_or(0) as i32,
        offset: num(dh::RAW_OFFSET).unwrap_or(0),
        timestamp_ms: None,
        key: r.key.clone(),
        value: r.value.clone(),
        headers: r
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(dh::PREFIX))
            .cloned()
            .collect(),
    }
}

/// What the checks read: the topology, its rules and schemas, the broker's topics.
pub struct Checker {
    pub topology: Topology,
    validator: Validator,
    topics: HashSet<String>,
    limits: crate::limits::SizeLimits,
}

impl Checker {
    pub fn new(
        topology: Topology,
        schemas: SchemaSet,
        topics: HashSet<String>,
        limits: crate::limits::SizeLimits,
    ) -> Self {
        Checker {
            validator: Validator::with_schemas(&topology, schemas),
            topology,
            topics,
            limits,
        }
    }

    /// What planning reads: the current topology, rules and schemas, the broker's topics.
    fn plan_context(&self) -> PlanContext<'_> {
        PlanContext {
            validator: &self.validator,
            existing_topics: &self.topics,
            topology: &self.topology,
            replay: None,
            limits: &self.limits,
            avro: false,
        }
    }

    /// Fetches the writer's schema versions these records' events say they were written with
    /// (with a registry), so that [`Self::verdict`] can decide them.
    pub async fn prefetch(&self, records: &[DlqRecord]) -> anyhow::Result<()> {
        let Some(writers) = self.validator.writer_schemas() else {
            return Ok(());
        };
        let ctx = self.plan_context();
        let raws: Vec<RawRecord> = records.iter().map(raw_of).collect();
        let needs: Vec<(String, u32)> = prepare(&raws, &ctx).writer_schemas.into_iter().collect();
        writers
            .fetch(&needs)
            .await
            .map_err(|e| anyhow::anyhow!("fetching writer's schemas: {e}"))
    }

    /// The verdict on one record (not yet redriven), without side effects.
    pub fn verdict(&self, r: &DlqRecord, max_redrives: u32) -> Verdict {
        let Some(reason) = r.header(dh::REASON).and_then(DlqReason::parse) else {
            return Verdict::Never;
        };
        match self.topology.heal_policy(reason) {
            None => return Verdict::Never,
            Some(HealPolicy::Manual) => return Verdict::Manual,
            Some(HealPolicy::Auto) => {}
        }
        if let Err(why) = redrive::target(r, max_redrives) {
            return Verdict::Refused(why.to_string());
        }
        let raw = raw_of(r);
        let ctx = self.plan_context();
        let plan = prepare(std::slice::from_ref(&raw), &ctx);
        if !plan.is_complete() {
            return Verdict::StillFailing(format!(
                "waiting for writer's schemas {:?} from the registry",
                plan.writer_schemas
            ));
        }
        if let Some(d) = plan.dlq.first() {
            return Verdict::StillFailing(format!(
                "{}: {}",
                d.refusal.reason.as_str(),
                crate::model::text::bounded(&d.refusal.detail, 200)
            ));
        }
        if plan.events.is_empty() && plan.held_in_batch.is_empty() {
            return Verdict::StillFailing("no event in the record".into());
        }
        Verdict::Heal
    }
}

/// Counts of one reason in one run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReasonCounts {
    /// Not sent back before this run.
    pub waiting: u64,
    pub healed: u64,
    pub still_failing: u64,
    pub manual: u64,
    pub never: u64,
    pub refused: u64,
    /// Healable, left for the next run by `--limit`.
    pub deferred: u64,
    #[serde(skip)]
    pub oldest: Option<DateTime<Utc>>,
}

/// What one run did.
#[derive(Debug, Default)]
pub struct RunReport {
    pub id: i64,
    pub examined: u64,
    pub by_reason: BTreeMap<String, ReasonCounts>,
    /// (DLQ partition, offset, verdict), in DLQ order.
    pub decisions: Vec<(i32, i64, Verdict)>,
}

impl RunReport {
    pub fn healed(&self) -> u64 {
        self.by_reason.values().map(|c| c.healed).sum()
    }
    fn still_failing(&self) -> u64 {
        self.by_reason.values().map(|c| c.still_failing).sum()
    }
}

/// Zeroes every series of the service, so dashboards and alerts see them before the first heal.
fn zero_series() {
    for r in DlqReason::ALL {
        metrics::counter!("helios_dlq_healed_total", "reason" => r.as_str()).increment(0);
        metrics::gauge!("helios_dlq_waiting", "reason" => r.as_str()).set(0.0);
        metrics::gauge!("helios_dlq_waiting_oldest_seconds", "reason" => r.as_str()).set(0.0);
    }
    for o in ["ok", "failed"] {
        metrics::counter!("helios_dlq_heal_runs_total", "outcome" => o).increment(0);
    }
}

/// One run: read the DLQ, decide, send back what passes (unless a dry run), audit. Runs of one
/// schema take turns (a PostgreSQL advisory lock): two at once could both send a record back
/// before either recorded it.
pub async fn run_once(args: &HealArgs, pool: &sqlx::PgPool) -> anyhow::Result<RunReport> {
    let mut lock = pool.acquire().await?;
    let got: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('helios dlq heal'), hashtext(current_schema()))",
    )
    .fetch_one(&mut *lock)
    .await?;
    if !got {
        anyhow::bail!(
            "another `helios dlq heal` run is going on (it holds the lock); this run is skipped"
        );
    }
    let result = locked_run(args, pool).await;
    let unlocked = sqlx::query(
        "SELECT pg_advisory_unlock(hashtext('helios dlq heal'), hashtext(current_schema()))",
    )
    .execute(&mut *lock)
    .await;
    if unlocked.is_err() {
        // Never back in the pool still holding the lock.
        let _ = lock.close().await;
    }
    result
}

async fn locked_run(args: &HealArgs, pool: &sqlx::PgPool) -> anyhow::Result<RunReport> {
    let (topology, settings) = args.kafka.resolve()?;
    let limits = args.kafka.limits()?;
    let mut schemas = SchemaSet::load(&topology)?;
    if let Some(url) = args
        .schema_registry_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        let registry = crate::pipeline::schema::registry::Registry::new(url)?;
        schemas = schemas.with_writers(crate::pipeline::schema::WriterSchemas::new(registry));
    }
    let s = settings.clone();
    let topics: HashSet<String> = tokio::task::spawn_blocking(move || {
        crate::kafka::existing_topics(&s, Duration::from_secs(15))
    })
    .await??
    .into_keys()
    .collect();
    let dlq_topic = topology.dlq_topic();
    let s = settings.clone();
    let t = dlq_topic.clone();
    let all = tokio::task::spawn_blocking(move || super::read_dlq(&s, &t)).await??;
    let done: HashSet<(i32, i64)> = sqlx::query_as::<_, (i32, i64)>(
        "SELECT dlq_partition, dlq_offset FROM dlq_redrives WHERE dlq_topic = $1",
    )
    .bind(&dlq_topic)
    .fetch_all(pool)
    .await
    .map_err(|e| anyhow::anyhow!("reading dlq_redrives (did `helios migrate` run?): {e}"))?
    .into_iter()
    .collect();
    let id: i64 =
        sqlx::query_scalar("INSERT INTO dlq_heal_runs (dry_run) VALUES ($1) RETURNING id")
            .bind(args.dry_run)
            .fetch_one(pool)
            .await
            .map_err(|e| {
                anyhow::anyhow!("writing dlq_heal_runs (did `helios migrate` run?): {e}")
            })?;
    let mut report = RunReport {
        id,
        ..Default::default()
    };
    let checker = Checker::new(topology, schemas, topics, limits);
    let pending: Vec<DlqRecord> = all
        .iter()
        .filter(|r| !done.contains(&(r.partition, r.offset)))
        .cloned()
        .collect();
    let result = match checker.prefetch(&pending).await {
        Ok(()) => heal_records(args, pool, &settings, &checker, &all, &done, &mut report).await,
        Err(e) => Err(e),
    };
    let by_reason = serde_json::to_value(&report.by_reason)?;
    let outcome = match &result {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("failed: {e}"),
    };
    sqlx::query(
        "UPDATE dlq_heal_runs SET finished_at = now(), outcome = $2, examined = $3, healed = $4,
           still_failing = $5, by_reason = $6 WHERE id = $1",
    )
    .bind(id)
    .bind(&outcome)
    .bind(report.examined as i32)
    .bind(report.healed() as i32)
    .bind(report.still_failing() as i32)
    .bind(by_reason)
    .execute(pool)
    .await?;
    metrics::counter!("helios_dlq_heal_runs_total", "outcome" => if result.is_ok() { "ok" } else { "failed" })
        .increment(1);
    result.map(|()| report)
}

async fn heal_records(
    args: &HealArgs,
    pool: &sqlx::PgPool,
    settings: &crate::config::KafkaSettings,
    checker: &Checker,
    all: &[DlqRecord],
    done: &HashSet<(i32, i64)>,
    report: &mut RunReport,
) -> anyhow::Result<()> {
    let dlq_topic = checker.topology.dlq_topic();
    let producer: Option<FutureProducer> = if args.dry_run {
        None
    } else {
        Some(settings.durable_producer_config()?.create()?)
    };
    let started = Instant::now();
    let rate = f64::from(args.rate.max(1));
    let mut sent = 0usize;
    let run_id = report.id;
    for r in all {
        if done.contains(&(r.partition, r.offset)) {
            continue;
        }
        let reason = r.header(dh::REASON).unwrap_or("-").to_string();
        if !args.reasons.is_empty() && !args.reasons.contains(&reason) {
            continue;
        }
        report.examined += 1;
        let c = report.by_reason.entry(reason.clone()).or_default();
        c.waiting += 1;
        let failed_at = r
            .header(dh::FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        if let Some(t) = failed_at {
            c.oldest = Some(c.oldest.map_or(t, |o| o.min(t)));
        }
        let verdict = checker.verdict(r, args.max_redrives);
        match &verdict {
            Verdict::Heal if sent >= args.limit => {
                c.deferred += 1;
                continue;
            }
            Verdict::Heal => {
                if let Some(producer) = &producer {
                    // At most `rate` a second.
                    let due = started + Duration::from_secs_f64(sent as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let (topic, count) = redrive::target(r, args.max_redrives)
                        .map_err(|e: Refused| anyhow::anyhow!("{e}"))?;
                    redrive::send(
                        producer,
                        pool,
                        &dlq_topic,
                        r,
                        (topic.as_str(), count),
                        Some(run_id),
                    )
                    .await?;
                    metrics::counter!("helios_dlq_healed_total", "reason" => reason.clone())
                        .increment(1);
                }
                sent += 1;
                let c = report.by_reason.entry(reason.clone()).or_default();
                c.healed += 1;
                if !args.dry_run {
                    c.waiting -= 1;
                }
            }
            Verdict::StillFailing(_) => c.still_failing += 1,
            Verdict::Manual => c.manual += 1,
            Verdict::Never => c.never += 1,
            Verdict::Refused(_) => c.refused += 1,
        }
        report.decisions.push((r.partition, r.offset, verdict));
    }
    Ok(())
}

/// The gauges of what is still waiting, per reason, after a run.
fn export_waiting(report: &RunReport) {
    let now = Utc::now();
    for r in DlqReason::ALL {
        let c = report.by_reason.get(r.as_str());
        // In a dry run nothing left; what would heal is still waiting.
        let waiting = c.map_or(0, |c| c.waiting);
        metrics::gauge!("helios_dlq_waiting", "reason" => r.as_str()).set(waiting as f64);
        let age = c
            .and_then(|c| c.oldest)
            .filter(|_| waiting > 0)
            .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
        metrics::gauge!("helios_dlq_waiting_oldest_seconds", "reason" => r.as_str()).set(age);
    }
}

fn print(report: &RunReport, args: &HealArgs) {
    const SHOWN: usize = 50;
    for (p, o, v) in report.decisions.iter().take(SHOWN) {
        let what = match v {
            Verdict::Heal if args.dry_run => "would heal: its cause is gone".to_string(),
            Verdict::Heal => "healed: sent back to its raw topic".to_string(),
            Verdict::StillFailing(why) => format!("still fails ({why})"),
            Verdict::Manual => "manual (dlq.heal in topology.yaml): helios dlq redrive".into(),
            Verdict::Never => "never healed: no deploy cures this reason".into(),
            Verdict::Refused(why) => format!("left alone: {why}"),
        };
        println!("  {p}:{o}  {what}");
    }
    if report.decisions.len() > SHOWN {
        println!("  … and {} more", report.decisions.len() - SHOWN);
    }
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "reason",
        if args.dry_run { "would" } else { "healed" },
        "failing",
        "manual",
        "never",
        "refused",
        "deferred"
    );
    for (reason, c) in &report.by_reason {
        println!(
            "{reason:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            c.healed, c.still_failing, c.manual, c.never, c.refused, c.deferred
        );
    }
    println!(
        "heal run {}: examined {}, {} {}, still failing {}{}",
        report.id,
        report.examined,
        if args.dry_run { "would heal" } else { "healed" },
        report.healed(),
        report.still_failing(),
        if args.dry_run {
            " (dry run: nothing sent)"
        } else {
            ""
        }
    );
}

/// `helios dlq heal`.
pub async fn run(args: HealArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect(&args.database_url, args.db_schema.as_deref()).await?;
    let Some(every) = &args.every else {
        let report = run_once(&args, &pool).await?;
        print(&report, &args);
        return Ok(ExitCode::SUCCESS);
    };
    let every = crate::topology::flows::parse_duration(every)
        .map_err(|p| anyhow::anyhow!("HELIOS_DLQ_HEAL_EVERY / --every `{every}`: {p}"))?;
    if every.is_zero() {
        anyhow::bail!("HELIOS_DLQ_HEAL_EVERY / --every must be more than 0");
    }
    let shutdown = crate::shutdown::Shutdown::on_signals();
    let addr = crate::pipeline::serve_metrics(&args.metrics_addr, shutdown.clone()).await?;
    zero_series();
    tracing::info!(metrics = %addr, every = ?every, dry_run = args.dry_run, "dlq heal service started");
    loop {
        match run_once(&args, &pool).await {
            Ok(report) => {
                export_waiting(&report);
                tracing::info!(
                    run = report.id,
                    examined = report.examined,
                    healed = report.healed(),
                    still_failing = report.still_failing(),
                    "dlq heal run"
                );
            }
            Err(e) => tracing::warn!(error = %e, "dlq heal run failed; trying again at the next"),
        }
        let wait = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wait.wait() => break,
        }
    }
    tracing::info!("dlq heal service stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::headers::raw as rh;

    /// A DLQ record of a direct-ingest body, dead-lettered for `reason`.
    fn dlq(body: &str, reason: &str, redrives: Option<&str>) -> DlqRecord {
        let mut headers: Vec<(String, Vec<u8>)> = [
            (rh::SOURCE, "direct"),
            (rh::ENDPOINT, "ingest"),
            (rh::KIND, "event"),
            (rh::RECEIVED_AT, "2026-12-03T10:00:00.000Z"),
            (dh::REASON, reason),
            (dh::RAW_TOPIC, "helios.raw.direct"),
            (dh::RAW_PARTITION, "0"),
            (dh::RAW_OFFSET, "7"),
            (dh::FAILED_AT, "2026-12-03T10:00:01Z"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        if let Some(n) = redrives {
            headers.push((
                crate::model::headers::REDRIVE_COUNT.into(),
                n.as_bytes().to_vec(),
            ));
        }
        DlqRecord {
            partition: 0,
            offset: 3,
            key: None,
            value: body.as_bytes().to_vec(),
            headers,
        }
    }

    fn checker(t: &Topology) -> Checker {
        Checker::new(
            t.clone(),
            SchemaSet::default(),
            HashSet::new(),
            crate::limits::SizeLimits::default(),
        )
    }

    const REFUND: &str =
        r#"{"event_type": "RefundIssued", "event_id": "r-1", "data": {"order_id": "O-1"}}"#;

    #[test]
    fn an_unknown_type_heals_once_declared_and_not_before() {
        let mut t = Topology::builtin();
        t.unknown_event_types = crate::topology::UnknownEventTypePolicy::Dlq;
        let r = dlq(REFUND, "unknown_event_type", None);
        assert!(matches!(
            checker(&t).verdict(&r, 3),
            Verdict::StillFailing(why) if why.starts_with("unknown_event_type")
        ));
        t.event_types.insert(
            "RefundIssued".into(),
            serde_norway::from_str("required: [order_id]").unwrap(),
        );
        assert_eq!(checker(&t).verdict(&r, 3), Verdict::Heal);
        // A rule it does not meet: still failing, now for that.
        t.event_types.insert(
            "RefundIssued".into(),
            serde_norway::from_str("required: [order_id, amount]").unwrap(),
        );
        assert!(matches!(
            checker(&t).verdict(&r, 3),
            Verdict::StillFailing(why) if why.starts_with("missing_required_field")
        ));
    }

    #[test]
    fn what_no_deploy_cures_is_never_tried_and_manual_waits() {
        let t = Topology::builtin();
        let c = checker(&t);
        assert_eq!(
            c.verdict(&dlq("{not json", "invalid_json", None), 3),
            Verdict::Never
        );
        assert_eq!(
            c.verdict(&dlq(REFUND, "too_large", None), 3),
            Verdict::Never
        );
        assert_eq!(
            c.verdict(&dlq(REFUND, "sink_rejected", None), 3),
            Verdict::Never
        );
        let mut manual = t.clone();
        manual
            .dlq
            .heal
            .insert("unknown_event_type".into(), HealPolicy::Manual);
        assert_eq!(
            checker(&manual).verdict(&dlq(REFUND, "unknown_event_type", None), 3),
            Verdict::Manual
        );
        // Redriven three times already: left alone whatever the check would say.
        assert!(matches!(
            c.verdict(&dlq(REFUND, "unknown_event_type", Some("3")), 3),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn the_raw_record_is_rebuilt_without_the_dlq_headers() {
        let raw = raw_of(&dlq(REFUND, "unknown_event_type", None));
        assert_eq!(
            (raw.topic.as_str(), raw.partition, raw.offset),
            ("helios.raw.direct", 0, 7)
        );
        assert!(raw.headers.iter().all(|(k, _)| !k.starts_with(dh::PREFIX)));
        assert_eq!(raw.header(rh::SOURCE), Some("direct"));
    }
}
