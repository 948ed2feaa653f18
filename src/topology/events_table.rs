//! `events_table:` in topology.yaml: how the PostgreSQL `events` table is laid out. Unset, it is
//! one unpartitioned table (primary key `(source, event_id)`, kept for ever). With `partition:`,
//! it is partitioned by range of `occurred_at` (primary key `(source, event_id, occurred_at)`),
//! partitions are created ahead and, with `retention:`, dropped whole once every row in them is
//! older than the retention (see [`crate::db::partitions`]).

use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::flows::parse_duration;

/// The most partitions retention may keep: past a few thousand, PostgreSQL plans every query
/// over them slowly; a longer retention should use a longer period.
pub const MAX_RETAINED_PARTITIONS: i64 = 1_000;

/// The section as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventsTableSpec {
    /// `none` (the default), `daily` or `monthly` (UTC periods of `occurred_at`).
    #[serde(default)]
    pub partition: Period,
    /// Partitions whose whole range is older than this are dropped (`90d`); unset keeps all.
    #[serde(default)]
    pub retention: Option<String>,
    /// How many periods ahead of now partitions exist (default 7 for daily, 2 for monthly).
    #[serde(default)]
    pub create_ahead: Option<u32>,
}

/// The period of one partition.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// One unpartitioned table.
    #[default]
    None,
    Daily,
    Monthly,
}

/// A validated partitioned layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioning {
    pub period: Period,
    pub retention: Option<Duration>,
    pub create_ahead: u32,
}

impl EventsTableSpec {
    /// The layout this section asks for (`None`: unpartitioned), or the key at fault and why.
    pub fn validate(&self) -> Result<Option<Partitioning>, (String, String)> {
        let bad = |key: &str, problem: String| (format!("events_table.{key}"), problem);
        if self.partition == Period::None {
            if self.retention.is_some() || self.create_ahead.is_some() {
                return Err(bad(
                    "partition",
                    "must be `daily` or `monthly` for `retention` or `create_ahead`: an unpartitioned table has no partitions to drop or create".into(),
                ));
            }
            return Ok(None);
        }
        let retention = match &self.retention {
            None => None,
            Some(r) => {
                let d = parse_duration(r).map_err(|p| bad("retention", p))?;
                let p = Partitioning {
                    period: self.partition,
                    retention: Some(d),
                    create_ahead: 0,
                };
                let period = p.nominal_period();
                if d < period {
                    return Err(bad(
                        "retention",
                        format!(
                            "is {r}, shorter than one {} partition: use at least {}",
                            p.period_name(),
                            p.period_name_min()
                        ),
                    ));
                }
                if (d.as_secs() / period.as_secs()) as i64 > MAX_RETAINED_PARTITIONS {
                    return Err(bad(
                        "retention",
                        format!(
                            "is {r}: more than {MAX_RETAINED_PARTITIONS} {} partitions; use `partition: monthly`",
                            p.period_name()
                        ),
                    ));
                }
                Some(d)
            }
        };
        let create_ahead = self.create_ahead.unwrap_or(match self.partition {
            Period::Monthly => 2,
            _ => 7,
        });
        if create_ahead == 0 || create_ahead > 366 {
            return Err(bad(
                "create_ahead",
                format!("is {create_ahead}; use 1 to 366 periods"),
            ));
        }
        Ok(Some(Partitioning {
            period: self.partition,
            retention,
            create_ahead,
        }))
    }
}

impl Partitioning {
    /// The period's length for checks (a month counts 31 days).
    pub fn nominal_period(&self) -> Duration {
        match self.period {
            Period::Monthly => Duration::from_secs(31 * 86_400),
            _ => Duration::from_secs(86_400),
        }
    }

    pub fn period_name(&self) -> &'static str {
        match self.period {
            Period::Monthly => "monthly",
            Period::Daily => "daily",
            Period::None => "unpartitioned",
        }
    }

    fn period_name_min(&self) -> &'static str {
        match self.period {
            Period::Monthly => "31d",
            _ => "1d",
        }
    }

    /// The start of the period holding `t` (UTC midnight, or the first of its month).
    pub fn floor(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let d = t.date_naive();
        let day = match self.period {
            Period::Monthly => NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d),
            _ => d,
        };
        Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
    }

    /// The start of the period `n` periods after the one starting at `start` (`n` may be < 0).
    pub fn step(&self, start: DateTime<Utc>, n: i64) -> DateTime<Utc> {
        match self.period {
            Period::Monthly => {
                let m = Months::new(n.unsigned_abs() as u32);
                if n >= 0 {
                    start.checked_add_months(m)
                } else {
                    start.checked_sub_months(m)
                }
                .unwrap_or(start)
            }
            _ => start + chrono::Duration::days(n),
        }
    }

    /// The partition holding the period starting at `start`: `events_p20261204` (daily) or
    /// `events_p202612` (monthly). Names are only for people: maintenance reads each partition's
    /// bounds from the catalog, never from its name.
    pub fn partition_name(&self, start: DateTime<Utc>) -> String {
        match self.period {
            Period::Monthly => format!("events_p{}", start.format("%Y%m")),
            _ => format!("events_p{}", start.format("%Y%m%d")),
        }
    }

    /// The periods (starts) that should have a partition at `now`: from the one `retention`
    /// reaches back to (without retention: `keep_from`, the oldest partition there is, or 7
    /// periods back) through `create_ahead` periods ahead.
    pub fn wanted(
        &self,
        now: DateTime<Utc>,
        keep_from: Option<DateTime<Utc>>,
    ) -> Vec<DateTime<Utc>> {
        let current = self.floor(now);
        let first = match self.retention {
            Some(r) => self.floor(now - chrono::Duration::from_std(r).unwrap_or_default()),
            None => keep_from
                .map(|k| {
                    self.floor(k)
                        .max(self.step(current, -MAX_RETAINED_PARTITIONS))
                })
                .unwrap_or_else(|| self.step(current, -7)),
        };
        let last = self.step(current, self.create_ahead as i64);
        let mut out = vec![];
        let mut p = first;
        while p <= last {
            out.push(p);
            p = self.step(p, 1);
        }
        out
    }

    /// Rows older than this are past retention (partitions ending at or before it are dropped).
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.retention
            .map(|r| now - chrono::Duration::from_std(r).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn spec(yaml: &str) -> Result<Option<Partitioning>, (String, String)> {
        serde_norway::from_str::<EventsTableSpec>(yaml)
            .unwrap()
            .validate()
    }

    #[test]
    fn sections() {
        assert_eq!(spec("{}").unwrap(), None);
        let p = spec("{partition: daily, retention: 90d}").unwrap().unwrap();
        assert_eq!(p.create_ahead, 7);
        assert_eq!(p.retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(
            spec("{partition: monthly}").unwrap().unwrap().create_ahead,
            2
        );
        let (key, why) = spec("{retention: 30d}").unwrap_err();
        assert_eq!(key, "events_table.partition");
        assert!(why.contains("daily"), "{why}");
        assert!(spec("{partition: daily, retention: 12h}").is_err());
        assert!(spec("{partition: daily, retention: 3000d}").is_err());
        assert!(spec("{partition: monthly, retention: 3000d}").is_ok());
        assert!(spec("{partition: daily, create_ahead: 0}").is_err());
        assert!(serde_norway::from_str::<EventsTableSpec>("{partition: hourly}").is_err());
    }

    #[test]
    fn periods_and_names() {
        let d = spec("{partition: daily, retention: 3d, create_ahead: 2}")
            .unwrap()
            .unwrap();
        let now = at("2026-12-04T18:30:00Z");
        assert_eq!(d.floor(now), at("2026-12-04T00:00:00Z"));
        assert_eq!(d.partition_name(d.floor(now)), "events_p20261204");
        let w: Vec<String> = d
            .wanted(now, None)
            .into_iter()
            .map(|p| d.partition_name(p))
            .collect();
        assert_eq!(
            w,
            [
                "events_p20261201",
                "events_p20261202",
                "events_p20261203",
                "events_p20261204",
                "events_p20261205",
                "events_p20261206"
            ]
        );
        assert_eq!(d.cutoff(now), Some(at("2026-12-01T18:30:00Z")));

        let m = spec("{partition: monthly, create_ahead: 1}")
            .unwrap()
            .unwrap();
        assert_eq!(
            m.floor(at("2027-01-31T23:59:59Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            m.step(at("2027-01-01T00:00:00Z"), 1),
            at("2027-02-01T00:00:00Z")
        );
        assert_eq!(
            m.step(at("2027-01-01T00:00:00Z"), -2),
            at("2026-11-01T00:00:00Z")
        );
        assert_eq!(
            m.partition_name(at("2027-02-01T00:00:00Z")),
            "events_p202702"
        );
        // Without retention: from the oldest partition there is.
        let w = m.wanted(now, Some(at("2026-10-01T00:00:00Z")));
        assert_eq!(w.first(), Some(&at("2026-10-01T00:00:00Z")));
        assert_eq!(w.last(), Some(&at("2027-01-01T00:00:00Z")));
        assert_eq!(m.cutoff(now), None);
    }
}
