//! The error taxonomy of every sink HELIOS writes to (PostgreSQL, Kafka, Redis, the schema
//! registry): a failure is *transient* (the dependency is unavailable, slow or busy: retry the
//! same work later), *caused by the data* (the sink will refuse this value every time: never
//! retry it, isolate it to the DLQ), or *unclassified* (a code nobody listed). An unclassified
//! error is retried a few times, then isolated like a data error: if part of the batch gets
//! through, the unit that keeps failing is the data's fault and goes to the DLQ with its code;
//! if nothing gets through, it is an outage (retried, partitions paused, the stall gauge rises).
//! Each sink's module classifies its own errors into this.

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
    /// A code neither list names: retried a few times, then isolated (see the module docs).
    Unclassified { code: String },
}

impl Fault {
    pub fn is_data(&self) -> bool {
        matches!(self, Fault::Data { .. })
    }
}

/// How many times a batch is retried after unclassified errors before they are isolated.
pub const UNCLASSIFIED_RETRIES: u32 = 3;

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
/// row over ~2.7 KB). Transient: class 08 (connection), 25 (invalid transaction state), 28
/// (authorization), 3D (no such database), 40 (serialization failure, deadlock), 42 (a table
/// missing because migrations did not run, a privilege), 53 (insufficient resources), 55 (lock
/// not available), 57 (operator intervention), 58 (system error) — retrying may succeed once the
/// database or its operator has recovered. Anything else (XX000 internal error, 0A feature not
/// supported, a class added by a later PostgreSQL) is unclassified.
pub fn classify_sqlstate(code: &str) -> Fault {
    const DATA: [&str; 3] = ["22", "23", "54"];
    const TRANSIENT: [&str; 11] = [
        "08", "25", "28", "3D", "40", "42", "53", "55", "57", "58", "HV",
    ];
    let class = code.get(..2).unwrap_or(code);
    if DATA.contains(&class) {
        Fault::Data {
            code: code.to_string(),
        }
    } else if TRANSIENT.contains(&class) {
        Fault::Transient
    } else {
        Fault::Unclassified {
            code: code.to_string(),
        }
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
            "08006", "40001", "40P01", "53300", "57P01", "42P01", "55P03",
        ] {
            assert_eq!(
                classify_sqlstate(transient),
                Fault::Transient,
                "{transient}"
            );
        }
        for unknown in ["XX000", "0A000", "P0001", "F0000"] {
            assert!(
                matches!(classify_sqlstate(unknown), Fault::Unclassified { .. }),
                "{unknown}"
            );
        }
    }
}
