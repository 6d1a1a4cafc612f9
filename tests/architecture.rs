//! The module graph has no cycles: dependencies point one way, from the entry point down.
//!
//! Read from the source, not from the compiler: every `use` tree and every inline
//! `crate::…`/`super::…` path in `src/` (test modules excepted) is an edge from the module it is
//! written in to the deepest module it names. For each module, the edges between its children
//! (each child standing for everything below it) must form no cycle. Edges between a module and
//! its own ancestors or descendants do not count: a parent re-exporting its children, and a
//! child using what its parent defines, are one unit's inside.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

#[test]
fn the_module_graph_has_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(modules.len() > 20, "found only {} modules", modules.len());
    let mut edges: BTreeSet<(Module, Module)> = BTreeSet::new();
    for (module, file) in &modules {
        let text = code_of(&std::fs::read_to_string(file).unwrap());
        for path in referenced_paths(&text) {
            if let Some(target) = resolve(module, &path, &modules) {
                if !related(module, &target) {
                    edges.insert((module.clone(), target));
                }
            }
        }
    }
    assert!(!edges.is_empty(), "no edges found: the parser is broken");
    let cycles = cycles(&modules, &edges);
    assert!(
        cycles.is_empty(),
        "import cycles (move the shared piece down, or split the module):\n{}",
        cycles.join("\n")
    );
}

/// The parser sees what it must: these edges exist in the tree and must be found.
#[test]
fn known_edges_are_found() {
    let uses = referenced_paths(
        "use crate::config::{self, Env, matching::path_within};\nuse super::{a, b::{c, d as e}};\nfn f() { crate::metrics::Metrics::new(); }",
    );
    let shown: Vec<String> = uses.iter().map(|p| p.join("::")).collect();
    for want in [
        "crate::config",
        "crate::config::Env",
        "crate::config::matching::path_within",
        "super::a",
        "super::b::c",
        "super::b::d",
        "crate::metrics::Metrics::new",
    ] {
        assert!(shown.iter().any(|s| s == want), "{want} not in {shown:?}");
    }
}

/// Every `.rs` file under `src` and its module path (`lib.rs`/`main.rs` are the root).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().map_or(true, |e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            out.insert(module, path);
        }
    }
    out
}

/// The file's code without comments and without its test modules.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut skip_test_module = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            skip_test_module = true;
            continue;
        }
        if skip_test_module {
            // The attribute applies to the next item; only a `mod` block is skipped to its end.
            skip_test_module = false;
            if trimmed.starts_with("mod ") && trimmed.ends_with('{') {
                break; // test modules close the file in this code base
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every path a file names that starts with `crate`, `super` or `self`: the leaves of its `use`
/// trees, and inline paths in code.
fn referenced_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        let tree = without_renames(&rest[..end]);
        let mut leaves = Vec::new();
        use_tree(&tree, Vec::new(), &mut leaves);
        out.extend(leaves.into_iter().filter(|p| is_relative(p)));
    }
    // Inline paths: `crate::a::b` anywhere in the code.
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0
                && (bytes[at - 1].is_ascii_alphanumeric()
                    || bytes[at - 1] == b'_'
                    || bytes[at - 1] == b':')
            {
                continue;
            }
            let len = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(code.len() - at);
            let path: Vec<String> = code[at..at + len]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            out.push(path);
        }
    }
    out
}

fn is_relative(path: &[String]) -> bool {
    path.first()
        .is_some_and(|s| s == "crate" || s == "super" || s == "self")
}

/// Expands a `use` tree without whitespace (`a::{b,c::{d}}`) into its leaf paths.
fn use_tree(tree: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.strip_prefix("::").unwrap_or(tree);
    match tree.find('{') {
        Some(open) if tree.ends_with('}') => {
            let mut base = prefix;
            base.extend(segments(&tree[..open]));
            for item in split_top_level(&tree[open + 1..tree.len() - 1]) {
                use_tree(item, base.clone(), out);
            }
        }
        _ => {
            let mut path = prefix;
            path.extend(segments(tree).filter(|s| s != "self" && s != "*"));
            if !path.is_empty() {
                out.push(path);
            }
        }
    }
}

/// A `use` tree with its `as name` renames and all whitespace removed.
fn without_renames(tree: &str) -> String {
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "as" && i + 1 < words.len() {
            // Drop the new name, keep what follows it (`,` or `}`).
            let name = words[i + 1];
            let end = name
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(name.len());
            out.push_str(&name[end..]);
            i += 2;
        } else {
            out.push_str(words[i]);
            i += 1;
        }
    }
    out
}

fn segments(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Splits `a,b::{c,d},e` at the commas outside braces.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&list[start..]);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// The deepest module a path written in `module` names.
fn resolve(
    module: &Module,
    path: &[String],
    modules: &BTreeMap<Module, PathBuf>,
) -> Option<Module> {
    let mut full: Module = Vec::new();
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
        }
        Some("super") | Some("self") => {
            full = module.clone();
            while let Some(s) = segs.peek() {
                match s.as_str() {
                    "super" => {
                        full.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segs.next();
            }
        }
        _ => return None,
    }
    full.extend(segs.cloned());
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|m| modules.contains_key(m))
}

/// Whether one module is the other or contains it.
fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// For each module, the cycles among its children, described edge by edge.
fn cycles(modules: &BTreeMap<Module, PathBuf>, edges: &BTreeSet<(Module, Module)>) -> Vec<String> {
    let mut found = Vec::new();
    let parents: BTreeSet<Module> = modules
        .keys()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    for parent in parents {
        let depth = parent.len();
        // child -> child it depends on -> an example edge
        let mut graph: BTreeMap<&str, BTreeMap<&str, (&Module, &Module)>> = BTreeMap::new();
        for (a, b) in edges {
            if a.len() > depth
                && b.len() > depth
                && a.starts_with(&parent)
                && b.starts_with(&parent)
                && a[depth] != b[depth]
            {
                graph
                    .entry(a[depth].as_str())
                    .or_default()
                    .entry(b[depth].as_str())
                    .or_insert((a, b));
            }
        }
        let names: Vec<&str> = graph.keys().copied().collect();
        for start in names {
            if let Some(cycle) = cycle_through(&graph, start) {
                // Report each cycle once: from its smallest member.
                if cycle.iter().min() == Some(&start) {
                    let shown: Vec<String> = cycle
                        .iter()
                        .zip(cycle.iter().cycle().skip(1))
                        .map(|(x, y)| {
                            let (a, b) = graph[x][y];
                            format!("{} -> {} ({} uses {})", x, y, name(a), name(b))
                        })
                        .collect();
                    found.push(format!("in {}: {}", name(&parent), shown.join("; ")));
                }
            }
        }
    }
    found
}

/// A shortest cycle through `start`, if any (breadth-first back to it).
fn cycle_through<'a>(
    graph: &BTreeMap<&'a str, BTreeMap<&'a str, (&Module, &Module)>>,
    start: &'a str,
) -> Option<Vec<&'a str>> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &next in graph.get(node).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                let mut path = vec![node];
                let mut at = node;
                while at != start {
                    at = came_from[at];
                    path.push(at);
                }
                path.reverse();
                return Some(path);
            }
            if !came_from.contains_key(next) {
                came_from.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}
