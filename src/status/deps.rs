//! What `helios status` asks the dependencies: PostgreSQL (health, recent events, replays),
//! Redis, the schema registry, and the processors' circuit breakers (their `/metrics`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{ms, BreakerStatus, Dependency, ReplayRow, StatusArgs};
use crate::model::text::bounded;

/// A `replay_history` row as read.
type ReplayTuple = (String, DateTime<Utc>, Option<DateTime<Utc>>, String, String);

/// PostgreSQL: health, events of the last hour by type, the last replays.
/// `pool` is kept across the looks of `--watch` (opened on the first, dropped after a failure).
pub(super) async fn postgres(
    args: &StatusArgs,
    pool: &mut Option<sqlx::PgPool>,
) -> (Dependency, BTreeMap<String, i64>, Vec<ReplayRow>) {
    let t0 = Instant::now();
    let result = async {
        if pool.is_none() {
            *pool =
                Some(crate::db::connect(&args.database_url, args.db_schema.as_deref()).await?);
        }
        let pool = pool.as_ref().expect("connected above");
        // The round trip of a query, not the connection set-up.
        let t1 = Instant::now();
        sqlx::query("SELECT 1").execute(pool).await?;
        let latency = t1.elapsed();
        let by_type: Vec<(String, i64)> = sqlx::query_as(
            "SELECT event_type, count(*) FROM events WHERE occurred_at > now() - interval '1 hour' GROUP BY event_type ORDER BY event_type LIMIT 200",
        )
        .fetch_all(pool)
        .await?;
        let replays: Vec<ReplayTuple> = sqlx::query_as(
                "SELECT replay_id, started_at, finished_at, outcome, dedup_policy FROM replay_history ORDER BY started_at DESC LIMIT 5",
            )
            .fetch_all(pool)
            .await?;
        anyhow::Ok((latency, by_type, replays))
    }
    .await;
    if result.is_err() {
        *pool = None;
    }
    match result {
        Ok((latency, by_type, replays)) => (
            Dependency {
                name: "postgresql",
                healthy: true,
                latency_ms: ms(latency),
                error: None,
            },
            by_type.into_iter().collect(),
            replays
                .into_iter()
                .map(
                    |(replay_id, started_at, finished_at, outcome, dedup_policy)| ReplayRow {
                        replay_id,
                        started_at,
                        finished_at,
                        outcome,
                        dedup_policy,
                    },
                )
                .collect(),
        ),
        Err(e) => (
            Dependency {
                name: "postgresql",
                healthy: false,
                latency_ms: ms(t0.elapsed()),
                error: Some(bounded(&format!("{e:#}"), 300).into_owned()),
            },
            BTreeMap::new(),
            vec![],
        ),
    }
}

pub(super) async fn redis(url: &str) -> Dependency {
    let t0 = Instant::now();
    let result = async {
        // One server or a cluster, as the processor reads REDIS_URL.
        let c = tokio::time::timeout(
            Duration::from_secs(3),
            crate::pipeline::dedup::RedisDedup::connect(url, "", Duration::from_secs(1)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 3 s"))??;
        tokio::time::timeout(Duration::from_secs(3), c.ping())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 3 s"))??;
        anyhow::Ok(())
    }
    .await;
    Dependency {
        name: "redis",
        healthy: result.is_ok(),
        latency_ms: ms(t0.elapsed()),
        error: result
            .err()
            .map(|e| bounded(&format!("{e:#}"), 300).into_owned()),
    }
}

pub(super) async fn schema_registry(url: &str) -> Dependency {
    let t0 = Instant::now();
    let result = async {
        let r = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?
            .get(format!("{}/subjects", url.trim_end_matches('/')))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "GET /subjects answered {}",
            r.status()
        );
        anyhow::Ok(())
    }
    .await;
    Dependency {
        name: "schema_registry",
        healthy: result.is_ok(),
        latency_ms: ms(t0.elapsed()),
        error: result
            .err()
            .map(|e| bounded(&format!("{e:#}"), 300).into_owned()),
    }
}

/// Each processor's breakers, read from its `/metrics` (`helios_breaker_state{dependency}`:
/// 0 closed, 1 half-open, 2 open).
pub(super) async fn breakers(endpoints: &[String]) -> Vec<BreakerStatus> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap_or_default();
    let mut out = vec![];
    for e in endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let url = if e.starts_with("http://") || e.starts_with("https://") {
            format!("{}/metrics", e.trim_end_matches('/'))
        } else {
            format!("http://{e}/metrics")
        };
        let text = match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        let Some(text) = text else {
            out.push(BreakerStatus {
                processor: e.to_string(),
                dependency: "-".into(),
                state: "unreachable".into(),
            });
            continue;
        };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("helios_breaker_state{") else {
                continue;
            };
            let (labels, value) = rest.split_once("} ").unwrap_or_default();
            let dependency = labels
                .split(',')
                .find_map(|l| l.strip_prefix("dependency=\""))
                .map(|d| d.trim_end_matches('"').to_string())
                .unwrap_or_default();
            let state = match value.trim().parse::<f64>().unwrap_or(-1.0) as i64 {
                0 => "closed",
                1 => "half_open",
                2 => "open",
                _ => "unknown",
            };
            out.push(BreakerStatus {
                processor: e.to_string(),
                dependency,
                state: state.into(),
            });
        }
    }
    out
}
