//! The crate's modules depend on each other one way only: no cycle among the top-level
//! modules, and none among the children of one module.
//!
//! Checked over the source text, as a newcomer reads it: a file of module `a` that names
//! `crate::b` depends on `b`; a child file that names `super::c` (or `crate::a::c`) depends
//! on its sibling `c`. Test modules (from a file's first `#[cfg(test)]` on) and comments do
//! not count. A glob import (`use super::*`) names nothing and is not seen.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A file's text without its tests and comment lines.
fn source(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names right after `prefix::` in `text`, one level deep: `prefix::a::x` gives `a`,
/// `prefix::{a, b::{c, d}}` gives `a` and `b`.
fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let needle = format!("{prefix}::");
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices(&needle) {
        // Not the start of a path: `xsuper::`, or the second `super` of `super::super::`.
        let before = &text[..at];
        if before.ends_with("::") || before.chars().next_back().is_some_and(ident) {
            continue;
        }
        let rest = &text[at + needle.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut expect = true;
            let mut chars = group.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                match c {
                    '{' => {
                        depth += 1;
                        expect = false;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect = true,
                    c if depth == 1 && expect && ident(c) => {
                        let end = group[i..]
                            .find(|c: char| !ident(c))
                            .map_or(group.len(), |n| i + n);
                        out.insert(group[i..end].to_string());
                        while chars.peek().is_some_and(|(j, _)| *j < end) {
                            chars.next();
                        }
                        expect = false;
                    }
                    _ => {}
                }
            }
        } else {
            let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            if end > 0 && !["super", "self"].contains(&&rest[..end]) {
                out.insert(rest[..end].to_string());
            }
        }
    }
    out
}

/// Every `.rs` file at or below `path` (a file, or a module's directory).
fn files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let p = entry.expect("directory entry").path();
        if p.is_dir() || p.extension().is_some_and(|x| x == "rs") {
            out.extend(files(&p));
        }
    }
    out
}

/// The modules declared by the files in `dir` (`x.rs` or `x/`), by name, with their path;
/// `mod.rs`, `lib.rs` and `main.rs` are the parent, not modules of their own.
fn modules(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = entry.expect("directory entry").path();
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if p.is_dir()
            || (p.extension().is_some_and(|x| x == "rs") && !["mod", "lib", "main"].contains(&stem))
        {
            out.insert(stem.to_string(), p);
        }
    }
    out
}

/// A cycle of `graph`, as the path that closes it, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        graph: &'a Graph,
        node: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| *n == node) {
            let mut c: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

/// Which top-level module depends on which.
fn top_level(src: &Path) -> Graph {
    let mods = modules(src);
    let mut graph = Graph::new();
    for (name, path) in &mods {
        let deps = graph.entry(name.clone()).or_default();
        for f in files(path) {
            for r in referenced(&source(&f), "crate") {
                if r != *name && mods.contains_key(&r) {
                    deps.insert(r);
                }
            }
        }
    }
    graph
}

/// Which child of the module in `dir` depends on which sibling.
fn siblings(src: &Path, dir: &Path) -> Graph {
    let parent = dir
        .strip_prefix(src)
        .expect("below src")
        .to_string_lossy()
        .replace('/', "::");
    let kids = modules(dir);
    let mut graph = Graph::new();
    for (name, path) in &kids {
        let deps = graph.entry(name.clone()).or_default();
        let own = if path.is_dir() {
            path.join("mod.rs")
        } else {
            path.clone()
        };
        let mut refs = referenced(&source(&own), "super");
        for f in files(path) {
            refs.extend(referenced(&source(&f), &format!("crate::{parent}")));
        }
        deps.extend(
            refs.into_iter()
                .filter(|r| r != name && kids.contains_key(r)),
        );
    }
    graph
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_top_level_modules_depend_on_each_other_one_way() {
    let graph = top_level(&src());
    assert!(graph.contains_key("daemon") && graph.contains_key("control"));
    if let Some(c) = cycle(&graph) {
        panic!("module cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_children_of_each_module_depend_on_each_other_one_way() {
    let src = src();
    let mut dirs = vec![src.clone()];
    let mut checked = 0;
    while let Some(d) = dirs.pop() {
        for p in modules(&d).into_values().filter(|p| p.is_dir()) {
            if let Some(c) = cycle(&siblings(&src, &p)) {
                panic!(
                    "cycle among the children of {}: {}",
                    p.display(),
                    c.join(" -> ")
                );
            }
            checked += 1;
            dirs.push(p);
        }
    }
    assert!(checked >= 8, "only {checked} module directories found");
}

#[test]
fn the_check_sees_paths_groups_and_cycles() {
    let text = "use crate::{a::X, b::{c, d}, e};\nlet y = crate::f::g();\nsuper::super::h();\nfoo_super::i();";
    let got: Vec<_> = referenced(text, "crate").into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "f"]);
    assert!(
        referenced(text, "super").is_empty(),
        "super::super and foo_super are not siblings"
    );
    let g: Graph = [("a", "b"), ("b", "c"), ("c", "a")]
        .into_iter()
        .map(|(x, y)| (x.to_string(), BTreeSet::from([y.to_string()])))
        .collect();
    assert_eq!(cycle(&g).map(|c| c.len()), Some(4));
    let mut acyclic = g.clone();
    acyclic.remove("c");
    assert_eq!(cycle(&acyclic), None);
}
