//! The proxy crate's imports flow one way: names → addresses → roles → route → sessions. A
//! module that imports one which imports it back has no place to start reading, so import
//! cycles fail the build. Test modules (`#[cfg(test)]`) may import anything. Between crates
//! the compiler keeps the order: the core crate cannot import the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `module → modules it imports`, read from `src/`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let modules: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect();
    modules
        .iter()
        .map(|module| {
            let path = src.join(format!("{module}.rs"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let imports = crate_paths(&without_tests_and_comments(&text))
                .into_iter()
                .filter(|m| m != module && modules.contains(m))
                .collect();
            (module.clone(), imports)
        })
        .collect()
}

/// The text before the first `#[cfg(test)]`, without `//` comments.
fn without_tests_and_comments(text: &str) -> String {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path, also inside `crate::{a::X, b}` groups.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (start, _) in code.match_indices("crate::") {
        let rest = &code[start + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                            found.insert(identifier(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                found.insert(identifier(rest));
            }
        }
    }
    found
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Groups of two or more modules that reach each other through imports.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    let reaches = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reaches(m))).collect();
    graph
        .keys()
        .map(|m| {
            graph
                .keys()
                .filter(|other| {
                    *other == m || (reach[m].contains(*other) && reach[other].contains(m))
                })
                .cloned()
                .collect::<Vec<_>>()
        })
        .filter(|group| group.len() > 1)
        .collect()
}

#[test]
fn imports_form_no_cycles() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 10, "only {} modules found", graph.len());
    if let Some(group) = cycles(&graph).first() {
        let imports = group
            .iter()
            .map(|m| format!("{m} imports {:?}", graph[m]))
            .collect::<Vec<_>>()
            .join("; ");
        panic!("import cycle among {group:?}: {imports}");
    }
}

/// The Layout table in `docs/how-it-works.md` is where a newcomer starts: it names every
/// module, and no other.
#[test]
fn the_layout_table_names_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = module_graph(&root.join("src"));
    let layout =
        std::fs::read_to_string(root.join("docs/how-it-works.md")).expect("docs/how-it-works.md");
    let listed: BTreeSet<String> = layout
        .lines()
        .filter_map(|l| {
            l.strip_prefix("| `src/")?
                .split_once(".rs`")
                .map(|(m, _)| m.to_owned())
        })
        .filter(|m| m != "main" && m != "lib")
        .collect();
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    assert_eq!(
        listed, modules,
        "the Layout table of docs/how-it-works.md against src/lib.rs"
    );
}

#[test]
fn grouped_and_nested_imports_are_read() {
    let code = "use crate::{config::{A, B}, leader};\nlet x = crate::metrics::f();\n";
    let want: BTreeSet<String> = ["config", "leader", "metrics"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(crate_paths(code), want);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
        ("d", &["a"][..]),
    ]
    .iter()
    .map(|(m, deps)| (m.to_string(), deps.iter().map(|d| d.to_string()).collect()))
    .collect();
    let want: BTreeSet<Vec<String>> =
        [vec!["a".to_string(), "b".to_string(), "c".to_string()]].into();
    assert_eq!(cycles(&graph), want);
}
