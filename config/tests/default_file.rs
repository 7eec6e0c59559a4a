//! `config.default.toml` documents every setting with its default (CONVENTIONS item 6): loading
//! it gives exactly the defaults, the examples it leaves commented out load too (so their names
//! and types are right), and every field of `Settings` is there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mira_config::Settings;

fn file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.default.toml")
}

/// The file with its commented-out examples (`# Key = value`) made live.
fn with_examples() -> String {
    std::fs::read_to_string(file())
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest.to_owned(),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `Key = value`, where the key is a name.
fn is_setting(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(k, v)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !v.trim().is_empty()
    })
}

fn snake(name: &str) -> String {
    // `DATABASE_URL` and `MIRA_COMMIT` are the fields `database_url` and `commit`.
    match name {
        "DATABASE_URL" => return "database_url".into(),
        "MIRA_COMMIT" => return "commit".into(),
        "AWS" => return "aws".into(),
        "XRay" => return "xray".into(),
        "KMS" => return "kms".into(),
        "SNS" => return "sns".into(),
        "SQS" => return "sqs".into(),
        "S3" => return "s3".into(),
        _ => {}
    }
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every key the file names (live or commented out), and every section, as dotted paths of Rust
/// field names (`database.max_connections`, `aws.s3`).
fn documented() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section: Vec<String> = Vec::new();
    for line in with_examples().lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.split('.').map(snake).collect();
            for i in 1..=section.len() {
                keys.insert(section[..i].join("."));
            }
        } else if !line.starts_with('#') {
            if let Some((k, _)) = line.split_once(" = ") {
                let mut path = section.clone();
                path.push(snake(k.trim()));
                keys.insert(path.join("."));
            }
        }
    }
    keys
}

/// Every field of `Settings` and its sections as a dotted path, from its `Debug` form (four
/// spaces a level; a field that opens a struct or an option holds what is indented under it).
fn fields(s: &Settings) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut open: Vec<(usize, String)> = Vec::new();
    for line in format!("{s:#?}").lines() {
        let indent = line.len() - line.trim_start().len();
        let Some((name, rest)) = line.trim_start().split_once(": ") else {
            continue;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        open.retain(|(i, _)| *i < indent);
        let path: Vec<&str> = open.iter().map(|(_, n)| n.as_str()).chain([name]).collect();
        out.insert(path.join("."));
        if rest.ends_with('{') || rest.ends_with('(') || rest.ends_with('[') {
            open.push((indent, name.to_owned()));
        }
    }
    out
}

#[test]
fn the_default_file_gives_the_defaults() {
    let from_file = Settings::load(Some(&file()), std::iter::empty()).unwrap();
    let defaults = Settings::load(None, std::iter::empty()).unwrap();
    assert_eq!(from_file, defaults);
}

/// The file with every example set, read as settings: names and types checked, but not the
/// rules between settings (some examples are alternatives, as their comments say).
fn all_examples() -> Settings {
    toml::from_str(&with_examples()).unwrap_or_else(|e| panic!("config.default.toml's examples: {e}"))
}

#[test]
fn the_default_files_examples_load() {
    assert!(all_examples().database_url.is_some(), "the examples set DATABASE_URL");
}

#[test]
fn every_setting_is_documented() {
    // With every example set, every optional section is there to list its fields too.
    let have = fields(&all_examples());
    assert!(have.len() >= 83, "the settings' fields as read: {have:?}");
    assert!(
        have.contains("aws.s3.bucket_name") && have.contains("database.max_connections"),
        "{have:?}"
    );
    let documented = documented();
    let missing: Vec<_> = have.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "settings config.default.toml does not document: {missing:?}"
    );
    // And the check sees a missing one.
    let mut fewer = documented.clone();
    fewer.remove("api.max_connections");
    assert!(
        have.difference(&fewer).any(|f| f == "api.max_connections"),
        "a setting named as another section's is still missed"
    );
}
