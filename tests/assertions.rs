//! Assertions that cannot fail, caught before they land: every metric series is registered
//! at 0 when the proxy starts, so an assertion that `/metrics` merely contains a series (or a
//! label) holds whether or not anything happened. A metric assertion reads the value before
//! and after instead (`RunningProxy::metric`, `metric_value`).

use std::path::Path;

/// The assertion macros whose arguments are scanned.
const ASSERTS: [&str; 5] = [
    "assert!(",
    "assert_eq!(",
    "assert_ne!(",
    "prop_assert!(",
    "debug_assert!(",
];

/// Text inside an assertion that only asks whether `/metrics` shows a series or a label.
const PRESENCE: [&str; 4] = [
    ".contains(\"roleproxy_",
    ".contains(&format!(\"roleproxy_",
    "metrics.contains(",
    "metrics\n.contains(",
];

/// The arguments of `open` (the index just past an assertion's opening parenthesis) up to its
/// closing parenthesis, string literals (and a `'"'` character) skipped over.
fn arguments(text: &str, open: usize) -> &str {
    let bytes = text.as_bytes();
    let (mut depth, mut i, mut in_string) = (1usize, open, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'\'' if !in_string && bytes.get(i + 1..i + 3) == Some(b"\"'") => i += 2,
            b'"' => in_string = !in_string,
            b'(' if !in_string => depth += 1,
            b')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..i];
                }
            }
            _ => {}
        }
        i += 1;
    }
    &text[open..]
}

/// Each assertion in `text` that only checks that a metric series exists, by line number.
fn presence_checks(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for assert in ASSERTS {
        for (at, _) in text.match_indices(assert) {
            // `debug_assert!(` also matches `assert!(`; count it once.
            if assert == "assert!(" && text[..at].ends_with("debug_") {
                continue;
            }
            if assert == "assert!(" && text[..at].ends_with("prop_") {
                continue;
            }
            let args = arguments(text, at + assert.len());
            // Whitespace between a receiver and `.contains(` is the formatter's, not a change.
            let squeezed: String = args.lines().map(str::trim).collect::<Vec<_>>().join("\n");
            if PRESENCE.iter().any(|p| squeezed.contains(p)) {
                let line = text[..at].matches('\n').count() + 1;
                let first = args.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                found.push((line, first.trim().to_string()));
            }
        }
    }
    found.sort();
    found
}

/// The Rust files of `dir` and of its subdirectories.
fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn no_metric_assertion_only_checks_that_a_series_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The integration tests, the testkit's helpers and the unit tests beside the code.
    let mut scanned = 0;
    let mut offenders = Vec::new();
    for dir in ["tests", "testkit/src", "src"] {
        let files = rust_files(&root.join(dir));
        assert!(files.len() >= 10, "only {} files in {dir}", files.len());
        for path in files {
            if path.ends_with("tests/assertions.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            scanned += 1;
            for (line, what) in presence_checks(&text) {
                offenders.push(format!("{}:{line}: {what}", path.display()));
            }
        }
    }
    assert!(scanned >= 60, "only {scanned} files scanned");
    assert!(
        offenders.is_empty(),
        "assertions that hold whether or not anything happened (every series exists from \
         start-up); read the value before and after instead:\n{}",
        offenders.join("\n")
    );
}

/// The forms the suite once had, each of which the scan must report.
#[test]
fn the_scan_reports_the_forms_that_were_in_the_suite() {
    let caught = [
        "assert!(\n        metrics.contains(\"roleproxy_sessions_total{listener=\\\"leader\\\",result=\\\"drained\\\"}\"),\n        \"{metrics}\"\n    );",
        "assert!(metrics.contains(\"roleproxy_split_brain_total\"), \"{metrics}\");",
        "assert!(metrics.contains(\"result=\\\"timeout\\\"\"), \"{metrics}\");",
        "assert!(\n        metrics\n            .contains(\"roleproxy_sessions_total{listener=\\\"leader\\\",result=\\\"transaction_end\\\"}\"),\n        \"{metrics}\"\n    );",
        "assert!(\n        metrics.contains(\"result=\\\"error\\\"\") || metrics.contains(\"result=\\\"closed\\\"\"),\n        \"{metrics}\"\n    );",
        "assert!(\n        metrics.contains(&format!(\n            \"roleproxy_postgres_probes_total{{backend=\\\"{leader}\\\",result=\\\"alive\\\"}}\"\n        )),\n        \"{metrics}\"\n    );",
        "assert!(metrics.contains(\"roleproxy_leader_changes_total\"));",
        "for name in names {\n        assert!(metrics.contains(name), \"/metrics has {name}\");\n    }",
        "assert!(text.contains(&format!(\"roleproxy_checks_total{{backend=\\\"{b}\\\"\")));",
        "assert_ne!(metrics.contains(\"roleproxy_split_brain_total\"), false);",
        "assert!(line.split('\"').count() > 1 && metrics.contains(\"roleproxy_paused\"));",
    ];
    for snippet in caught {
        assert_eq!(
            presence_checks(snippet).len(),
            1,
            "not reported:\n{snippet}"
        );
    }
    let fine = [
        "assert_eq!(proxy.metric(&drained).await, before + 1.0);",
        "assert!(proxy.metric(\"roleproxy_leader_changes_total\").await > changes);",
        "assert!(body.contains(expected), \"{path}: {body}\");",
        "assert!(message.contains(\"no leader available\"), \"{message}\");",
    ];
    for snippet in fine {
        assert!(presence_checks(snippet).is_empty(), "reported:\n{snippet}");
    }
}
