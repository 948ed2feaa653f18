//! Failpoints for the fault-injection harness, compiled only with the `failpoints` feature (the
//! test script turns it on; release builds have none). `HELIOS_FAILPOINTS` names them:
//! `deliver.after_store=2*panic` panics the first 2 times the point is reached, `=panic` every
//! time, `=hang` waits there forever (a stuck await: what liveness must see). Points:
//! `deliver.after_store` (a delivery that has written PostgreSQL and nothing else).

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Point {
        times: Option<u64>,
        hits: AtomicU64,
        hang: bool,
    }

    fn points() -> &'static HashMap<String, Point> {
        static P: OnceLock<HashMap<String, Point>> = OnceLock::new();
        P.get_or_init(|| {
            let spec = std::env::var("HELIOS_FAILPOINTS").unwrap_or_default();
            spec.split(';')
                .filter_map(|p| {
                    let (name, action) = p.trim().split_once('=')?;
                    let (times, what) = match action.split_once('*') {
                        Some((n, w)) => (n.trim().parse().ok(), w.trim()),
                        None => (None, action.trim()),
                    };
                    (what == "panic" || what == "hang").then(|| {
                        (
                            name.trim().to_string(),
                            Point {
                                times,
                                hits: AtomicU64::new(0),
                                hang: what == "hang",
                            },
                        )
                    })
                })
                .collect()
        })
    }

    /// Waits forever when `name` is configured to hang and its count is not used up.
    pub async fn hang(name: &str) {
        if let Some(p) = points().get(name).filter(|p| p.hang) {
            let n = p.hits.fetch_add(1, Ordering::SeqCst);
            if p.times.is_none_or(|t| n < t) {
                tracing::warn!(failpoint = name, hit = n + 1, "failpoint: hanging");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Panics when `name` is configured to and its count is not used up.
    pub fn hit(name: &str) {
        if let Some(p) = points().get(name).filter(|p| !p.hang) {
            let n = p.hits.fetch_add(1, Ordering::SeqCst);
            if p.times.is_none_or(|t| n < t) {
                tracing::warn!(failpoint = name, hit = n + 1, "failpoint: panicking");
                panic!("failpoint {name} (hit {})", n + 1);
            }
        }
    }
}

/// Failures armed at run time by a test: `name` → how many more times it fails.
#[cfg(feature = "failpoints")]
fn armed() -> &'static std::sync::Mutex<std::collections::HashMap<String, u64>> {
    static A: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, u64>>> =
        std::sync::OnceLock::new();
    A.get_or_init(Default::default)
}

/// Arms `name` to fail the next `times` times it is asked (see [`fails`]).
#[cfg(feature = "failpoints")]
pub fn arm(name: &str, times: u64) {
    armed()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), times);
}

/// Whether the point `name` fails now (armed by [`arm`]; never without the feature). Points:
/// `reconcile.publish:<topic>` (outcomes written, not published: as a crash right after the
/// transaction).
#[inline]
pub fn fails(_name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        let mut a = armed().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = a.get_mut(_name) {
            if *n > 0 {
                *n -= 1;
                tracing::warn!(failpoint = _name, "failpoint: failing");
                return true;
            }
        }
    }
    false
}

/// Reaches the failpoint `name` (nothing without the `failpoints` feature).
#[inline]
pub fn hit(_name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hit(_name);
}

/// Reaches the failpoint `name` where it may hang (nothing without the `failpoints` feature).
#[inline]
pub async fn hang(_name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hang(_name).await;
}

/// What a held point does when released (see [`arm_hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Carry on.
    Go,
    /// Panic there (as the code at that point failing).
    Panic,
}

#[cfg(feature = "failpoints")]
#[derive(Default)]
struct Hold {
    /// Some code reached the point and is held there.
    reached: bool,
    release: Option<Release>,
}

#[cfg(feature = "failpoints")]
fn holds() -> &'static std::sync::Mutex<std::collections::HashMap<String, Hold>> {
    static H: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Hold>>> =
        std::sync::OnceLock::new();
    H.get_or_init(Default::default)
}

/// Arms `name` to hold the first code that reaches it ([`held`]) until [`release`]; later
/// arrivals pass. Points: `deliver.before_fanout:<consumer group>` (a delivery that has written
/// PostgreSQL and waited for the one before, before its fan-out).
#[cfg(feature = "failpoints")]
pub fn arm_hold(name: &str) {
    holds()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), Hold::default());
}

/// True once some code is held at `name`.
#[cfg(feature = "failpoints")]
pub fn is_held(name: &str) -> bool {
    holds()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .is_some_and(|h| h.reached)
}

/// Lets the code held at `name` go on (or panic there).
#[cfg(feature = "failpoints")]
pub fn release(name: &str, how: Release) {
    if let Some(h) = holds()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(name)
    {
        h.release = Some(how);
    }
}

/// Reaches the point `name`: held there when armed by [`arm_hold`] and not yet taken (nothing
/// without the `failpoints` feature).
#[inline]
pub async fn held(_name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let take = {
            let mut h = holds().lock().unwrap_or_else(|e| e.into_inner());
            match h.get_mut(_name) {
                Some(hold) if !hold.reached => {
                    hold.reached = true;
                    true
                }
                _ => false,
            }
        };
        if !take {
            return;
        }
        tracing::warn!(failpoint = _name, "failpoint: held");
        loop {
            let how = holds()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(_name)
                .and_then(|h| h.release);
            match how {
                Some(Release::Go) => return,
                Some(Release::Panic) => panic!("failpoint {_name}: released to panic"),
                None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    }
}
