//! `kiln info --model F`: what a model file holds and whether Kiln can load it, found from its
//! headers alone (a GGUF's metadata and tensor list, a folder's config.json and safetensors
//! headers), before anything is read in full or sent to the GPU.

use anyhow::{bail, Context, Result};
use kiln::formats::gguf::{ggml_dtype, ggml_type_name, Gguf};
use kiln::llm::LlmConfig;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The first bytes of a file up to `limit` (or the whole file when shorter).
fn prefix(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(limit)
        .read_to_end(&mut v)?;
    Ok(v)
}

/// One line about a config: what it describes, or why it is refused.
fn describe(cfg: kiln::Result<LlmConfig>, problems: &mut Vec<String>) -> String {
    match cfg {
        Ok(c) => {
            let mut s = format!(
                "{:?}, {} layers, hidden {}, {} heads ({} for keys/values) of {}, vocabulary {}, context {}",
                c.arch, c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.vocab, c.max_positions
            );
            if let Some((kv, d)) = c.global_attn {
                s += &format!("; full-attention layers: {kv} key/value heads of {d}");
            }
            let shared = (0..c.layers).filter(|&i| c.kv_source[i] != i).count();
            if shared > 0 {
                s += &format!("; {shared} layers reuse earlier layers' keys and values");
            }
            if let Some((dim, _)) = c.per_layer_input {
                s += &format!("; per-layer inputs of {dim}");
            }
            if let Some(m) = c.moe {
                s += &format!(
                    "; mixture of experts: {} of {} experts of width {} per token{}",
                    m.top_k,
                    m.experts,
                    m.width,
                    if m.shared_expert {
                        ", and a shared expert"
                    } else {
                        ""
                    }
                );
            }
            if let Some(la) = &c.linear {
                let n = c.layers - c.attention_layers();
                s += &format!(
                    "; {n} linear-attention layers (Gated DeltaNet: {} key heads of {}, {} value heads of {}, convolution of {} taps)",
                    la.k_heads, la.k_dim, la.v_heads, la.v_dim, la.conv_kernel
                );
            }
            s
        }
        Err(e) => {
            problems.push(e.to_string());
            format!("refused: {e}")
        }
    }
}

/// Prints the tensor types, counting those Kiln cannot load into `problems`.
fn print_types(types: &BTreeMap<String, (usize, bool)>, problems: &mut Vec<String>) {
    println!("  {:<8} {:>7}  supported", "type", "tensors");
    for (t, (n, ok)) in types {
        println!("  {t:<8} {n:>7}  {}", if *ok { "yes" } else { "no" });
        if !ok {
            problems.push(format!("{n} tensors of type {t}"));
        }
    }
}

fn gguf(path: &Path) -> Result<Vec<String>> {
    let name = path.display().to_string();
    let size = std::fs::metadata(path)?.len();
    let mut limit = 1u64 << 20;
    let (g, infos) = loop {
        let bytes = prefix(path, limit)?;
        if let Some(h) = Gguf::parse_header(&name, &bytes)? {
            break h;
        }
        if limit >= size {
            bail!("{name}: the file ends inside its header");
        }
        limit = (limit * 4).min(size);
    };
    let text = |k: &str| g.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
    println!(
        "{name}: GGUF, {} MB, architecture {}, name {:?}, {} tensors",
        size >> 20,
        text("general.architecture"),
        text("general.name"),
        infos.len()
    );
    let mut types: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    for i in &infos {
        let e = types
            .entry(ggml_type_name(i.ggml_type))
            .or_insert((0, ggml_dtype(i.ggml_type).is_some()));
        e.0 += 1;
    }
    let mut problems = Vec::new();
    print_types(&types, &mut problems);
    println!(
        "tokenizer: {} (pre-tokenizer {})",
        text("tokenizer.ggml.model"),
        text("tokenizer.ggml.pre")
    );
    println!(
        "config: {}",
        describe(LlmConfig::from_gguf(&g), &mut problems)
    );
    Ok(problems)
}

fn folder(dir: &Path) -> Result<Vec<String>> {
    if dir.join("model_index.json").is_file() {
        let class = std::fs::read_to_string(dir.join("model_index.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|j| j["_class_name"].as_str().map(str::to_string))
            .unwrap_or_else(|| "a diffusers pipeline".into());
        println!(
            "{}: {class} (generate with `kiln image --model`)",
            dir.display()
        );
        // Whether it loads, from the components' configs (no weights read).
        let text = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        if let (Ok(u), Ok(v)) = (
            kiln::diffusion::unet::UnetConfig::from_json(&text("unet/config.json")),
            kiln::diffusion::vae::VaeConfig::from_json(&text("vae/config.json")),
        ) {
            let xl = if dir.join("text_encoder_2/config.json").is_file() {
                ", two text encoders (SDXL)"
            } else {
                ""
            };
            println!(
                "U-Net: {} input channels, blocks {:?}{xl}; VAE scaling {}",
                u.in_channels, u.block_out_channels, v.scaling_factor
            );
        }
        return Ok(refusal(dir, crate::serve::registry::Kind::Image)
            .into_iter()
            .collect());
    }
    if dir.join("modules.json").is_file() {
        println!(
            "{}: a sentence-transformers model (embed with `kiln embed --model`)",
            dir.display()
        );
        return Ok(refusal(dir, crate::serve::registry::Kind::Embedding)
            .into_iter()
            .collect());
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let Some(config) = read("config.json") else {
        bail!(
            "{}: no config.json, no .gguf file and no model_index.json",
            dir.display()
        );
    };
    let mut problems = Vec::new();
    let mut types: BTreeMap<String, (usize, bool)> = BTreeMap::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        // The 8-byte length, then the JSON header (the format caps it at 100 MB).
        let head = prefix(f, 8)?;
        let n = u64::from_le_bytes(head.try_into().unwrap_or_default());
        if n > kiln::formats::safetensors::MAX_HEADER_BYTES as u64 {
            problems.push(format!("{}: header of {n} bytes", f.display()));
            continue;
        }
        let bytes = prefix(f, 8 + n)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes.get(8..).unwrap_or_default())
                .with_context(|| format!("{}: header", f.display()))?;
        for (k, v) in &header {
            if k == "__metadata__" {
                continue;
            }
            let t = v["dtype"].as_str().unwrap_or("?").to_string();
            let ok = matches!(t.as_str(), "F32" | "F16" | "BF16");
            types.entry(t).or_insert((0, ok)).0 += 1;
        }
    }
    println!(
        "{}: Hugging Face folder, {} safetensors file(s)",
        dir.display(),
        files.len()
    );
    if files.is_empty() {
        problems.push("no .safetensors file".into());
    }
    print_types(&types, &mut problems);
    let generation = read("generation_config.json");
    println!(
        "config: {}",
        describe(
            LlmConfig::from_hf(&config, generation.as_deref()),
            &mut problems
        )
    );
    Ok(problems)
}

/// Prints what `path` holds; an error (after the report) when Kiln cannot load it.
pub fn model(path: &Path) -> Result<()> {
    let single_gguf = || -> Option<std::path::PathBuf> {
        let ggufs: Vec<_> = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        (ggufs.len() == 1 && !path.join("config.json").is_file()).then(|| ggufs[0].clone())
    };
    let problems = if path.is_file() {
        gguf(path)?
    } else if path.is_dir() {
        match single_gguf() {
            Some(f) => gguf(&f)?,
            None => folder(path)?,
        }
    } else {
        bail!("{}: no such file or folder", path.display());
    };
    if problems.is_empty() {
        println!("Kiln can load this model.");
        Ok(())
    } else {
        bail!("Kiln cannot load this model: {}", problems.join("; "))
    }
}

/// Why Kiln cannot load the model at `p` of `kind` (`None`: it can), from its configs and
/// headers: a text model's config (a folder's config.json, a GGUF's metadata), a pipeline's
/// component configs, a sentence-transformers folder's modules and encoder config.
fn refusal(p: &Path, kind: crate::serve::registry::Kind) -> Option<String> {
    use crate::serve::registry::Kind;
    let read = |f: &str| std::fs::read_to_string(p.join(f)).map_err(|e| format!("{f}: {e}"));
    let r: std::result::Result<(), String> = (|| match kind {
        Kind::Text if p.is_file() => {
            let head = prefix(p, 64 << 20).map_err(|e| e.to_string())?;
            match LlmConfig::from_gguf_prefix(&p.to_string_lossy(), &head) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("the GGUF metadata is larger than 64 MiB".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        Kind::Text => {
            if !p.join("config.json").is_file() {
                return Ok(()); // a folder holding one .gguf: `kiln info` on it says more
            }
            LlmConfig::from_hf(
                &read("config.json")?,
                read("generation_config.json").ok().as_deref(),
            )
            .map(drop)
            .map_err(|e| e.to_string())
        }
        Kind::Image => {
            use kiln::diffusion::{clip::ClipConfig, unet::UnetConfig, vae::VaeConfig};
            UnetConfig::from_json(&read("unet/config.json")?).map_err(|e| e.to_string())?;
            VaeConfig::from_json(&read("vae/config.json")?).map_err(|e| e.to_string())?;
            ClipConfig::from_json(&read("text_encoder/config.json")?).map_err(|e| e.to_string())?;
            if p.join("text_encoder_2/config.json").is_file() {
                ClipConfig::from_json(&read("text_encoder_2/config.json")?)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Kind::Embedding => {
            let files =
                crate::embed::embedding_files(&p.to_string_lossy()).map_err(|e| e.to_string())?;
            let gpu = crate::gpu().map_err(|e| e.to_string())?;
            pollster::block_on(kiln::embed::Embedder::load(
                &gpu,
                files,
                kiln::llm::Quantize::None,
            ))
            .map(drop)
            .map_err(|e| e.to_string())
        }
    })();
    r.err()
}

/// `kiln list DIR`: each model in a folder (as `kiln serve --models-dir` offers them), its
/// kind, weights size and whether Kiln can load it, or why not.
pub fn list(dir: &Path) -> Result<()> {
    let (found, skipped) = crate::serve::registry::scan(dir)?;
    println!("{:<32} {:<10} {:>10}  loads", "model", "kind", "weights");
    let mut refused = 0;
    for spec in &found {
        let crate::serve::registry::Source::Path(path) = &spec.source else {
            continue;
        };
        let p = Path::new(path);
        let mb = crate::serve::registry::estimate(spec, 0, 0) as f64 / (1 << 20) as f64;
        let verdict = match refusal(p, spec.kind) {
            None => "yes".to_string(),
            Some(why) => {
                refused += 1;
                format!("no: {why}")
            }
        };
        println!(
            "{:<32} {:<10} {:>7.1} MB  {verdict}",
            spec.id,
            spec.kind.name(),
            mb
        );
    }
    for (p, why) in &skipped {
        let name = p
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().to_string());
        println!("{name:<32} {:<10} {:>10}  no: {why}", "-", "-");
    }
    println!(
        "{} of {} entries load",
        found.len() - refused,
        found.len() + skipped.len()
    );
    Ok(())
}
