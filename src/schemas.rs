//! `helios schemas check` and `helios schemas register`: the payload schemas of `schemas/`
//! against the schema registry, under each subject's compatibility mode.
//!
//! The registry's own compatibility API (`POST /compatibility/...?verbose=true`) gives the
//! verdict; HELIOS adds what breaks, field by field, and for whom
//! ([`crate::pipeline::schema::compat`]), read against the versions the mode compares with
//! (the latest; every version for a `_TRANSITIVE` mode). `register` registers the schemas that
//! pass (new subjects, changed schemas) and none that do not.

use std::path::PathBuf;
use std::process::ExitCode;

use apache_avro::Schema;

use crate::pipeline::schema::compat::{self, Break, Whom};
use crate::pipeline::schema::registry::Registry;
use crate::pipeline::schema::{file_version, SchemaSet, TypeSchema};
use crate::topology::Topology;

#[derive(Debug, clap::Subcommand)]
pub enum SchemasCommand {
    /// Compare schemas/ with the registry under each subject's compatibility mode; say per
    /// field what breaks whom (exit 1 when something would be refused, 2 when the check could
    /// not be made).
    Check(SchemasArgs),
    /// Register every schema that passes the check (new subjects, changed schemas); refuse the
    /// rest (exit 1 when one was refused, 2 when the registry did not answer).
    Register(SchemasArgs),
}

#[derive(Debug, clap::Args)]
pub struct SchemasArgs {
    /// The schema registry (Confluent REST API).
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub registry: String,
    /// The topology file: its event types and their schemas (`schemas/<Type>.avsc` beside it).
    #[arg(long, env = "HELIOS_TOPOLOGY", default_value = "topology.yaml")]
    pub topology: PathBuf,
    /// Only these event types (repeatable).
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where one subject stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Nothing registered under the subject yet: it registers as version 1.
    New,
    /// The same schema is the latest version.
    Unchanged,
    /// Different from the latest, and the registry accepts it.
    Compatible,
    /// The registry would refuse it.
    Incompatible,
}

/// The check of one event type's schema.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Checked {
    pub event_type: String,
    pub subject: String,
    pub file: String,
    pub mode: &'static str,
    pub verdict: Verdict,
    /// The latest registered version (none for a new subject).
    pub latest: Option<u32>,
    /// What HELIOS found, field by field.
    pub breaks: Vec<Break>,
    /// What the registry said (its `verbose` messages).
    pub registry_messages: Vec<String>,
    /// Things worth knowing that break nobody (a version number that will not match).
    pub notes: Vec<String>,
    /// After `register`: the id and version given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered: Option<(u32, u32)>,
}

/// Checks one schema against the registry.
pub async fn check_one(
    registry: &Registry,
    event_type: &str,
    ts: &TypeSchema,
) -> anyhow::Result<Checked> {
    let subject = &ts.subject;
    let mode = registry.mode(subject).await?;
    let versions = registry.versions(subject).await?;
    let mut c = Checked {
        event_type: event_type.to_string(),
        subject: subject.clone(),
        file: ts.origin.clone(),
        mode: mode.as_str(),
        verdict: Verdict::New,
        latest: versions.iter().max().copied(),
        breaks: vec![],
        registry_messages: vec![],
        notes: vec![],
        registered: None,
    };
    let Some(latest) = c.latest else {
        if file_version(&ts.text).is_some_and(|v| v != 1) {
            c.notes.push(format!(
                "the file says helios.schema.version {}, the registry will make it version 1: DLQ headers name the file's number",
                ts.version
            ));
        }
        return Ok(c);
    };
    let latest_schema = registry
        .version(subject, latest)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{subject} v{latest} vanished while being read"))?;
    let old = Schema::parse_str(&latest_schema.schema)
        .map_err(|e| anyhow::anyhow!("{subject} v{latest} in the registry is not Avro: {e}"))?;
    if old.canonical_form() == ts.schema.canonical_form() {
        c.verdict = Verdict::Unchanged;
        if ts.version != latest.to_string() {
            c.notes.push(format!(
                "registered as version {latest}; the file says helios.schema.version {}",
                ts.version
            ));
        }
        return Ok(c);
    }
    let (ok, messages) = registry.test(subject, &ts.text).await?;
    c.registry_messages = messages;
    // Our explanation, against the versions the mode reads.
    let against: Vec<u32> = if mode.transitive() {
        versions.clone()
    } else {
        vec![latest]
    };
    for v in against {
        let old = if v == latest {
            old.clone()
        } else {
            match registry.version(subject, v).await? {
                Some(r) => match Schema::parse_str(&r.schema) {
                    Ok(s) => s,
                    Err(_) => continue,
                },
                None => continue,
            }
        };
        c.breaks.extend(compat::explain(
            &old,
            v,
            &ts.schema,
            mode.backward(),
            mode.forward(),
        ));
    }
    c.verdict = if ok {
        Verdict::Compatible
    } else {
        Verdict::Incompatible
    };
    if ok && file_version(&ts.text).is_some_and(|v| v != latest + 1) {
        c.notes.push(format!(
            "the file says helios.schema.version {}, the registry will make it version {}",
            ts.version,
            latest + 1
        ));
    }
    if ok && !c.breaks.is_empty() {
        c.notes.push(
            "the registry accepts it although HELIOS reads a break: the registry's rules decide"
                .into(),
        );
    }
    Ok(c)
}

fn whom(w: Whom) -> &'static str {
    match w {
        Whom::NewReaders => "breaks consumers on the new schema",
        Whom::OldReaders => "breaks consumers on older versions",
    }
}

fn print_text(c: &Checked) {
    let head = match (&c.verdict, c.latest) {
        (Verdict::New, _) => "new subject: registers as version 1".to_string(),
        (Verdict::Unchanged, Some(v)) => format!("unchanged (version {v})"),
        (Verdict::Compatible, Some(v)) => {
            format!("compatible with version {v} under {}", c.mode)
        }
        (Verdict::Incompatible, Some(v)) => {
            format!("INCOMPATIBLE with version {v} under {}", c.mode)
        }
        (_, None) => "?".into(),
    };
    println!("{:<20} {}  {head}", c.event_type, c.subject);
    println!("{:<20} {}", "", c.file);
    for b in &c.breaks {
        let field = b
            .field
            .as_deref()
            .map(|f| format!("field `{f}`"))
            .unwrap_or_else(|| "the record".into());
        println!(
            "{:<20}   {field} ({}, against v{}): {}",
            "",
            whom(b.whom),
            b.against,
            b.detail
        );
    }
    if c.verdict == Verdict::Incompatible && c.breaks.is_empty() {
        for m in &c.registry_messages {
            println!("{:<20}   registry: {m}", "");
        }
    }
    for n in &c.notes {
        println!("{:<20}   note: {n}", "");
    }
    if let Some((id, v)) = c.registered {
        println!("{:<20}   registered: version {v}, id {id}", "");
    }
}

/// Runs `helios schemas ...`: exit 0 when everything passes, 1 when the registry would refuse
/// something, 2 when the check could not be made (the registry did not answer, a schema file is
/// invalid), so that a pipeline tells "incompatible" from "could not tell".
pub async fn run(cmd: SchemasCommand) -> anyhow::Result<ExitCode> {
    match check_all(cmd).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn check_all(cmd: SchemasCommand) -> anyhow::Result<ExitCode> {
    let (args, register) = match cmd {
        SchemasCommand::Check(a) => (a, false),
        SchemasCommand::Register(a) => (a, true),
    };
    let topology = Topology::load(&args.topology)?;
    let schemas = SchemaSet::load(&topology)?;
    let registry = Registry::new(&args.registry)?;
    let mut chosen: Vec<(&String, &TypeSchema)> = schemas
        .iter()
        .filter(|(t, _)| args.types.is_empty() || args.types.contains(t))
        .collect();
    for t in &args.types {
        if schemas.get(t).is_none() {
            anyhow::bail!(
                "event type `{t}` has no schema in {} (declared types with a schema: {})",
                args.topology.display(),
                schemas
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    chosen.sort_by(|a, b| a.0.cmp(b.0));
    let mut results = vec![];
    for (t, ts) in chosen {
        let mut c = check_one(&registry, t, ts).await?;
        if register && matches!(c.verdict, Verdict::New | Verdict::Compatible) {
            let id = registry.register(&c.subject, &ts.text).await?;
            let v = registry.versions(&c.subject).await?.into_iter().max();
            c.registered = Some((id, v.unwrap_or(1)));
        }
        results.push(c);
    }
    let refused = results
        .iter()
        .filter(|c| c.verdict == Verdict::Incompatible)
        .count();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "registry": registry.url(),
                "schemas": results,
                "incompatible": refused,
            }))?
        );
    } else {
        println!("{} schema(s) against {}:", results.len(), registry.url());
        for c in &results {
            print_text(c);
        }
        match (refused, register) {
            (0, false) => println!("Every schema can be registered."),
            (0, true) => println!("Done: every schema is registered."),
            (n, false) => println!("{n} schema(s) would be refused by the registry."),
            (n, true) => println!("{n} schema(s) refused: not registered (the others are)."),
        }
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
