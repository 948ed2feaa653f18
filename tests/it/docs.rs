//! The README's configuration table says what the binary does: every documented flag exists,
//! reads the documented environment variable and has the documented default (`--help`).

use std::collections::HashMap;

/// (flag → (env, default)) of one command's `--help`, the environment left out so that the
/// defaults shown are the binary's own.
fn help_of(args: &[&str]) -> HashMap<String, (Option<String>, Option<String>)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
        .args(args)
        .arg("--help")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .output()
        .expect("helios --help");
    assert!(out.status.success(), "helios {args:?} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("--").or_else(|| {
            // `-h, --help` style lines.
            t.split_once(", --").map(|(_, r)| r)
        }) {
            let name = format!("--{}", rest.split([' ', '=', '<']).next().unwrap_or(""));
            flags.insert(name.clone(), (None, None));
            current = Some(name);
            // Short help puts the tags on the flag's own line.
        }
        let Some(name) = &current else { continue };
        let entry = flags.get_mut(name).unwrap();
        for (tag, slot) in [("[env: ", &mut entry.0), ("[default: ", &mut entry.1)] {
            if let Some(i) = t.find(tag) {
                let v = &t[i + tag.len()..];
                let v = v[..v.find(']').unwrap_or(v.len())].trim_end_matches('=');
                *slot = Some(v.to_string());
            }
        }
    }
    flags
}

#[test]
fn the_readme_configuration_table_matches_the_binary() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut helps = HashMap::new();
    for cmd in ["run", "process", "demo", "migrate", "reconcile", "status"] {
        helps.insert(cmd, help_of(&[cmd]));
    }
    let mut checked = 0;
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches('|').trim())
            .collect();
        if cells.len() < 3 {
            continue;
        }
        let env = cells[0].trim_matches('`');
        let (cmd, flag) = match cells[1].trim_matches('`').split_once(' ') {
            Some((cmd, flag)) => (cmd, flag),
            None => ("run", cells[1].trim_matches('`')),
        };
        if !flag.starts_with("--") {
            continue; // read from the environment only
        }
        let cmd = if flag == "--metrics-addr" && cmd == "run" {
            "process"
        } else {
            cmd
        };
        let help = &helps[cmd];
        let (help_env, help_default) = help.get(flag).unwrap_or_else(|| {
            panic!("README documents `{flag}`, which `helios {cmd} --help` lacks")
        });
        assert_eq!(
            help_env.as_deref(),
            Some(env),
            "`{flag}`: README says {env}, --help says {help_env:?}"
        );
        let documented = cells[2];
        if documented.starts_with('`') && documented.ends_with('`') && documented != "`\"\"`" {
            let documented = documented.trim_matches('`');
            assert_eq!(
                help_default.as_deref(),
                Some(documented),
                "`{flag}` ({env}): README says the default is `{documented}`, --help says {help_default:?}"
            );
        } else {
            assert!(
                help_default.is_none() || documented.contains('`'),
                "`{flag}` ({env}): README gives no default, --help says {help_default:?}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 25,
        "only {checked} rows of the configuration table were checked"
    );
}
