//! The configuration reference, generated from the config types themselves, so it cannot
//! drift from them: the keys and their nesting come from serde (a probe key in a table makes
//! `deny_unknown_fields` list every field), the defaults from `RunConfig::default()`
//! serialised, the allowed names of an enum from serde's "unknown variant" message, and each
//! key's meaning from its `///` comment in the source (compiled in with `include_str!`).
//!
//! `grove config --reference` prints it as Markdown (docs/configuration.md, checked by a
//! test), `grove config --defaults` as a commented TOML file that parses to the defaults.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::RunConfig;

/// The files that declare the config structs, for their doc comments. A config struct
/// declared elsewhere must be added here (the reference names the missing struct).
const SOURCES: &[(&str, &str)] = &[
    ("src/config/mod.rs", include_str!("mod.rs")),
    ("src/task/kinds.rs", include_str!("../task/kinds.rs")),
    ("src/sampling/mod.rs", include_str!("../sampling/mod.rs")),
    (
        "src/sampling/reinforce_ada.rs",
        include_str!("../sampling/reinforce_ada.rs"),
    ),
    ("src/sampling/eva.rs", include_str!("../sampling/eva.rs")),
    (
        "src/advantage/config.rs",
        include_str!("../advantage/config.rs"),
    ),
    (
        "src/advantage/estimators.rs",
        include_str!("../advantage/estimators.rs"),
    ),
    ("src/loss/config.rs", include_str!("../loss/config.rs")),
    ("src/config/critic.rs", include_str!("critic.rs")),
    ("src/advantage/gae.rs", include_str!("../advantage/gae.rs")),
    (
        "src/reward/pipeline/config.rs",
        include_str!("../reward/pipeline/config.rs"),
    ),
    ("src/buffer/mod.rs", include_str!("../buffer/mod.rs")),
    (
        "src/rollout/remote.rs",
        include_str!("../rollout/remote.rs"),
    ),
    ("src/report/sinks.rs", include_str!("../report/sinks.rs")),
    ("src/env/mod.rs", include_str!("../env/mod.rs")),
    ("src/env/tools.rs", include_str!("../env/tools.rs")),
    ("src/model/lora.rs", include_str!("../model/lora.rs")),
    (
        "src/reward/external.rs",
        include_str!("../reward/external.rs"),
    ),
];

/// The command that regenerates docs/configuration.md.
pub const REGENERATE: &str = "grove config --reference > docs/configuration.md";

/// A key name serde cannot know, used to make it list the ones it does.
const PROBE: &str = "zz_probe";

/// One key of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyDoc {
    /// The dotted path, as `--set` takes it (`sync.max_staleness`).
    pub key: String,
    /// The TOML type (`integer`, `float, optional`, `string`, ...).
    pub ty: String,
    /// The default as TOML, or `unset`, `required`, `—` (not written when default).
    pub default: String,
    /// The accepted names, for a key that takes one.
    pub allowed: Vec<String>,
    /// The field's doc comment.
    pub meaning: String,
}

/// One TOML table of the config and its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct SectionDoc {
    /// The dotted path of the table; empty for the top level.
    pub path: String,
    pub meaning: String,
    /// Whether the table is absent from the default config (an optional section).
    pub optional: bool,
    pub keys: Vec<KeyDoc>,
}

/// One field as declared in the source: (name, Rust type, doc).
type FieldSrc = (String, String, String);

/// A struct as declared in the source: its doc and its fields.
struct StructSrc {
    file: &'static str,
    doc: String,
    fields: Vec<FieldSrc>,
}

/// `pub struct NAME {` blocks at the top level of each source file; a `#[serde(flatten)]`
/// field is replaced by the fields of its struct (its keys sit in the same table).
fn parse_structs() -> BTreeMap<String, StructSrc> {
    let mut structs = parse_struct_blocks();
    let flattened: Vec<(String, Vec<FieldSrc>)> = structs
        .iter()
        .map(|(name, src)| {
            let fields = src
                .fields
                .iter()
                .flat_map(|f| match f.0.strip_prefix(FLATTEN) {
                    Some(_) => structs
                        .get(&f.1)
                        .map(|s| s.fields.clone())
                        .unwrap_or_default(),
                    None => vec![f.clone()],
                })
                .collect();
            (name.clone(), fields)
        })
        .collect();
    for (name, fields) in flattened {
        if let Some(src) = structs.get_mut(&name) {
            src.fields = fields;
        }
    }
    structs
}

/// Marks a parsed field declared with `#[serde(flatten)]` (its name is kept after it).
const FLATTEN: &str = "flatten:";

fn parse_struct_blocks() -> BTreeMap<String, StructSrc> {
    let mut out = BTreeMap::new();
    for (file, text) in SOURCES {
        let lines: Vec<&str> = text.lines().collect();
        let mut doc: Vec<&str> = vec![];
        let mut i = 0;
        while i < lines.len() {
            let t = lines[i].trim();
            if let Some(name) = lines[i]
                .strip_prefix("pub struct ")
                .and_then(|r| r.strip_suffix(" {"))
            {
                let mut fields = vec![];
                let mut fdoc: Vec<&str> = vec![];
                let mut flatten = false;
                i += 1;
                while i < lines.len() && !lines[i].starts_with('}') {
                    let f = lines[i].trim();
                    if let Some(d) = f.strip_prefix("///") {
                        fdoc.push(d.trim());
                    } else if f.starts_with("#[serde(flatten") {
                        flatten = true;
                    } else if !(f.starts_with("#[") || f.starts_with("//") || f.is_empty()) {
                        if let Some((n, ty)) =
                            f.strip_prefix("pub ").and_then(|r| r.split_once(": "))
                        {
                            let ty = ty.trim_end_matches(',').to_string();
                            let n = if flatten {
                                format!("{FLATTEN}{n}")
                            } else {
                                n.to_string()
                            };
                            fields.push((n, ty, fdoc.join(" ")));
                        }
                        fdoc.clear();
                        flatten = false;
                    }
                    i += 1;
                }
                let doc = doc.join(" ");
                let file = *file;
                out.insert(name.to_string(), StructSrc { file, doc, fields });
            } else if let Some(d) = t.strip_prefix("///") {
                doc.push(d.trim());
                i += 1;
                continue;
            } else if t.starts_with("#[") {
                i += 1;
                continue;
            }
            doc.clear();
            i += 1;
        }
    }
    out
}

/// The table at `path` (created as needed) in `root`.
fn table_at<'a>(root: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
    let mut t = root;
    for k in path {
        t = t
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .expect("probe paths go through tables only");
    }
    t
}

/// serde's message for a config holding only `value` at `path`; None when it parses.
fn probe(path: &[&str], value: toml::Value) -> Option<String> {
    let (last, parents) = path.split_last()?;
    let mut root = toml::Table::new();
    table_at(&mut root, parents).insert(last.to_string(), value);
    let text = toml::to_string(&root).ok()?;
    toml::from_str::<RunConfig>(&text)
        .err()
        .map(|e| e.message().to_string())
}

/// The back-quoted names after "expected" in a serde message.
fn expected_names(msg: &str) -> Vec<String> {
    msg.split_once("expected")
        .map(|(_, rest)| {
            rest.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The field names serde accepts in the table at `path`; None when it is not a table.
fn fields(path: &[&str]) -> Option<Vec<String>> {
    let mut p = path.to_vec();
    p.push(PROBE);
    let msg = probe(&p, toml::Value::Integer(0))?;
    msg.starts_with(&format!("unknown field `{PROBE}`"))
        .then(|| expected_names(&msg))
}

/// The names an enum-valued key accepts (empty for any other key).
fn variants(path: &[&str]) -> Vec<String> {
    match probe(path, toml::Value::String(PROBE.into())) {
        Some(m) if m.starts_with(&format!("unknown variant `{PROBE}`")) => expected_names(&m),
        _ => vec![],
    }
}

/// `Option<T>` → (true, T); the last path segment of a type (`a::b::Y` → `Y`).
fn unwrap_type(rust: &str) -> (bool, &str) {
    let (optional, inner) = match rust
        .strip_prefix("Option<")
        .and_then(|r| r.strip_suffix('>'))
    {
        Some(i) => (true, i),
        None => (false, rust),
    };
    let last = if inner.contains('<') {
        inner
    } else {
        inner.rsplit("::").next().unwrap_or(inner)
    };
    (optional, last)
}

fn toml_type(rust: &str, allowed: &[String]) -> String {
    let (optional, inner) = unwrap_type(rust);
    let base = match inner {
        "usize" | "u64" | "u32" | "u16" | "u8" | "i64" | "i32" => "integer".to_string(),
        "f64" | "f32" => "float".into(),
        "bool" => "boolean".into(),
        "String" => "string".into(),
        "Vec<String>" => "array of strings".into(),
        t if t.starts_with("Vec<") => "array of tables".into(),
        _ if !allowed.is_empty() => "string".into(),
        t => format!("table or string (`{t}`)"),
    };
    if optional {
        format!("{base}, optional")
    } else {
        base
    }
}

/// The defaults of the table at `path`: from the default config, or, for a section absent
/// from it, from a config holding that section with only its required keys (returned too).
fn section_defaults(defaults: &toml::Table, path: &[&str]) -> (toml::Table, Vec<String>) {
    let mut t = Some(defaults);
    for k in path {
        t = t.and_then(|t| t.get(*k)).and_then(|v| v.as_table());
    }
    if let Some(t) = t {
        return (t.clone(), vec![]);
    }
    let mut given = toml::Table::new();
    let mut required: Vec<String> = vec![];
    for _ in 0..8 {
        let mut root = toml::Table::new();
        let (last, parents) = match path.split_last() {
            Some(x) => x,
            None => break,
        };
        table_at(&mut root, parents).insert(last.to_string(), toml::Value::Table(given.clone()));
        let Ok(text) = toml::to_string(&root) else {
            break;
        };
        match toml::from_str::<RunConfig>(&text) {
            Ok(cfg) => {
                let Ok(toml::Value::Table(all)) = toml::Value::try_from(&cfg) else {
                    break;
                };
                let (mut t, _) = section_defaults(&all, path);
                for r in &required {
                    t.remove(r);
                }
                return (t, required);
            }
            Err(e) => {
                let m = e.message();
                if let Some(f) = m
                    .strip_prefix("missing field `")
                    .and_then(|r| r.split('`').next())
                {
                    given.insert(f.to_string(), toml::Value::String(String::new()));
                    required.push(f.to_string());
                } else if let (true, Some(f)) =
                    (m.contains("invalid type: string"), required.last())
                {
                    if given.get(f).is_some_and(|v| v.is_array()) {
                        break;
                    }
                    given.insert(f.clone(), toml::Value::Array(vec![]));
                } else {
                    break;
                }
            }
        }
    }
    (toml::Table::new(), required)
}

/// Every section and key of [`RunConfig`], top level first, then each table in declaration
/// order. An error names a field serde accepts but the source does not declare as
/// `pub NAME:` (a rename), or a struct missing from the `SOURCES` list.
pub fn reference() -> Result<Vec<SectionDoc>, String> {
    let structs = parse_structs();
    let defaults = match toml::Value::try_from(RunConfig::default()) {
        Ok(toml::Value::Table(t)) => t,
        other => return Err(format!("the default config does not serialise: {other:?}")),
    };
    let mut out = vec![];
    walk(&structs, &defaults, &mut vec![], "RunConfig", "", &mut out)?;
    Ok(out)
}

fn walk(
    structs: &BTreeMap<String, StructSrc>,
    defaults: &toml::Table,
    path: &mut Vec<String>,
    ty: &str,
    meaning: &str,
    out: &mut Vec<SectionDoc>,
) -> Result<(), String> {
    let here = if path.is_empty() {
        "the top level".to_string()
    } else {
        format!("[{}]", path.join("."))
    };
    let src = structs.get(ty).ok_or_else(|| {
        format!(
            "struct {ty} (for {here}) is not declared in the files of config::reference::SOURCES"
        )
    })?;
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    let names = fields(&p).ok_or_else(|| format!("{here} is not a table"))?;
    let (table_defaults, required) = section_defaults(defaults, &p);
    let mut keys = vec![];
    let mut subsections = vec![];
    for name in names {
        let (_, rust_ty, doc) = src.fields.iter().find(|f| f.0 == name).ok_or_else(|| {
            format!(
                "{here}: serde accepts `{name}`, but struct {ty} ({}) declares no `pub {name}:`",
                src.file
            )
        })?;
        let mut child = p.clone();
        child.push(&name);
        let (optional, inner) = unwrap_type(rust_ty);
        if structs.contains_key(inner) && fields(&child).is_some() {
            subsections.push((name.clone(), inner.to_string(), doc.clone()));
            continue;
        }
        let allowed = variants(&child);
        let default = match table_defaults.get(&name) {
            Some(v) => v.to_string(),
            None if required.contains(&name) => "required".into(),
            None if optional => "unset".into(),
            None => "—".into(),
        };
        keys.push(KeyDoc {
            key: child.join("."),
            ty: toml_type(rust_ty, &allowed),
            default,
            allowed,
            meaning: doc.clone(),
        });
    }
    let mut t = Some(defaults);
    for k in &p {
        t = t.and_then(|t| t.get(*k)).and_then(|v| v.as_table());
    }
    out.push(SectionDoc {
        path: p.join("."),
        meaning: if meaning.is_empty() {
            src.doc.clone()
        } else {
            meaning.to_string()
        },
        optional: t.is_none(),
        keys,
    });
    for (name, inner, doc) in subsections {
        path.push(name);
        walk(structs, defaults, path, &inner, &doc, out)?;
        path.pop();
    }
    Ok(())
}

/// The keys whose field has no doc comment.
pub fn undocumented(sections: &[SectionDoc]) -> Vec<String> {
    sections
        .iter()
        .flat_map(|s| &s.keys)
        .filter(|k| k.meaning.trim().is_empty())
        .map(|k| k.key.clone())
        .collect()
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The reference as Markdown: docs/configuration.md.
pub fn markdown(sections: &[SectionDoc]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Configuration reference\n\n\
         Every key of a run config (`grove train CONFIG.toml`, `--set section.key=value`): its \
         TOML type, default and meaning. Layering, lowest first: these defaults (the quickstart), \
         the recipe named by `recipe` (`grove recipes`), the file, then `--set` overrides.\n\n\
         This page is generated from the config types themselves (serde's field names, \
         `RunConfig::default()`, the fields' doc comments) by\n\n\
         ```sh\n{REGENERATE}\n```\n\n\
         and `cargo test` fails when it is stale or a key has no doc comment. \
         `grove config --defaults` prints the defaults as a commented TOML file; `grove config \
         FILE --set ...` prints a config as grove resolves it. [examples/](../examples/) holds \
         configs for the common cases."
    );
    for s in sections {
        let title = if s.path.is_empty() {
            "Top level".to_string()
        } else {
            format!("`[{}]`", s.path)
        };
        let _ = writeln!(md, "\n## {title}\n");
        if !s.meaning.is_empty() {
            let _ = writeln!(md, "{}\n", s.meaning);
        }
        if s.optional {
            let _ = writeln!(
                md,
                "Absent by default: the section exists only when a config sets it.\n"
            );
        }
        let _ = writeln!(md, "| key | type | default | meaning |\n|---|---|---|---|");
        for k in &s.keys {
            let mut meaning = cell(&k.meaning);
            if !k.allowed.is_empty() {
                let names: Vec<String> = k.allowed.iter().map(|a| format!("`{a}`")).collect();
                let _ = write!(meaning, " One of: {}.", names.join(", "));
            }
            let _ = writeln!(
                md,
                "| `{}` | {} | `{}` | {} |",
                k.key,
                cell(&k.ty),
                cell(&k.default),
                meaning
            );
        }
    }
    md
}

/// `text` as `# ` comment lines of at most about 96 characters.
fn comment(text: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for w in text.split_whitespace() {
        if !line.is_empty() && line.len() + w.len() + 1 > 94 {
            let _ = writeln!(out, "{indent}# {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{indent}# {line}");
    }
    out
}

/// The defaults as a TOML file with each key's meaning above it; keys without a default
/// value (unset, required) and absent sections are commented out, so it parses to
/// `RunConfig::default()`.
pub fn defaults_toml(sections: &[SectionDoc]) -> String {
    let mut out = String::from(
        "# grove run config: every key at its default (`grove config --defaults`).\n\
         # Types and allowed values: docs/configuration.md.\n",
    );
    for s in sections {
        let off = if s.optional { "# " } else { "" };
        if !s.path.is_empty() {
            out.push('\n');
            out.push_str(&comment(&s.meaning, ""));
            let _ = writeln!(out, "{off}[{}]", s.path);
        }
        for k in &s.keys {
            let name = k.key.rsplit('.').next().unwrap_or(&k.key);
            let mut text = k.meaning.clone();
            if !k.allowed.is_empty() {
                let _ = write!(text, " One of: {}.", k.allowed.join(", "));
            }
            out.push_str(&comment(&text, ""));
            match k.default.as_str() {
                "unset" | "required" | "—" => {
                    let _ = writeln!(out, "# {name} = ({}, {})", k.default, k.ty);
                }
                v => {
                    let _ = writeln!(out, "{off}{name} = {v}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(r: &[SectionDoc], k: &str) -> KeyDoc {
        r.iter()
            .flat_map(|s| &s.keys)
            .find(|x| x.key == k)
            .unwrap_or_else(|| panic!("{k} missing from the reference"))
            .clone()
    }

    #[test]
    fn every_key_has_a_doc_comment() {
        let r = reference().unwrap();
        let missing = undocumented(&r);
        assert!(
            missing.is_empty(),
            "config keys whose field has no `///` comment (its line in docs/configuration.md): \
             {missing:?}"
        );
    }

    #[test]
    fn keys_types_defaults_and_names_come_from_the_types() {
        let r = reference().unwrap();
        let steps = key(&r, "train.steps");
        assert_eq!(
            (steps.ty.as_str(), steps.default.as_str()),
            ("integer", "300")
        );
        assert!(steps.meaning.contains("RL steps"), "{steps:?}");
        let st = key(&r, "sync.max_staleness");
        assert_eq!(
            (st.ty.as_str(), st.default.as_str()),
            ("integer, optional", "unset")
        );
        let mode = key(&r, "sync.mode");
        assert_eq!(mode.allowed, ["on-policy", "lagged", "async"]);
        assert_eq!(mode.default, "\"on-policy\"");
        let est = key(&r, "advantage.estimator");
        for e in crate::advantage::Estimator::ALL {
            assert!(
                est.allowed.iter().any(|a| a == e.name()),
                "{e:?} not in {est:?}"
            );
        }
        // Optional sections: their keys with the defaults serde fills in.
        assert_eq!(key(&r, "remote.url").default, "required");
        assert_eq!(key(&r, "remote.retries").default, "3");
        let remote = r.iter().find(|s| s.path == "remote").unwrap();
        assert!(remote.optional);
        assert!(!r.iter().find(|s| s.path == "train").unwrap().optional);
        // Every key the default config writes is in the reference.
        let toml::Value::Table(all) = toml::Value::try_from(RunConfig::default()).unwrap() else {
            panic!()
        };
        fn leaves(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v.as_table() {
                    Some(sub) if !sub.is_empty() => leaves(sub, &key, out),
                    _ => out.push(key),
                }
            }
        }
        let mut written = vec![];
        leaves(&all, "", &mut written);
        for k in written {
            let in_ref = r.iter().flat_map(|s| &s.keys).any(|x| x.key == k);
            assert!(
                in_ref,
                "{k} is written by the default config but not in the reference"
            );
        }
    }

    #[test]
    fn the_commented_defaults_parse_to_the_defaults() {
        let text = defaults_toml(&reference().unwrap());
        let cfg: RunConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg, RunConfig::default());
        assert!(text.contains("\n# RL steps (one optimizer update per step).\nsteps = 300\n"));
        assert!(text.contains("# [remote]\n"), "{text}");
    }

    #[test]
    fn docs_configuration_md_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        let now = markdown(&reference().unwrap());
        assert!(
            on_disk == now,
            "docs/configuration.md is stale: regenerate it from the repository root with \
             `cargo run --release -- config --reference > docs/configuration.md` ({REGENERATE})"
        );
    }

    #[test]
    fn every_example_config_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                crate::config::load_for(Some(&p), &[], crate::config::Purpose::Inspect)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 4, "{n} example configs");
    }
}
