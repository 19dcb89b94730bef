//! The shape of the house (docs/architecture.md): top-level modules only use their own layer
//! or layers below, there is no import cycle, no source file is over 1,200 lines and no
//! function over 150 lines outside tests. Test code (`#[cfg(test)]` sections and `tests.rs`
//! files) is exempt from the size limits and the layering.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top; a module may use modules of its own layer or any layer below.
const LAYERS: &[&[&str]] = &[
    &["error", "compute", "testing"],
    &["model"],
    &["buffer", "report"],
    &["advantage", "loss", "sampling"],
    &["rollout"],
    &["reward"],
    &["task", "env"],
    &["config"],
    &["train", "eval", "view"],
    &["experiment", "bench"],
];
const MAX_FILE_LINES: usize = 1200;
const MAX_FN_LINES: usize = 150;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The non-test code of a file: everything before its first `#[cfg(test)]`, nothing of a
/// `tests.rs` file.
fn code_of(path: &Path, text: &str) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    text.split("#[cfg(test)]").next().unwrap_or("").to_string()
}

/// A line with string and char literals and `//` comments blanked, for brace counting.
fn strip_literals(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            if c == '\\' {
                chars.next();
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '/' if chars.peek() == Some(&'/') => break,
            '\'' => {
                // A char literal ('{', '\n') is skipped; a lifetime ('a) is not a literal.
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    let n = rest.find('\'').map(|i| i + 1).unwrap_or(0);
                    for _ in 0..n.max(2) {
                        chars.next();
                    }
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// (length, name, line) of every `fn` with a body.
fn functions(code: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let name = t
            .split_whitespace()
            .skip_while(|w| {
                w.starts_with("pub") || ["async", "const", "unsafe", "extern"].contains(w)
            })
            .collect::<Vec<_>>();
        if name.first() == Some(&"fn") && name.len() > 1 {
            let fname = name[1].split(['(', '<']).next().unwrap_or("").to_string();
            let (mut depth, mut started, mut j) = (0i64, false, i);
            while j < lines.len() {
                let s = strip_literals(lines[j]);
                depth += s.matches('{').count() as i64 - s.matches('}').count() as i64;
                if s.contains('{') {
                    started = true;
                }
                if started && depth <= 0 {
                    break;
                }
                if !started && s.trim_end().ends_with(';') {
                    break;
                }
                j += 1;
            }
            if started {
                out.push((j - i + 1, fname, i + 1));
                i = j + 1;
                continue;
            }
        }
        i += 1;
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

#[test]
fn modules_point_down_files_and_functions_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = vec![];
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(path).unwrap();
        let code = code_of(path, &text);
        let n = code.lines().count();
        if n > MAX_FILE_LINES {
            problems.push(format!(
                "{}: {n} lines of non-test code (limit {MAX_FILE_LINES}): split it along its seams",
                rel.display()
            ));
        }
        for (len, name, line) in functions(&code) {
            if len > MAX_FN_LINES {
                problems.push(format!(
                    "{}:{line}: fn {name} is {len} lines (limit {MAX_FN_LINES})",
                    rel.display()
                ));
            }
        }
        if top == "main" || top == "lib" || top == "cli" {
            continue;
        }
        for (i, _) in code.match_indices("crate::") {
            let used: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !used.is_empty() && used != top && used.chars().next().unwrap().is_lowercase() {
                edges.entry(top.clone()).or_default().insert(used);
            }
        }
    }
    for (from, tos) in &edges {
        let Some(lf) = layer_of(from) else {
            problems.push(format!(
                "src/{from}: a top-level module not in LAYERS: place it in tests/architecture.rs \
                 and docs/architecture.md"
            ));
            continue;
        };
        for to in tos {
            match layer_of(to) {
                Some(lt) if lt > lf => problems.push(format!(
                    "{from} (layer {lf}) uses {to} (layer {lt}): layers point down only \
                     (docs/architecture.md)"
                )),
                None => problems.push(format!("{from} uses {to}, which is not in LAYERS")),
                _ => {}
            }
        }
    }
    // Cycles within a layer: a depth-first search for a back edge.
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(v.to_string(), 1);
        stack.push(v.to_string());
        for w in edges.get(v).into_iter().flatten() {
            match state.get(w.as_str()).copied().unwrap_or(0) {
                0 => visit(w, edges, state, stack, cycles),
                1 => {
                    let at = stack.iter().position(|s| s == w).unwrap();
                    cycles.push(format!("{} -> {w}", stack[at..].join(" -> ")));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(v.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = vec![];
    for v in edges.keys() {
        if !state.contains_key(v.as_str()) {
            visit(v, &edges, &mut state, &mut vec![], &mut cycles);
        }
    }
    for c in cycles {
        problems.push(format!("import cycle: {c}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_long_functions_and_ignores_braces_in_literals() {
    let body = "    let x = \"{{{\";\n    let c = '{';\n".repeat(3);
    let code = format!("pub fn f<'a>(s: &'a str) {{\n{body}}}\nfn g() {{}}\n");
    let fs = functions(&code);
    assert_eq!(fs[0], (8, "f".to_string(), 1));
    assert_eq!(fs[1], (1, "g".to_string(), 9));
}
