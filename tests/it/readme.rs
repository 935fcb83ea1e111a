//! The README's command reference matches `courier --help` and every subcommand's help:
//! the same commands, the same flags, the same one-line descriptions, both ways.

use std::collections::BTreeMap;
use std::process::Command;

fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "courier {path:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Subcommand names listed under "Commands:" (without `help`).
fn subcommands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1);
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
        if let Some(name) = l
            .strip_prefix("  ")
            .and_then(|r| r.split_whitespace().next())
        {
            if !l.starts_with("   ") && name != "help" {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Long flags of a leaf command, in help order, without the global and built-in ones.
fn flags(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let t = if t.starts_with('-') && !t.starts_with("--") {
                t.split_once(", ").map_or(t, |(_, r)| r)
            } else {
                t
            };
            let name = t.strip_prefix("--")?;
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!["help", "version", "log-format"].contains(&name.as_str()))
                .then(|| format!("--{name}"))
        })
        .collect()
}

/// Every leaf command: path -> (flags, first help line).
fn leaves(path: Vec<String>, out: &mut BTreeMap<String, (Vec<String>, String)>) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = help(&args);
    let subs = subcommands(&text);
    if subs.is_empty() {
        let about = text.lines().next().unwrap_or_default().to_string();
        out.insert(path.join(" "), (flags(&text), about));
    } else {
        for s in subs {
            let mut p = path.clone();
            p.push(s);
            leaves(p, out);
        }
    }
}

#[test]
fn readme_command_reference_matches_the_help() {
    let mut from_help = BTreeMap::new();
    leaves(Vec::new(), &mut from_help);
    assert!(from_help.len() >= 10, "{from_help:?}");

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## Command reference")
        .nth(1)
        .expect("README has a command reference")
        .split("\n## ")
        .next()
        .unwrap();
    let mut from_readme = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("- `courier ")) {
        let (cmd, rest) = line["- `courier ".len()..]
            .split_once("`: ")
            .unwrap_or_else(|| panic!("malformed reference line: {line}"));
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let path: Vec<&str> = words
            .iter()
            .take_while(|w| !w.starts_with("--"))
            .copied()
            .collect();
        let flags: Vec<String> = words[path.len()..].iter().map(|s| s.to_string()).collect();
        from_readme.insert(path.join(" "), (flags, rest.to_string()));
    }
    for (path, (flags, about)) in &from_help {
        let Some((rflags, rabout)) = from_readme.get(path) else {
            panic!("README's command reference lacks `courier {path}`");
        };
        assert_eq!(
            rflags, flags,
            "flags of `courier {path}` differ from its --help"
        );
        assert_eq!(
            rabout, about,
            "description of `courier {path}` differs from its --help"
        );
    }
    for path in from_readme.keys() {
        assert!(
            from_help.contains_key(path),
            "README lists `courier {path}`, which the binary does not have"
        );
    }
}
