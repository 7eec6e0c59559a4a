//! The workspace's boundaries, checked from its sources and its manifest (docs/architecture.md):
//! `mira-config` depends on no Mira crate, and no file of a crate reaches, through paths, a
//! file that reaches it back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn config_depends_on_no_mira_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let deps = |name: &str| -> Vec<String> {
        packages
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in the workspace"))["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let ours: Vec<String> = deps("mira-config")
        .into_iter()
        .filter(|d| d.starts_with("mira-"))
        .collect();
    assert!(ours.is_empty(), "mira-config depends on {ours:?}");
    // The check sees a dependency where there is one.
    assert!(deps("mira-bus").contains(&"mira-config".to_owned()));
}

/// A crate's modules: module path (`["api", "jobs"]`) → file.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut map = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let mut path: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        let last = path.pop().unwrap();
        let stem = last.trim_end_matches(".rs").to_owned();
        if path.is_empty() && (stem == "lib" || stem == "main") {
            // The crate root; a crate with both gets the library as its root.
            if stem == "main" && src.join("lib.rs").exists() {
                continue;
            }
        } else if stem != "mod" {
            path.push(stem);
        }
        map.insert(path, f);
    }
    map
}

/// The source before its first `#[cfg(test)]` item: tests may reach anything.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let end = text.find("\n#[cfg(test)]").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The modules `module`'s file names through `crate::…`, `super::…` and `child::…` paths
/// (including `{a, b}` groups one level deep).
fn references(module: &[String], text: &str, all: &BTreeMap<Vec<String>, PathBuf>) -> BTreeSet<Vec<String>> {
    let resolve = |base: Vec<String>, rest: &str| -> Vec<Vec<String>> {
        // `rest` starts after `base::`: a path, or a `{…}` group of paths.
        let heads: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            inner.split(',').map(|p| p.trim().to_owned()).collect()
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            vec![rest[..end].to_owned()]
        };
        heads
            .into_iter()
            .map(|h| {
                let mut at = base.clone();
                for seg in h.split("::").filter(|s| !s.is_empty()) {
                    let mut next = at.clone();
                    next.push(ident_at(seg).to_owned());
                    if all.contains_key(&next) {
                        at = next;
                    } else {
                        break;
                    }
                }
                at
            })
            .collect()
    };
    let children: Vec<&Vec<String>> = all
        .keys()
        .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
        .collect();
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices("::") {
        // The identifier before `::`, when it starts a path.
        let start = text[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        if start > 0 && (bytes[start - 1] == b':' || bytes[start - 1] == b'.') {
            continue;
        }
        let head = &text[start..i];
        let rest = &text[i + 2..];
        let targets = match head {
            "crate" => resolve(Vec::new(), rest),
            "super" => resolve(module[..module.len().saturating_sub(1)].to_vec(), rest),
            h => match children.iter().find(|c| c.last().is_some_and(|l| l == h)) {
                Some(c) => resolve((*c).clone(), rest),
                None => continue,
            },
        };
        for t in targets {
            if t != module {
                out.insert(t);
            }
        }
    }
    out
}

/// A cycle through `graph`, if there is one.
fn cycle(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    fn visit(
        n: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let from = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[from..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn graph_of(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let all = modules(src);
    all.iter()
        .map(|(m, f)| (m.clone(), references(m, &code(f), &all)))
        .collect()
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let root = workspace();
    let mut crates = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.join("lib.rs").exists() && !src.join("main.rs").exists() {
            continue;
        }
        crates += 1;
        if let Some(c) = cycle(&graph_of(&src)) {
            let names: Vec<String> = c
                .iter()
                .map(|m| (if m.is_empty() { "(root)".into() } else { m.join("::") }).to_string())
                .collect();
            panic!("{}: an import circle: {}", src.display(), names.join(" → "));
        }
    }
    assert!(crates >= 10, "found {crates} crates");
}

#[test]
fn the_circle_check_sees_a_circle() {
    let dir = std::env::temp_dir().join(format!("mira-arch-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("api")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod api;\npub mod dev;\npub mod server;\n").unwrap();
    std::fs::write(
        src.join("api/mod.rs"),
        "pub mod jobs;\npub const P: &str = crate::dev::PATH;\n",
    )
    .unwrap();
    std::fs::write(src.join("api/jobs.rs"), "use super::P;\n").unwrap();
    std::fs::write(
        src.join("dev.rs"),
        "pub const PATH: &str = \"/\";\nfn f() { crate::server::run() }\n",
    )
    .unwrap();
    std::fs::write(src.join("server.rs"), "use crate::api::{jobs, P};\npub fn run() {}\n").unwrap();
    let c = cycle(&graph_of(&src)).expect("a circle");
    assert!(
        c.contains(&vec!["dev".to_string()]) && c.contains(&vec!["server".to_string()]),
        "{c:?}"
    );
    // Without the edge back, none.
    std::fs::write(src.join("server.rs"), "pub fn run() {}\n").unwrap();
    assert_eq!(cycle(&graph_of(&src)), None);
    // A parent using its child that reaches back into the parent is a circle too.
    std::fs::write(
        src.join("api/mod.rs"),
        "pub mod jobs;\npub const P: &str = \"/\";\npub fn r() { jobs::list() }\n",
    )
    .unwrap();
    std::fs::write(src.join("api/jobs.rs"), "use super::P;\npub fn list() {}\n").unwrap();
    let c = cycle(&graph_of(&src));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(c.is_some_and(|c| c.contains(&vec!["api".to_string(), "jobs".to_string()])));
}
