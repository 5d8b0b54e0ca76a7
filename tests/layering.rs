//! The crate's dependency rules, read from the source: the two services
//! never import each other, the shared leaves import neither, and the
//! modules of `gatehouse db` form no cycle.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(under: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![under.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Files of module `name`: `src/name.rs` and everything under `src/name/`.
fn module(name: &str) -> Vec<PathBuf> {
    let mut files = sources(&src().join(name));
    let file = src().join(format!("{name}.rs"));
    if file.exists() {
        files.push(file);
    }
    assert!(!files.is_empty(), "no module {name}");
    files
}

fn uses(files: &[PathBuf], module: &str) -> Vec<String> {
    let needle = format!("crate::{module}");
    files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .any(|l| !l.trim_start().starts_with("//") && l.contains(&needle))
        })
        .map(|f| f.display().to_string())
        .collect()
}

#[test]
fn the_services_never_import_each_other() {
    assert_eq!(uses(&module("proxy"), "db"), Vec::<String>::new());
    assert_eq!(uses(&module("db"), "proxy"), Vec::<String>::new());
}

#[test]
fn shared_leaves_import_no_service() {
    for leaf in ["config", "admin", "net", "telemetry", "ratelimit", "cache"] {
        for service in ["proxy", "db"] {
            assert_eq!(
                uses(&module(leaf), service),
                Vec::<String>::new(),
                "{leaf} imports {service}"
            );
        }
    }
}

#[test]
fn the_db_modules_form_no_cycle() {
    let db = src().join("db");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let names: Vec<String> = std::fs::read_dir(&db)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    for name in &names {
        let mut files = sources(&db.join(name));
        files.push(db.join(format!("{name}.rs")));
        let targets = edges.entry(name.clone()).or_default();
        for file in files.iter().filter(|f| f.exists()) {
            // A module's own tests may use anything.
            if file.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            for other in &names {
                if other != name
                    && (text.contains(&format!("super::{other}::"))
                        || text.contains(&format!("super::{other}::{{"))
                        || text.contains(&format!("crate::db::{other}::")))
                {
                    targets.insert(other.clone());
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} -> {node}", path[at..].join(" -> "));
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for name in edges.keys() {
        visit(name, &edges, &mut Vec::new(), &mut done);
    }
}
