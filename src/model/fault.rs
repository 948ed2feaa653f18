//! The error taxonomy of every sink HELIOS writes to (PostgreSQL, Kafka, Redis, the schema
//! registry): a failure is either *transient* (the dependency is unavailable, slow or busy: retry
//! the same work later) or *caused by the data* (the sink will refuse this value every time:
//! never retry it, isolate it to the DLQ). Each sink's module classifies its own errors into this.

use std::fmt;

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Connection lost, timeout, pool exhausted, serialization failure or deadlock, broker
    /// unavailable, queue full, a missing topic or table: retried with backoff.
    Transient,
    /// The sink refuses this value (PostgreSQL SQLSTATE class 22/23/54, a Kafka record too
    /// large or invalid). `code` is the SQLSTATE or the Kafka error name, for the DLQ header.
    Data { code: String },
}

impl Fault {
    pub fn is_data(&self) -> bool {
        matches!(self, Fault::Data { .. })
    }
}

/// The sinks, as named in metrics (`stage` label of retries) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    Postgres,
    Kafka,
    Redis,
    SchemaRegistry,
}

impl Sink {
    pub fn as_str(self) -> &'static str {
        match self {
            Sink::Postgres => "postgres",
            Sink::Kafka => "kafka",
            Sink::Redis => "dedup",
            Sink::SchemaRegistry => "schema_registry",
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// PostgreSQL: what a SQLSTATE means for a retry.
///
/// Caused by the data: class 22 (data exception: `\u0000` in jsonb, bad encodings, numeric out of
/// range), class 23 (integrity constraint), 54000 and class 54 (program limit exceeded: an index
/// row over ~2.7 KB). Everything else — class 08 (connection), 40001/40P01 (serialization
/// failure, deadlock), 53 (insufficient resources), 57 (operator intervention), 42 (a table
/// missing because migrations did not run) — is transient: retrying may succeed once the
/// database or its operator has recovered.
pub fn classify_sqlstate(code: &str) -> Fault {
    let data = code.starts_with("22") || code.starts_with("23") || code.starts_with("54");
    if data {
        Fault::Data {
            code: code.to_string(),
        }
    } else {
        Fault::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_split_into_data_and_transient() {
        for data in ["22P05", "22021", "22003", "23502", "54000"] {
            assert!(classify_sqlstate(data).is_data(), "{data}");
        }
        for transient in [
            "08006", "40001", "40P01", "53300", "57P01", "42P01", "XX000",
        ] {
            assert_eq!(
                classify_sqlstate(transient),
                Fault::Transient,
                "{transient}"
            );
        }
    }
}
