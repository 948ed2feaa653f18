//! Dedup: a mark per `source:event_id`, kept for a TTL (24 h by default).
//!
//! A mark is *bound to the raw record that set it*: its value is that record's
//! `topic/partition/offset/index`. Meeting a mark therefore tells three cases apart:
//! - none: first sighting (the mark is now ours);
//! - ours: the same raw record processed again after a crash or rebalance before its commit,
//!   so it is processed again, never dropped (guarantee 4: a mark never loses an event);
//! - someone else's: a true duplicate, counted and skipped.
//!
//! Marks are kept only for events that were stored and fanned out: a mark whose event a sink
//! refused is released again (deleted if it is still this record's), so a corrected resend of
//! the same id is processed. Events refused before the store (rules, schemas) never claim one.
//!
//! One implementation talks to Redis (`SET key owner NX GET EX ttl`, pipelined: one round trip
//! per batch), a single server or a Redis Cluster ([`RedisTarget`]; on a cluster a batch is one
//! pipeline per hash bucket, sent at once); the other is in memory with the same semantics, for
//! the embedded demo.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::CanonicalEvent;

/// The key of a dedup mark: `source:event_id` (the event id is bounded before it gets here,
/// see `pipeline::guard`, so keys cannot grow Redis without limit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(pub String);

impl DedupKey {
    /// The key of an event.
    pub fn of(e: &CanonicalEvent) -> Self {
        DedupKey(format!("{}:{}", e.source.as_str(), e.event_id))
    }
}

/// Who set a mark: the raw record position (`topic/partition/offset/index`) that claimed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MarkOwner(pub String);

impl MarkOwner {
    /// The owner an event's raw record claims with.
    pub fn of(e: &CanonicalEvent) -> Self {
        MarkOwner(e.raw.owner())
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No mark existed: this record now owns the event.
    New,
    /// The mark is this record's own (reprocessing).
    Own,
    /// Another raw record owns the event: a duplicate.
    Duplicate { owner: String },
}

/// The dedup store could not answer (the batch is retried, never dropped).
#[derive(Debug, thiserror::Error)]
#[error("dedup store unavailable: {0}")]
pub struct DedupError(pub String);

/// A place to keep dedup marks.
pub trait DedupStore: Send + Sync + 'static {
    /// Claims each `(key, owner)`; answers in the same order. All-or-error: on error nothing
    /// may be assumed about which marks were set (a retry is safe: own marks read as `Own`).
    fn claim(
        &self,
        items: &[(DedupKey, MarkOwner)],
    ) -> impl Future<Output = Result<Vec<Claim>, DedupError>> + Send;

    /// Deletes each mark that `owner` still holds (marks of events a sink refused).
    fn release(
        &self,
        items: &[(DedupKey, MarkOwner)],
    ) -> impl Future<Output = Result<(), DedupError>> + Send;

    /// Reads the owners of `keys` without setting anything (dry runs).
    fn peek(
        &self,
        keys: &[DedupKey],
    ) -> impl Future<Output = Result<Vec<Option<String>>, DedupError>> + Send;
}

fn classify(existing: Option<String>, owner: &MarkOwner) -> Claim {
    match existing {
        None => Claim::New,
        Some(o) if o == owner.0 => Claim::Own,
        Some(o) => Claim::Duplicate { owner: o },
    }
}

/// Where the marks live: one Redis, or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(std::sync::Arc<ClusterConn>),
}

/// A cluster connection that is built again from the seed nodes after a failure.
///
/// The client follows MOVED/ASK, but when a primary dies its connection only tries to reach
/// that node again: nothing rebuilds the slot map until some node answers MOVED, so requests
/// for the dead primary's slots time out even after its replica took over (seen in the
/// failover test). A failed request therefore renews the connection (at most once a second),
/// and the new one reads the slots from whichever seed answers.
struct ClusterConn {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::RwLock<redis::cluster_async::ClusterConnection>,
    renewed: std::sync::Mutex<Instant>,
}

/// How often a failing cluster connection may be built again.
const CLUSTER_RENEW_EVERY: Duration = Duration::from_secs(1);

impl ClusterConn {
    async fn get(&self) -> redis::cluster_async::ClusterConnection {
        self.conn.read().await.clone()
    }

    async fn renew(&self) {
        {
            let mut at = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
            if at.elapsed() < CLUSTER_RENEW_EVERY {
                return;
            }
            *at = Instant::now();
        }
        match self.client.get_async_connection().await {
            Ok(c) => {
                *self.conn.write().await = c;
                metrics::counter!("helios_dedup_cluster_reconnects_total").increment(1);
                tracing::info!("the Redis Cluster connection was built again (slots read anew)");
            }
            Err(e) => {
                tracing::warn!(error = %e, "building the Redis Cluster connection again failed")
            }
        }
    }
}

/// What `REDIS_URL` names: one server, or a cluster's seed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    /// Seed nodes of a Redis Cluster (the client discovers the rest and follows MOVED/ASK).
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// `redis://host:port` is one server. A Redis Cluster is named by its seed nodes, comma
    /// separated (`redis://a:6379,redis://b:6379`), or by one address with the `+cluster` scheme
    /// (`redis+cluster://cfg-endpoint:6379`, `rediss+cluster://...`: an ElastiCache or
    /// Memorystore configuration endpoint).
    pub fn parse(url: &str) -> RedisTarget {
        let parts: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.replacen("redis+cluster://", "redis://", 1).replacen(
                    "rediss+cluster://",
                    "rediss://",
                    1,
                )
            })
            .collect();
        let cluster_scheme = url.trim_start().starts_with("redis+cluster://")
            || url.trim_start().starts_with("rediss+cluster://");
        if parts.len() > 1 || cluster_scheme {
            RedisTarget::Cluster(parts)
        } else {
            RedisTarget::Single(url.trim().to_string())
        }
    }
}

/// Hash buckets of the marks on a Redis Cluster: a mark's key carries its bucket as a hash tag
/// (`prefix{2a}source:id`), so a batch's commands split into at most this many pipelines, one
/// slot each, sent at once. Part of the key format: changing it would orphan the marks.
pub const CLUSTER_BUCKETS: u64 = 256;

fn bucket(key: &str) -> u64 {
    // FNV-1a: stable across versions and machines (the std hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % CLUSTER_BUCKETS
}

/// Redis-backed marks (one server or a cluster).
#[derive(Clone)]
pub struct RedisDedup {
    conn: Conn,
    prefix: String,
    ttl: Duration,
}

fn redis_error(e: redis::RedisError) -> DedupError {
    DedupError(e.to_string())
}

impl RedisDedup {
    /// Connects (retrying in the background when Redis goes away later). On a cluster the
    /// client follows MOVED/ASK redirections and a failover (a replica promoted) by itself;
    /// what it cannot hide comes back as an error, and the batch is retried.
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<Self, DedupError> {
        let conn = match RedisTarget::parse(url) {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|e| DedupError(format!("REDIS_URL {url}: {e}")))?;
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                let c = redis::aio::ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map_err(|e| DedupError(format!("cannot connect to Redis at {url}: {e}")))?;
                Conn::Single(c)
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .build()
                    .map_err(|e| DedupError(format!("REDIS_URL {url}: {e}")))?;
                let c = client.get_async_connection().await.map_err(|e| {
                    DedupError(format!(
                        "cannot connect to the Redis Cluster at {nodes:?}: {e}"
                    ))
                })?;
                Conn::Cluster(std::sync::Arc::new(ClusterConn {
                    client,
                    conn: tokio::sync::RwLock::new(c),
                    renewed: std::sync::Mutex::new(Instant::now()),
                }))
            }
        };
        Ok(RedisDedup {
            conn,
            prefix: prefix.to_string(),
            ttl,
        })
    }

    /// Asks the server (`PING`), or a cluster node whether the cluster is whole
    /// (`CLUSTER INFO` says `cluster_state:ok`).
    pub async fn ping(&self) -> Result<(), DedupError> {
        match &self.conn {
            Conn::Single(c) => redis::cmd("PING")
                .query_async::<String>(&mut c.clone())
                .await
                .map(|_| ())
                .map_err(redis_error),
            Conn::Cluster(c) => {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c.get().await)
                    .await
                    .map_err(redis_error)?;
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    Ok(())
                } else {
                    let state = info
                        .lines()
                        .find(|l| l.starts_with("cluster_state:"))
                        .unwrap_or("cluster_state: unknown")
                        .trim()
                        .to_string();
                    Err(DedupError(format!(
                        "the Redis Cluster is not whole ({state})"
                    )))
                }
            }
        }
    }

    /// The Redis key of a mark.
    fn key(&self, k: &DedupKey) -> String {
        match self.conn {
            Conn::Single(_) => format!("{}{}", self.prefix, k.0),
            Conn::Cluster(_) => format!("{}{{{:02x}}}{}", self.prefix, bucket(&k.0), k.0),
        }
    }

    /// Item indices grouped so that each group's keys share a slot (all of them on one server).
    fn groups(&self, keys: &[DedupKey]) -> Vec<Vec<usize>> {
        match self.conn {
            Conn::Single(_) => vec![(0..keys.len()).collect()],
            Conn::Cluster(_) => {
                let mut by: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
                for (i, k) in keys.iter().enumerate() {
                    by.entry(bucket(&k.0)).or_default().push(i);
                }
                by.into_values().collect()
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, DedupError> {
        match &self.conn {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => {
                let r = pipe.query_async(&mut c.get().await).await;
                if r.is_err() {
                    c.renew().await;
                }
                r
            }
        }
        .map_err(redis_error)
    }

    /// Runs one pipeline per group (at once), and puts the answers back in item order.
    async fn per_group<T: redis::FromRedisValue + Default + Clone>(
        &self,
        keys: &[DedupKey],
        build: impl Fn(&mut redis::Pipeline, usize),
    ) -> Result<Vec<T>, DedupError> {
        let groups = self.groups(keys);
        let pipes: Vec<redis::Pipeline> = groups
            .iter()
            .map(|g| {
                let mut pipe = redis::pipe();
                for &i in g {
                    build(&mut pipe, i);
                }
                pipe
            })
            .collect();
        let answers: Vec<Vec<T>> =
            futures::future::try_join_all(pipes.iter().map(|p| self.query::<Vec<T>>(p))).await?;
        let mut out = vec![T::default(); keys.len()];
        for (g, a) in groups.iter().zip(answers) {
            if a.len() != g.len() {
                return Err(DedupError(format!(
                    "Redis answered {} of {} commands",
                    a.len(),
                    g.len()
                )));
            }
            for (&i, v) in g.iter().zip(a) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

impl DedupStore for RedisDedup {
    async fn claim(&self, items: &[(DedupKey, MarkOwner)]) -> Result<Vec<Claim>, DedupError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::EX(self.ttl.as_secs().max(1)));
        let keys: Vec<DedupKey> = items.iter().map(|(k, _)| k.clone()).collect();
        let previous: Vec<Option<String>> = self
            .per_group(&keys, |pipe, i| {
                let (key, owner) = &items[i];
                pipe.set_options(self.key(key), &owner.0, opts.clone());
            })
            .await?;
        Ok(previous
            .into_iter()
            .zip(items)
            .map(|(p, (_, owner))| classify(p, owner))
            .collect())
    }

    async fn release(&self, items: &[(DedupKey, MarkOwner)]) -> Result<(), DedupError> {
        if items.is_empty() {
            return Ok(());
        }
        // Compare-and-delete, atomically per key: never remove a mark another record owns.
        // One script per group: a script's keys must share a slot on a cluster.
        const SCRIPT: &str = "for i, k in ipairs(KEYS) do \
               if redis.call('GET', k) == ARGV[i] then redis.call('DEL', k) end \
             end \
             return 0";
        let keys: Vec<DedupKey> = items.iter().map(|(k, _)| k.clone()).collect();
        // Each script is a pipeline of its own (one slot each), sent through the same path as
        // the claims.
        let pipes: Vec<redis::Pipeline> = self
            .groups(&keys)
            .into_iter()
            .map(|g| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SCRIPT).arg(g.len());
                for &i in &g {
                    cmd.arg(self.key(&items[i].0));
                }
                for &i in &g {
                    cmd.arg(&items[i].1 .0);
                }
                let mut pipe = redis::pipe();
                pipe.add_command(cmd);
                pipe
            })
            .collect();
        futures::future::try_join_all(pipes.iter().map(|p| self.query::<Vec<i64>>(p))).await?;
        Ok(())
    }

    async fn peek(&self, keys: &[DedupKey]) -> Result<Vec<Option<String>>, DedupError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        self.per_group(keys, |pipe, i| {
            pipe.get(self.key(&keys[i]));
        })
        .await
    }
}

/// In-memory marks with the same semantics and TTL (embedded demo, single process).
#[derive(Default)]
pub struct MemoryDedup {
    marks: Mutex<HashMap<String, (String, Instant)>>,
    ttl: Duration,
}

impl MemoryDedup {
    pub fn new(ttl: Duration) -> Self {
        MemoryDedup {
            marks: Mutex::new(HashMap::new()),
            ttl,
        }
    }
}

impl DedupStore for MemoryDedup {
    async fn claim(&self, items: &[(DedupKey, MarkOwner)]) -> Result<Vec<Claim>, DedupError> {
        let now = Instant::now();
        let mut m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 {
            m.retain(|_, (_, exp)| *exp > now);
        }
        Ok(items
            .iter()
            .map(|(key, owner)| {
                let existing = m
                    .get(&key.0)
                    .filter(|(_, exp)| *exp > now)
                    .map(|(o, _)| o.clone());
                if existing.is_none() {
                    m.insert(key.0.clone(), (owner.0.clone(), now + self.ttl));
                }
                classify(existing, owner)
            })
            .collect())
    }

    async fn release(&self, items: &[(DedupKey, MarkOwner)]) -> Result<(), DedupError> {
        let mut m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        for (key, owner) in items {
            if m.get(&key.0).is_some_and(|(o, _)| *o == owner.0) {
                m.remove(&key.0);
            }
        }
        Ok(())
    }

    async fn peek(&self, keys: &[DedupKey]) -> Result<Vec<Option<String>>, DedupError> {
        let now = Instant::now();
        let m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .iter()
            .map(|k| {
                m.get(&k.0)
                    .filter(|(_, exp)| *exp > now)
                    .map(|(o, _)| o.clone())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_names_one_server_or_a_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379"),
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            RedisTarget::parse("redis://a:7000, redis://b:7001"),
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7001".into()])
        );
        assert_eq!(
            RedisTarget::parse("rediss+cluster://cfg.cache.amazonaws.com:6379"),
            RedisTarget::Cluster(vec!["rediss://cfg.cache.amazonaws.com:6379".into()])
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://a:7000,redis+cluster://b:7000"),
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7000".into()])
        );
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        // Part of the key format: these values must never change.
        assert_eq!(bucket("aws:evt-1"), bucket("aws:evt-1"));
        assert_eq!(bucket(""), 0xcbf2_9ce4_8422_2325 % CLUSTER_BUCKETS);
        let used: std::collections::HashSet<u64> = (0..10_000)
            .map(|i| bucket(&format!("direct:e-{i}")))
            .collect();
        assert_eq!(used.len() as u64, CLUSTER_BUCKETS);
    }
}
