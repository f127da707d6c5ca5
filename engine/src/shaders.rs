//! The WGSL sources in `shaders/`, embedded with `include_str!`, and a tiny preprocessor:
//! `#include "file.wgsl"`, `#define NAME [value]`, `#ifdef NAME`, `#ifndef NAME`, `#else`,
//! `#endif`. Defined values are also substituted as whole words, so a variant can set a
//! constant (`#define TILE 64`). [`dump`] returns the final source of any variant.

use crate::error::{Error, Result};
use std::collections::HashMap;

/// Every shader file, by name.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../shaders/common.wgsl")),
    ("weights.wgsl", include_str!("../../shaders/weights.wgsl")),
    ("gemm.wgsl", include_str!("../../shaders/gemm.wgsl")),
    ("matmul.wgsl", include_str!("../../shaders/matmul.wgsl")),
    ("matvec.wgsl", include_str!("../../shaders/matvec.wgsl")),
    ("gather.wgsl", include_str!("../../shaders/gather.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("norm.wgsl", include_str!("../../shaders/norm.wgsl")),
    ("softmax.wgsl", include_str!("../../shaders/softmax.wgsl")),
    ("rope.wgsl", include_str!("../../shaders/rope.wgsl")),
    (
        "attention.wgsl",
        include_str!("../../shaders/attention.wgsl"),
    ),
    ("conv2d.wgsl", include_str!("../../shaders/conv2d.wgsl")),
    ("delta.wgsl", include_str!("../../shaders/delta.wgsl")),
    ("moe.wgsl", include_str!("../../shaders/moe.wgsl")),
    ("philox.wgsl", include_str!("../../shaders/philox.wgsl")),
    ("sample.wgsl", include_str!("../../shaders/sample.wgsl")),
    ("noise.wgsl", include_str!("../../shaders/noise.wgsl")),
    (
        "scheduler.wgsl",
        include_str!("../../shaders/scheduler.wgsl"),
    ),
];

fn source(name: &str) -> Result<&'static str> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Shader {
            name: name.into(),
            msg: "no such shader file".into(),
        })
}

/// Preprocesses `name` with the given defines and returns the final WGSL.
pub fn dump(name: &str, defines: &[(String, String)]) -> Result<String> {
    let mut defs: HashMap<String, String> = defines.iter().cloned().collect();
    let mut out = String::new();
    expand(name, &mut defs, &mut out, 0)?;
    Ok(out)
}

/// The WGSL of a kernel variant as the device compiles it: `shader` preprocessed with its
/// `defines` (plus HAS_SUBGROUPS where the device has subgroups), behind the `enable`
/// directives its variant needs — f16 for HALF tiles, wgpu's cooperative matrices for COOP,
/// and in the browser subgroups (naga 30 refuses that directive natively and needs none).
pub fn kernel_source(
    shader: &str,
    defines: &[(String, String)],
    subgroups: bool,
) -> Result<String> {
    let mut defines = defines.to_vec();
    if subgroups {
        defines.push(("HAS_SUBGROUPS".into(), String::new()));
    }
    let has = |d: &str| defines.iter().any(|(n, _)| n == d);
    let mut enables = String::new();
    if has("HALF") {
        enables.push_str("enable f16;\n");
    }
    if has("COOP") {
        enables.push_str("enable wgpu_cooperative_matrix;\n");
    }
    let src = dump(shader, &defines)?;
    if cfg!(target_arch = "wasm32") && subgroups && src.contains("subgroup") {
        enables.push_str("enable subgroups;\n");
    }
    Ok(enables + &src)
}

fn substitute(line: &str, defs: &HashMap<String, String>) -> String {
    if defs.values().all(|v| v.is_empty()) {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match defs.get(word.as_str()) {
            Some(v) if !v.is_empty() => out.push_str(v),
            _ => out.push_str(word),
        }
        word.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn expand(
    name: &str,
    defs: &mut HashMap<String, String>,
    out: &mut String,
    depth: usize,
) -> Result<()> {
    let err = |msg: String| Error::Shader {
        name: name.into(),
        msg,
    };
    if depth > 8 {
        return Err(err("#include nested too deeply".into()));
    }
    let src = source(name)?;
    // Stack of (this branch active, any branch taken) for #ifdef nesting.
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|s| s.0);
    for (ln, line) in src.lines().enumerate() {
        let t = line.trim_start();
        let mut parts = t.split_whitespace();
        match parts.next() {
            Some("#ifdef") | Some("#ifndef") => {
                let key = parts
                    .next()
                    .ok_or_else(|| err(format!("line {}: #ifdef without a name", ln + 1)))?;
                let mut on = defs.contains_key(key);
                if t.starts_with("#ifndef") {
                    on = !on;
                }
                stack.push((on, on));
            }
            Some("#else") => {
                let top = stack
                    .last_mut()
                    .ok_or_else(|| err(format!("line {}: #else without #ifdef", ln + 1)))?;
                *top = (!top.1, true);
            }
            Some("#endif") => {
                stack
                    .pop()
                    .ok_or_else(|| err(format!("line {}: #endif without #ifdef", ln + 1)))?;
            }
            Some("#define") if active(&stack) => {
                let key = parts
                    .next()
                    .ok_or_else(|| err(format!("line {}: #define without a name", ln + 1)))?;
                let val: Vec<&str> = parts.collect();
                defs.insert(key.to_string(), val.join(" "));
            }
            Some("#include") if active(&stack) => {
                let inc = t["#include".len()..].trim().trim_matches('"');
                expand(inc, defs, out, depth + 1)?;
            }
            Some("#define") | Some("#include") => {}
            _ if active(&stack) => {
                out.push_str(&substitute(line, defs));
                out.push('\n');
            }
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(err("unterminated #ifdef".into()));
    }
    Ok(())
}
