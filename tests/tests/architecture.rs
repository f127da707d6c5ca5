//! Structural checks of the engine (no GPU): the module layers point one way, and every
//! kernel's Rust parameter struct matches the WGSL `struct Params` it is uploaded into.

use kiln::kernels::{all_params, ParamsLayout};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The engine's top-level modules, lowest layer first. A module may use only modules of a
/// strictly lower rank (ARCHITECTURE.md draws the same picture).
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("oneshot", 0),
    ("dtype", 1),
    ("shaders", 1),
    ("formats", 2),
    ("device", 2),
    ("tokenizer", 3),
    ("tensor", 3),
    ("kernels", 4),
    ("reference", 5),
    ("graph", 5),
    ("weights", 6),
    ("llm", 7),
    ("diffusion", 7),
    ("embed", 8),
];

fn rank(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

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

/// Source without comments (doc links to other layers are documentation, not dependencies).
fn code(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level engine modules a source text refers to through `crate::` paths. Items re-exported
/// at the crate root (`crate::Graph`) count as their defining module, read from lib.rs.
fn uses(src: &str, root_items: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for path in paths_after(src, "crate::") {
        let n = path.split("::").next().unwrap_or("").trim().to_string();
        if rank(&n).is_some() {
            found.insert(n);
        } else if let Some(m) = root_items.get(&n) {
            found.insert(m.clone());
        }
    }
    found
}

/// `pub use module::{A, B}` lines of lib.rs: root item → defining module.
fn root_items(lib: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in lib.lines() {
        let Some(rest) = l.trim().strip_prefix("pub use ") else {
            continue;
        };
        let (module, items) = rest.split_once("::").unwrap_or((rest, ""));
        for it in items.trim_matches(|c| "{};".contains(c)).split(',') {
            m.insert(it.trim().to_string(), module.to_string());
        }
    }
    m
}

/// The module graph: top-level module → modules it uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let roots = root_items(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.iter().next().unwrap().to_string_lossy().to_string();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        assert!(
            rank(&module).is_some(),
            "engine module '{module}' ({}) has no layer in LAYERS: add it (and to ARCHITECTURE.md)",
            rel.display()
        );
        let used = uses(&code(&std::fs::read_to_string(&f).unwrap()), &roots);
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(used.into_iter().filter(|m| *m != module));
    }
    graph
}

/// Every `crate::` use points to a strictly lower layer; so there are no import circles.
#[test]
fn engine_layers_point_one_way() {
    let graph = module_graph();
    assert!(graph.len() >= 10, "found only {:?}", graph.keys());
    let mut upward = Vec::new();
    for (m, used) in &graph {
        for u in used {
            if rank(u) >= rank(m) {
                upward.push(format!(
                    "{m} (layer {:?}) uses {u} (layer {:?})",
                    rank(m),
                    rank(u)
                ));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

/// The checker sees imports: a source with an upward path and a grouped import is caught.
#[test]
fn layer_check_sees_paths_and_groups() {
    let roots =
        root_items("pub use graph::{CompileOptions, Graph};\npub use error::{Error, Result};");
    let src = code("use crate::{dtype::DType, Graph};\n// crate::llm in a comment\nlet x = crate::kernels::u(1);");
    let got = uses(&src, &roots);
    let want: BTreeSet<String> = ["dtype", "graph", "kernels"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
}

/// `(name, type)` fields of the first `struct Params { .. }` in preprocessed WGSL.
fn wgsl_params(wgsl: &str) -> Option<Vec<(String, String)>> {
    let start = wgsl.find("struct Params")?;
    let body = &wgsl[start..];
    let open = body.find('{')?;
    let close = body.find('}')?;
    Some(
        body[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| {
                let (n, t) = f.split_once(':').unwrap_or((f, ""));
                (n.trim().to_string(), t.trim().to_string())
            })
            .collect(),
    )
}

/// Compares a Rust parameter struct with the shader's; the message names both sides.
fn compare(layout: &ParamsLayout, wgsl: &str) -> Result<(), String> {
    let Some(w) = wgsl_params(wgsl) else {
        return Err(format!(
            "{} {:?}: no struct Params",
            layout.shader, layout.defines
        ));
    };
    let r: Vec<(String, String)> = layout
        .fields
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    if w != r {
        return Err(format!(
            "{} ({} {:?}) differs from the WGSL Params:\n  rust: {r:?}\n  wgsl: {w:?}",
            layout.rust_name, layout.shader, layout.defines
        ));
    }
    Ok(())
}

fn dump(layout: &ParamsLayout) -> String {
    let defines: Vec<(String, String)> = layout
        .defines
        .iter()
        .map(|d| (d.to_string(), String::new()))
        .collect();
    kiln::shaders::dump(layout.shader, &defines).unwrap()
}

/// Every Rust `Params` struct has the names, order and types of its WGSL `struct Params`, and
/// every `struct Params` in the shaders is covered by one.
#[test]
fn shader_params_match_rust_structs() {
    let layouts = all_params();
    let errors: Vec<String> = layouts
        .iter()
        .filter_map(|l| compare(l, &dump(l)).err())
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    for (file, src) in kiln::shaders::SOURCES {
        let declared = src.matches("struct Params").count();
        let covered: BTreeSet<_> = layouts
            .iter()
            .filter(|l| l.shader == *file)
            .map(|l| format!("{:?}", wgsl_params(&dump(l))))
            .collect();
        assert!(
            covered.len() >= declared,
            "{file} declares {declared} Params structs, Rust covers {}",
            covered.len()
        );
    }
}

/// The comparison fails on a reordered, renamed or retyped field.
#[test]
fn params_check_catches_mismatches() {
    let l = all_params()
        .into_iter()
        .find(|l| l.shader == "rope.wgsl")
        .unwrap();
    let good = dump(&l);
    assert!(compare(&l, &good).is_ok());
    for bad in [
        good.replacen("seq: u32, heads: u32", "heads: u32, seq: u32", 1),
        good.replacen("heads: u32", "head: u32", 1),
        good.replacen("heads: u32", "heads: f32", 1),
        good.replacen("pos_mul: u32", "pos_mul: u32, extra: u32", 1),
    ] {
        assert_ne!(bad, good);
        assert!(compare(&l, &bad).is_err(), "not caught:\n{bad}");
    }
}

/// The paths a source names after `prefix` (`crate::`, `kiln::`): `prefix a::b` and the
/// entries of `use prefix{..}` groups (one level of nesting). `$crate::` inside a macro counts
/// as `crate::`; `xkiln::` does not count as `kiln::`.
fn paths_after(src: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = src.as_bytes();
    let mut i = 0;
    while let Some(j) = src[i..].find(prefix) {
        let at = i + j;
        i = at + prefix.len();
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let rest = &src[i..];
        let path_end = |r: &str| {
            r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(r.len())
        };
        if let Some(group) = rest.strip_prefix('{') {
            // Split at top-level commas; a nested `a::{b, c}` expands to `a::b`, `a::c`.
            let mut depth = 0;
            let mut cur = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(std::mem::take(&mut cur));
                        continue;
                    }
                    _ => {}
                }
                cur.push(c);
            }
            items.push(cur);
            for it in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
                match it.split_once("::{") {
                    Some((prefix, inner)) => out.extend(
                        inner
                            .trim_end_matches('}')
                            .split(',')
                            .map(|x| format!("{prefix}::{}", x.trim())),
                    ),
                    None => out.push(it.to_string()),
                }
            }
        } else {
            out.push(rest[..path_end(rest)].trim_end_matches(':').to_string());
        }
    }
    out
}

/// Whether an engine path is below the front ends' contract (ARCHITECTURE.md, "The layers").
fn below_contract(path: &str) -> bool {
    const CONTRACT: &[&str] = &[
        "llm",
        "diffusion",
        "embed",
        "Error",
        "Result",
        "error",
        "device",
        "Gpu",
        "GpuOptions",
        "GpuFeatures",
        "CounterSnapshot",
        "formats::ModelFiles",
        "formats::files",
    ];
    !CONTRACT
        .iter()
        .any(|c| path == *c || path.starts_with(&format!("{c}::")))
}

/// The files ARCHITECTURE.md lists as reaching below the contract.
fn documented_below_contract() -> BTreeSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"))
            .unwrap();
    let start = doc
        .find("<!-- below-contract")
        .expect("ARCHITECTURE.md's below-contract list");
    let end = doc
        .find("<!-- end below-contract")
        .expect("the list's end marker");
    doc[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

/// A front-end file that uses formats, graph, kernels, the reference (anything below the
/// contract) must be on ARCHITECTURE.md's list, and every listed file must still need to be.
#[test]
fn front_ends_reach_below_the_contract_only_where_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["native-demo/src", "web/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut below = BTreeMap::new();
    for f in &files {
        let src = code(&std::fs::read_to_string(f).unwrap());
        let paths: Vec<String> = paths_after(&src, "kiln::")
            .into_iter()
            .filter(|p| below_contract(p))
            .collect();
        if !paths.is_empty() {
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            below.insert(rel, paths);
        }
    }
    let listed = documented_below_contract();
    let undocumented: Vec<String> = below
        .iter()
        .filter(|(f, _)| !listed.contains(*f))
        .map(|(f, p)| format!("{f}: {p:?}"))
        .collect();
    assert!(
        undocumented.is_empty(),
        "front-end files reaching below the contract without a reason in ARCHITECTURE.md \
         (route them through llm/diffusion, or list them):\n{}",
        undocumented.join("\n")
    );
    let stale: Vec<&String> = listed.iter().filter(|f| !below.contains_key(*f)).collect();
    assert!(
        stale.is_empty(),
        "listed in ARCHITECTURE.md but no longer below the contract: {stale:?}"
    );
}

/// The path reader sees plain paths and groups, nested one level.
#[test]
fn front_end_paths_are_read() {
    let src = "use kiln::{formats::{gguf, ModelFiles}, Gpu};\nlet p: kiln::Plan = kiln::llm::x();";
    let got = paths_after(src, "kiln::");
    assert_eq!(
        got,
        [
            "formats::gguf",
            "formats::ModelFiles",
            "Gpu",
            "Plan",
            "llm::x"
        ]
    );
    let below: Vec<&String> = got.iter().filter(|p| below_contract(p)).collect();
    assert_eq!(below, ["formats::gguf", "Plan"]);
}
