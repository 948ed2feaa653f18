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
//! per batch); the other is in memory with the same semantics, for the embedded demo.

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

/// Redis-backed marks.
#[derive(Clone)]
pub struct RedisDedup {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl: Duration,
}

impl RedisDedup {
    /// Connects (retrying in the background when Redis goes away later).
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> Result<Self, DedupError> {
        let client =
            redis::Client::open(url).map_err(|e| DedupError(format!("REDIS_URL {url}: {e}")))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = redis::aio::ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(|e| DedupError(format!("cannot connect to Redis at {url}: {e}")))?;
        Ok(RedisDedup {
            conn,
            prefix: prefix.to_string(),
            ttl,
        })
    }
}

impl DedupStore for RedisDedup {
    async fn claim(&self, items: &[(DedupKey, MarkOwner)]) -> Result<Vec<Claim>, DedupError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .get(true)
            .with_expiration(redis::SetExpiry::EX(self.ttl.as_secs().max(1)));
        for (key, owner) in items {
            pipe.set_options(format!("{}{}", self.prefix, key.0), &owner.0, opts.clone());
        }
        let mut conn = self.conn.clone();
        let previous: Vec<Option<String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| DedupError(e.to_string()))?;
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
        const SCRIPT: &str = "for i, k in ipairs(KEYS) do \
               if redis.call('GET', k) == ARGV[i] then redis.call('DEL', k) end \
             end \
             return 0";
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(items.len());
        for (key, _) in items {
            cmd.arg(format!("{}{}", self.prefix, key.0));
        }
        for (_, owner) in items {
            cmd.arg(&owner.0);
        }
        let mut conn = self.conn.clone();
        cmd.query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| DedupError(e.to_string()))
    }

    async fn peek(&self, keys: &[DedupKey]) -> Result<Vec<Option<String>>, DedupError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.get(format!("{}{}", self.prefix, k.0));
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn)
            .await
            .map_err(|e| DedupError(e.to_string()))
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
