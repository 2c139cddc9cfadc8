//! The layering rules of docs/ARCHITECTURE.md, checked on the source: which module may
//! name which, that the modules of each crate form no cycle, and where unit tests live.
//! A rule broken by a change fails here with the file and line, instead of surviving
//! until someone reads the tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Unit tests inline in a source file up to this many lines; longer ones go beside the
/// module, in `<module>/tests.rs` (`#[cfg(test)] mod tests;`).
const INLINE_TESTS_MAX_LINES: usize = 300;

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

/// Every `.rs` file under `dir`, with its path relative to `dir`.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read the source tree") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((
                    rel,
                    std::fs::read_to_string(&p).expect("read a source file"),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The file's code without comments and without its unit tests (which may reach
/// anything they test with).
fn code_lines(text: &str) -> Vec<(usize, &str)> {
    let end = text.find("\n#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split("//").next().unwrap_or("")))
        .collect()
}

fn is_test_file(rel: &str) -> bool {
    rel.ends_with("/tests.rs") || rel.ends_with("/testing.rs")
}

/// The top-level module a file belongs to (`manager/jobs.rs` → `manager`).
fn top_module(rel: &str) -> &str {
    let first = rel.split('/').next().unwrap_or(rel);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// `crate::<module>` paths named by code in `file`, with their lines.
fn crate_paths(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (n, line) in code_lines(text) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name_end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push((n, &rest[..name_end]));
        }
    }
    out
}

/// Where files under `from` name `crate::<to>`.
fn references(krate: &str, from: &str, to: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (rel, text) in sources(&crate_src(krate)) {
        if top_module(&rel) != from || is_test_file(&rel) {
            continue;
        }
        for (n, m) in crate_paths(&text) {
            if to.contains(&m) {
                found.push(format!("{krate}/src/{rel}:{n} names crate::{m}"));
            }
        }
    }
    found
}

#[test]
fn the_manager_speaks_no_protocol_and_the_io_path_and_offline_cli_know_no_manager() {
    let mut broken = references("backend", "manager", &["mgmt", "offline"]);
    broken.extend(references("backend", "offline", &["manager"]));
    broken.extend(references("backend", "blk", &["manager", "mgmt"]));
    broken.extend(references("backend", "events", &["mgmt", "manager"]));
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn qmp_is_spoken_by_mgmt_alone() {
    let mut broken = Vec::new();
    for (rel, text) in sources(&crate_src("backend")) {
        if top_module(&rel) == "mgmt" {
            continue;
        }
        for (n, line) in code_lines(&text) {
            if line.contains("QmpError") {
                broken.push(format!("backend/src/{rel}:{n}"));
            }
        }
    }
    assert!(broken.is_empty(), "QmpError outside mgmt: {broken:?}");
}

/// The graph of which top-level module's code names which, and a cycle in it if any.
fn module_cycle(krate: &str) -> Option<Vec<String>> {
    let files = sources(&crate_src(krate));
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(rel, _)| top_module(rel).to_string())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in &files {
        let from = top_module(rel);
        if !modules.contains(from) || is_test_file(rel) {
            continue;
        }
        for (_, to) in crate_paths(text) {
            if to != from && modules.contains(to) {
                edges
                    .entry(from.to_string())
                    .or_default()
                    .insert(to.to_string());
            }
        }
    }
    // Depth-first search; a module met again while on the path closes a cycle.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in &modules {
        if let Some(c) = visit(m, &edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_of_a_crate_names_one_that_names_it_back() {
    let cycles: Vec<String> = ["backend", "thinpool", "vmm-config"]
        .into_iter()
        .filter_map(|k| module_cycle(k).map(|c| format!("{k}: {}", c.join(" → "))))
        .collect();
    assert!(cycles.is_empty(), "modules in a cycle: {cycles:?}");
}

#[test]
fn long_unit_tests_live_beside_their_module() {
    let mut long = Vec::new();
    for krate in ["backend", "thinpool", "vmm-config", "bench"] {
        for (rel, text) in sources(&crate_src(krate)) {
            if let Some(start) = text.find("\n#[cfg(test)]\nmod tests {") {
                let lines = text[start..].lines().count();
                if lines > INLINE_TESTS_MAX_LINES {
                    long.push(format!("{krate}/src/{rel}: {lines} lines of tests"));
                }
            }
        }
    }
    assert!(
        long.is_empty(),
        "move these to <module>/tests.rs: {}",
        long.join(", ")
    );
}
