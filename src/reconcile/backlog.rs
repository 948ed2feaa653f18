//! The processor group's backlog on the raw topics, as the reconciler's event time needs it:
//! records the ingress acknowledged that are not fanned out yet (the group's committed offsets
//! against the raw high watermarks, the way `helios status` reads them), and when the oldest of
//! them was received. Event time never passes that reception time (see [`super::clock`]): a step
//! still waiting behind a Redis or PostgreSQL outage, or on a lagging processor partition, can
//! still arrive, so its deadline must not fire.
//!
//! A thread looks every `every` (it never joins the group: it only asks for its committed
//! offsets) and publishes a [`View`]. Its bound is the wall-clock time before which every
//! acknowledged record has been fanned out: the time of the look when nothing waits, else the
//! timestamp of the oldest waiting record. A look that fails keeps the last bound (event time
//! waits rather than guesses).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;

/// What the last look found.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Every record received before this was fanned out (none: not known yet).
    pub bound: Option<DateTime<Utc>>,
    /// Raw records waiting for the processor.
    pub waiting: i64,
    /// When the oldest waiting record was received.
    pub oldest_waiting: Option<DateTime<Utc>>,
    /// Why the last look failed, if it did.
    pub error: Option<String>,
}

/// The thread and its view; the thread stops when this is dropped.
pub struct Backlog {
    view: Arc<Mutex<View>>,
    stop: Arc<AtomicBool>,
    /// The looking thread (its consumer lives as long as it does).
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backlog {
    /// Starts looking at `group`'s backlog on `raw` every `every`.
    pub fn start(
        settings: &KafkaSettings,
        group: &str,
        raw: Vec<String>,
        every: Duration,
    ) -> anyhow::Result<Backlog> {
        let c: BaseConsumer = settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("client.id", "helios-reconcile-backlog")
            .create()?;
        let view = Arc::new(Mutex::new(View::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, s) = (view.clone(), stop.clone());
        metrics::gauge!("helios_reconcile_raw_backlog_records").set(0.0);
        let thread = std::thread::Builder::new()
            .name("reconcile-backlog".into())
            .spawn(move || {
                let mut looker = Looker {
                    c,
                    raw,
                    stamps: HashMap::new(),
                };
                while !s.load(Ordering::Relaxed) {
                    let r = looker.look();
                    {
                        let mut view = v.lock().unwrap_or_else(|e| e.into_inner());
                        match r {
                            Ok(new) => {
                                metrics::gauge!("helios_reconcile_raw_backlog_records")
                                    .set(new.waiting as f64);
                                *view = new;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "raw backlog not read");
                                view.error = Some(e.to_string());
                            }
                        }
                    }
                    let mut slept = Duration::ZERO;
                    while slept < every && !s.load(Ordering::Relaxed) {
                        let step = Duration::from_millis(50).min(every - slept);
                        std::thread::sleep(step);
                        slept += step;
                    }
                }
            })?;
        Ok(Backlog {
            view,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops looking and waits until the thread, and with it its consumer, is gone: a caller
    /// that stops the cluster next (the demo) sees no client outlive the reconciler.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Looker {
    c: BaseConsumer,
    raw: Vec<String>,
    /// Timestamps of the first waiting record already read: (topic, partition, offset) → ms.
    stamps: HashMap<(String, i32, i64), Option<i64>>,
}

impl Looker {
    fn look(&mut self) -> anyhow::Result<View> {
        let timeout = Duration::from_secs(10);
        // Taken before the high watermarks: a record acknowledged before it is below them.
        let read_at = Utc::now();
        let md = self.c.fetch_metadata(None, timeout)?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = vec![];
        for t in md
            .topics()
            .iter()
            .filter(|t| self.raw.iter().any(|r| r == t.name()))
        {
            for p in t.partitions() {
                let (low, high) = self.c.fetch_watermarks(t.name(), p.id(), timeout)?;
                tpl.add_partition(t.name(), p.id());
                ends.push((t.name().to_string(), p.id(), low, high));
            }
        }
        let committed = if ends.is_empty() {
            TopicPartitionList::new()
        } else {
            self.c.committed_offsets(tpl, timeout)?
        };
        let mut view = View {
            bound: Some(read_at),
            ..View::default()
        };
        let mut firsts = vec![];
        for (topic, partition, low, high) in ends {
            let done = committed
                .find_partition(&topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(low)
                .max(low);
            if high > done {
                view.waiting += high - done;
                firsts.push((topic, partition, done));
            }
        }
        self.stamps.retain(|k, _| firsts.contains(k));
        for k in firsts {
            let ms = match self.stamps.get(&k) {
                Some(ms) => *ms,
                None => {
                    let ms = crate::kafka::record_timestamp(&self.c, &k.0, k.1, k.2)?;
                    self.stamps.insert(k.clone(), ms);
                    ms
                }
            };
            // A record whose time cannot be read: the look fails (the last bound stays).
            let Some(at) = ms.and_then(DateTime::from_timestamp_millis) else {
                self.stamps.remove(&k);
                anyhow::bail!(
                    "the timestamp of raw record {}/{}@{} could not be read",
                    k.0,
                    k.1,
                    k.2
                );
            };
            let at = at.min(read_at);
            view.oldest_waiting = Some(view.oldest_waiting.map_or(at, |o| o.min(at)));
        }
        if let Some(o) = view.oldest_waiting {
            // Strictly before the oldest waiting record: a deadline at its time must wait.
            view.bound = Some(o - chrono::Duration::milliseconds(1));
        }
        Ok(view)
    }
}
