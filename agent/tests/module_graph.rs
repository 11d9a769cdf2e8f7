//! The architecture's import rules, checked on the source (ARCHITECTURE.md, "Code map"):
//! the top-level modules of the agent import each other in one direction only, and the
//! domain logic imports no actor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("read agent/src");
    for e in entries {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Lines of code (comment lines left out).
fn code_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read source")
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .map(str::to_owned)
        .collect()
}

/// The `crate::NAME` paths a line uses.
fn crate_refs(line: &str) -> impl Iterator<Item = &str> {
    line.match_indices("crate::").map(move |(i, m)| {
        let rest = &line[i + m.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    })
}

fn src_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level module of a source file (`inventory` for `src/inventory/drift/actor.rs`).
fn top_module(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

#[test]
fn top_level_modules_import_each_other_in_one_direction_only() {
    let root = src_root();
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top_module(&root, f);
        for line in code_lines(f) {
            for to in crate_refs(&line) {
                if !to.is_empty() && to != from {
                    edges
                        .entry(from.clone())
                        .or_default()
                        .insert(to.to_string());
                }
            }
        }
    }
    assert!(edges.len() > 5, "the scan found the modules: {edges:?}");
    // A cycle exists when some module reaches itself again.
    for start in edges.keys() {
        let mut stack: Vec<(String, Vec<String>)> = edges[start]
            .iter()
            .map(|n| (n.clone(), vec![start.clone(), n.clone()]))
            .collect();
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            assert!(
                &node != start,
                "import circle between the agent's modules: {}",
                path.join(" -> ")
            );
            if !seen.insert(node.clone()) {
                continue;
            }
            for next in edges.get(&node).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
}

#[test]
fn domain_logic_imports_no_actor() {
    let root = src_root();
    let mut checked = 0;
    for module in ["inventory", "remove", "usage", "contents", "fsx", "planner"] {
        let mut files = Vec::new();
        sources(&root.join(module), &mut files);
        for f in files.iter().filter(|f| !f.ends_with("actor.rs")) {
            checked += 1;
            for line in code_lines(f) {
                assert!(
                    !line.contains("actix") && !line.contains("actor::"),
                    "{} is domain logic but reaches an actor: {line}",
                    f.display()
                );
            }
        }
    }
    assert!(checked > 20, "checked {checked} files");
}
