//! The registry's versions of the payload schemas, fetched when an event says it was written
//! with one and kept (a registered version never changes). Looking up is synchronous (batch
//! planning is pure); what a batch needs and is not here yet is fetched between two plans of
//! the same batch ([`WriterSchemas::fetch`]).
//!
//! Bounded: only versions the registry lists are fetched and kept. A version above the
//! highest listed makes the list be read again, at most every [`RELIST_AFTER`] per subject, so
//! events declaring made-up versions cost one request per subject per interval, not one each.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::registry::{Error, Registry};
use super::TypeSchema;

/// How soon a subject's version list may be read again for a version it did not have.
pub const RELIST_AFTER: Duration = Duration::from_secs(5);

/// What the cache says about one (subject, version).
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<TypeSchema>),
    /// The registry lists no such version (as of its last listing).
    NotRegistered,
    /// The registry has it, but not as a payload schema HELIOS can use (not an Avro record).
    Unusable(String),
    /// Not known yet: fetch it ([`WriterSchemas::fetch`]) and plan again.
    Pending,
}

#[derive(Debug, Default)]
struct Subject {
    versions: Vec<u32>,
    listed: Option<Instant>,
    schemas: HashMap<u32, Result<Arc<TypeSchema>, String>>,
}

impl Subject {
    fn relist_due(&self, v: u32) -> bool {
        let above = self.versions.iter().max().is_none_or(|m| v > *m);
        above && self.listed.is_none_or(|t| t.elapsed() >= RELIST_AFTER)
    }
}

/// Versions of the payload schemas from one registry.
#[derive(Debug)]
pub struct WriterSchemas {
    registry: Registry,
    subjects: RwLock<HashMap<String, Subject>>,
}

impl WriterSchemas {
    pub fn new(registry: Registry) -> Arc<WriterSchemas> {
        Arc::new(WriterSchemas {
            registry,
            subjects: RwLock::default(),
        })
    }

    pub fn lookup(&self, subject: &str, version: u32) -> Lookup {
        let subjects = self.subjects.read().unwrap_or_else(|p| p.into_inner());
        let Some(s) = subjects.get(subject) else {
            return Lookup::Pending;
        };
        match s.schemas.get(&version) {
            Some(Ok(ts)) => Lookup::Found(ts.clone()),
            Some(Err(why)) => Lookup::Unusable(why.clone()),
            None if s.versions.contains(&version) || s.relist_due(version) => Lookup::Pending,
            None => Lookup::NotRegistered,
        }
    }

    /// Fetches what [`Self::lookup`] said is pending. On `Ok`, each of them is decided
    /// (found, not registered or unusable); an error means the registry did not answer.
    pub async fn fetch(&self, needs: &[(String, u32)]) -> Result<(), Error> {
        for (subject, version) in needs {
            let relist = {
                let subjects = self.subjects.read().unwrap_or_else(|p| p.into_inner());
                subjects
                    .get(subject)
                    .is_none_or(|s| !s.versions.contains(version) && s.relist_due(*version))
            };
            if relist {
                let versions = self.registry.versions(subject).await?;
                let mut subjects = self.subjects.write().unwrap_or_else(|p| p.into_inner());
                let s = subjects.entry(subject.clone()).or_default();
                s.versions = versions;
                s.listed = Some(Instant::now());
            }
            let wanted = {
                let subjects = self.subjects.read().unwrap_or_else(|p| p.into_inner());
                subjects.get(subject).is_some_and(|s| {
                    s.versions.contains(version) && !s.schemas.contains_key(version)
                })
            };
            if !wanted {
                continue;
            }
            let got = match self.registry.version(subject, *version).await? {
                None => None,
                Some(r) if r.schema_type.as_deref().is_some_and(|t| t != "AVRO") => Some(Err(
                    format!(
                        "version {version} of {subject} in the registry is a {} schema; HELIOS validates payloads with Avro",
                        r.schema_type.unwrap_or_default()
                    ),
                )),
                Some(r) => Some(
                    super::parse(&r.schema, &format!("registry {subject} v{version}"), Some(*version))
                        .map(|mut ts| {
                            ts.subject = subject.clone();
                            Arc::new(ts)
                        })
                        .map_err(|e| e.to_string()),
                ),
            };
            let mut subjects = self.subjects.write().unwrap_or_else(|p| p.into_inner());
            let s = subjects.entry(subject.clone()).or_default();
            match got {
                Some(r) => {
                    s.schemas.insert(*version, r);
                }
                // Listed a moment ago, gone now (a hard delete): not registered any more.
                None => s.versions.retain(|v| v != version),
            }
        }
        Ok(())
    }
}
