//! `helios tap raw|events|dlq`: the records as they flow, with their headers and values (Avro
//! values in Confluent wire format decoded through the schema registry), filtered by source,
//! event type or order id. Pretty on a terminal, JSON lines otherwise (one object per record).

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::config::KafkaArgs;
use crate::model::headers::raw as raw_headers;
use crate::model::text::bounded;
use crate::source::Source;
use crate::topology::Topology;

/// Which stream to tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stream {
    /// The raw topics (what the ingress landed).
    Raw,
    /// The fan-out topics `helios.events.<Type>`.
    Events,
    /// The dead-letter topic.
    Dlq,
}

/// `helios tap` options.
#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// raw, events or dlq.
    #[arg(value_enum)]
    pub stream: Stream,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Only records of this source (aws, gcp, azure, direct).
    #[arg(long, value_parser = parse_source)]
    pub source: Option<Source>,
    /// Only this event type (events: its topic; raw and DLQ: records whose value names it).
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// Only records of this order (events: the record key; raw and DLQ: the value contains it).
    #[arg(long)]
    pub order_id: Option<String>,
    /// Keep printing new records until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// Where to start: `beginning`, `end`, an RFC 3339 time, or a duration ago (`90s`, `15m`,
    /// `2h`, `1d`).
    #[arg(long, default_value = "15m")]
    pub from: String,
    /// Stop after this many records (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: u64,
    /// Schema registry for Avro values (Confluent wire format).
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Print JSON lines even on a terminal.
    #[arg(long)]
    pub json: bool,
}

fn parse_source(s: &str) -> Result<Source, String> {
    Source::parse(s).ok_or_else(|| format!("`{s}` is not one of aws, gcp, azure, direct"))
}

/// Where to start reading.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Start {
    Beginning,
    End,
    At(DateTime<Utc>),
}

fn parse_from(s: &str) -> anyhow::Result<Start> {
    match s {
        "beginning" | "earliest" => return Ok(Start::Beginning),
        "end" | "now" | "latest" => return Ok(Start::End),
        _ => {}
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Start::At(t.with_timezone(&Utc)));
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| {
        anyhow::anyhow!("--from `{s}`: use beginning, end, an RFC 3339 time or a duration like 15m")
    })?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("--from `{s}`: a duration ends in s, m, h or d"),
    };
    Ok(Start::At(Utc::now() - chrono::Duration::seconds(secs)))
}

/// The topics of a stream.
fn topics(c: &BaseConsumer, topology: &Topology, args: &TapArgs) -> anyhow::Result<Vec<String>> {
    Ok(match args.stream {
        Stream::Raw => match args.source {
            Some(s) => vec![topology.raw_topic(s)],
            None => Source::ALL.iter().map(|s| topology.raw_topic(*s)).collect(),
        },
        Stream::Dlq => vec![topology.dlq_topic()],
        Stream::Events => match &args.event_type {
            Some(t) => vec![topology.event_topic(t)],
            None => {
                let prefix = topology.event_topic("");
                let md = c.fetch_metadata(None, Duration::from_secs(10))?;
                let mut names: Vec<String> = md
                    .topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .filter(|n| n.starts_with(&prefix))
                    .collect();
                names.sort();
                names
            }
        },
    })
}

/// Assigns every partition of `topics` at `start`; returns the partitions' current ends.
fn assign(
    c: &BaseConsumer,
    topics: &[String],
    start: Start,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for topic in topics {
        let md = c.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            for p in t.partitions() {
                let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
                let offset = match start {
                    Start::Beginning => low,
                    Start::End => high,
                    Start::At(at) => crate::kafka::offsets_at_times(
                        c,
                        topic,
                        p.id(),
                        (low, high),
                        &[at.timestamp_millis()],
                    )?[0],
                };
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(offset))?;
                if offset < high {
                    ends.insert((topic.clone(), p.id()), high);
                }
            }
        }
    }
    if tpl.count() == 0 {
        anyhow::bail!("no such topic on the broker: {}", topics.join(", "));
    }
    c.assign(&tpl)?;
    Ok(ends)
}

/// Decodes Confluent-wire-format Avro values through the registry (schemas cached by id).
struct AvroDecoder {
    url: String,
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
    schemas: HashMap<u32, Option<apache_avro::Schema>>,
}

impl AvroDecoder {
    fn decode(&mut self, value: &[u8]) -> Option<Value> {
        if value.len() < 5 || value[0] != 0 {
            return None;
        }
        let id = u32::from_be_bytes(value[1..5].try_into().ok()?);
        if !self.schemas.contains_key(&id) && self.schemas.len() < 1000 {
            let url = format!("{}/schemas/ids/{id}", self.url.trim_end_matches('/'));
            let http = self.http.clone();
            let fetched = self.runtime.block_on(async move {
                http.get(url).send().await.ok()?.json::<Value>().await.ok()
            });
            let schema = fetched
                .and_then(|v| apache_avro::Schema::parse_str(v.get("schema")?.as_str()?).ok());
            self.schemas.insert(id, schema);
        }
        let schema = self.schemas.get(&id)?.as_ref()?;
        let mut body = &value[5..];
        let v = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .ok()?
            .read_value(&mut body)
            .ok()?;
        let mut j = avro_to_json(v);
        // HELIOS's `data` and `metadata` travel as JSON text inside the record.
        for field in ["data", "metadata"] {
            if let Some(s) = j.get(field).and_then(Value::as_str) {
                if let Ok(parsed) = serde_json::from_str::<Value>(s) {
                    j[field] = parsed;
                }
            }
        }
        Some(json!({"avro_schema_id": id, "record": j}))
    }
}

/// An Avro value as JSON: unions unwrapped, enums as their symbol, timestamps as RFC 3339.
fn avro_to_json(v: apache_avro::types::Value) -> Value {
    use apache_avro::types::Value as A;
    let time = |micros: i64| {
        DateTime::from_timestamp_micros(micros).map_or(json!(micros), |t| json!(t.to_rfc3339()))
    };
    match v {
        A::Null => Value::Null,
        A::Boolean(b) => json!(b),
        A::Int(i) | A::Date(i) | A::TimeMillis(i) => json!(i),
        A::Long(i) | A::TimeMicros(i) => json!(i),
        A::Float(f) => json!(f),
        A::Double(f) => json!(f),
        A::String(s) | A::Enum(_, s) => json!(s),
        A::Bytes(b) | A::Fixed(_, b) => json!(b),
        A::Union(_, inner) => avro_to_json(*inner),
        A::Array(items) => Value::Array(items.into_iter().map(avro_to_json).collect()),
        A::Map(m) => Value::Object(m.into_iter().map(|(k, v)| (k, avro_to_json(v))).collect()),
        A::Record(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, avro_to_json(v)))
                .collect(),
        ),
        A::TimestampMillis(ms) | A::LocalTimestampMillis(ms) => time(ms.saturating_mul(1000)),
        A::TimestampMicros(us) | A::LocalTimestampMicros(us) => time(us),
        A::TimestampNanos(ns) | A::LocalTimestampNanos(ns) => time(ns / 1000),
        A::Uuid(u) => json!(u.to_string()),
        other => json!(format!("{other:?}")),
    }
}

/// A record as printed.
fn render(m: &BorrowedMessage<'_>, avro: Option<&mut AvroDecoder>) -> Value {
    let mut headers = serde_json::Map::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            let v = h
                .value
                .map(|v| bounded(&String::from_utf8_lossy(v), 2048).into_owned());
            headers.insert(h.key.to_string(), json!(v));
        }
    }
    let payload = m.payload().unwrap_or_default();
    let value = avro
        .and_then(|a| a.decode(payload))
        .or_else(|| serde_json::from_slice::<Value>(payload).ok())
        .unwrap_or_else(|| json!(String::from_utf8_lossy(payload)));
    json!({
        "topic": m.topic(),
        "partition": m.partition(),
        "offset": m.offset(),
        "timestamp": m.timestamp().to_millis().and_then(DateTime::from_timestamp_millis),
        "key": m.key().map(String::from_utf8_lossy),
        "headers": headers,
        "value": value,
    })
}

fn matches(m: &BorrowedMessage<'_>, args: &TapArgs) -> bool {
    let header = |name: &str| {
        m.headers().and_then(|hs| {
            hs.iter()
                .filter(|h| h.key == name)
                .last()
                .and_then(|h| h.value)
        })
    };
    if let Some(s) = args.source {
        if args.stream != Stream::Raw && header(raw_headers::SOURCE) != Some(s.as_str().as_bytes())
        {
            return false;
        }
    }
    let payload = m.payload().unwrap_or_default();
    let contains = |needle: &str| {
        !needle.is_empty()
            && payload
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
    };
    if let Some(t) = &args.event_type {
        if args.stream != Stream::Events && !contains(t) {
            return false;
        }
    }
    if let Some(o) = &args.order_id {
        let keyed = m.key().is_some_and(|k| k == o.as_bytes());
        if !keyed && (args.stream == Stream::Events || !contains(o)) {
            return false;
        }
    }
    true
}

fn print_pretty(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "\x1b[1m{} [{}] @{}\x1b[0m  {}  key={}",
        v["topic"].as_str().unwrap_or(""),
        v["partition"],
        v["offset"],
        v["timestamp"].as_str().unwrap_or("-"),
        v["key"].as_str().unwrap_or("-")
    )?;
    if let Some(h) = v["headers"].as_object() {
        for (k, val) in h {
            writeln!(out, "  {k}: {}", val.as_str().unwrap_or("null"))?;
        }
    }
    let body = serde_json::to_string_pretty(&v["value"]).unwrap_or_default();
    for line in body.lines() {
        writeln!(out, "  {line}")?;
    }
    writeln!(out)
}

/// Runs `helios tap`.
pub async fn run(args: TapArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || tap(&args, runtime)).await?
}

fn tap(args: &TapArgs, runtime: tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let (topology, settings) = args.kafka.resolve()?;
    let start = parse_from(&args.from)?;
    let c = crate::kafka::reader(&settings, "tap")?;
    let topics = topics(&c, &topology, args)?;
    if topics.is_empty() {
        anyhow::bail!("no `{}` topics on the broker", topology.event_topic("*"));
    }
    let mut remaining = assign(&c, &topics, start)?;
    let mut avro = args
        .schema_registry_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|url| -> anyhow::Result<AvroDecoder> {
            Ok(AvroDecoder {
                url: url.to_string(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()?,
                runtime: runtime.clone(),
                schemas: HashMap::new(),
            })
        })
        .transpose()?;
    let pretty = !args.json && std::io::stdout().is_terminal();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut printed = 0u64;
    let mut idle = Instant::now();
    loop {
        if !args.follow && remaining.is_empty() {
            break;
        }
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            if !args.follow && idle.elapsed() > Duration::from_secs(30) {
                anyhow::bail!(
                    "no records for 30 s before the end of {}",
                    topics.join(", ")
                );
            }
            continue;
        };
        let m = m?;
        idle = Instant::now();
        let key = (m.topic().to_string(), m.partition());
        if remaining
            .get(&key)
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            remaining.remove(&key);
        }
        if !matches(&m, args) {
            continue;
        }
        let v = render(&m, avro.as_mut());
        let written = if pretty {
            print_pretty(&mut out, &v)
        } else {
            writeln!(out, "{v}")
        };
        if written.is_err() {
            // A closed pipe (`| head`): done.
            return Ok(ExitCode::SUCCESS);
        }
        printed += 1;
        if args.limit > 0 && printed >= args.limit {
            break;
        }
    }
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_accepts_keywords_times_and_durations() {
        assert_eq!(parse_from("beginning").unwrap(), Start::Beginning);
        assert_eq!(parse_from("end").unwrap(), Start::End);
        assert!(matches!(
            parse_from("2026-11-25T10:00:00Z").unwrap(),
            Start::At(t) if t.timestamp() == 1_795_600_800
        ));
        let Start::At(t) = parse_from("15m").unwrap() else {
            panic!("15m")
        };
        let ago = (Utc::now() - t).num_seconds();
        assert!((899..=901).contains(&ago), "{ago}");
        assert!(parse_from("15x").is_err());
        assert!(parse_from("soon").is_err());
    }
}
