//! LoRA files for Stable Diffusion pipelines, merged into the U-Net's and the text encoders'
//! weights as they are uploaded: `W + scale * alpha / rank * up @ down` per target tensor (a
//! convolution's kernel flattened to `[out, in * k * k]`; a 1x1 `up`).
//!
//! Two layouts, as people download them:
//! - diffusers / PEFT (`StableDiffusionPipeline.save_lora_weights`): `unet.<module>.lora_A.weight`
//!   (down) and `lora_B.weight` (up), `text_encoder.<module>...` (SDXL's second encoder:
//!   `text_encoder_2.`); older files
//!   `<module>.lora.down.weight` / `lora.up.weight`. Rank and alpha come from the header's
//!   `lora_adapter_metadata` (`unet.r`, `unet.lora_alpha`, their `rank_pattern` /
//!   `alpha_pattern`); without it alpha is the rank (a factor of 1).
//! - kohya-ss (`sd-scripts`): `lora_unet_<module with _ for .>.lora_down.weight` /
//!   `lora_up.weight` / `alpha`, `lora_te_...` (or `lora_te1_`, `lora_te2_` for SDXL's two)
//!   for the text encoders. kohya's SDXL U-Nets use the original SGM names (`input_blocks`, ...),
//!   which are refused with a note on converting the file with diffusers.
//!
//! Every key must name a tensor of the model: a file for another architecture is refused,
//! naming the first key that fits nothing.

use crate::dtype::dequantize;
use crate::error::{Error, Result};
use crate::formats::safetensors::SafeTensors;
use crate::formats::TensorSource;
use crate::weights::{Delta, Weights};
use std::collections::HashMap;

/// The component a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Part {
    fn describe(self) -> &'static str {
        match self {
            Part::Unet => "the U-Net",
            Part::TextEncoder => "the text encoder",
            Part::TextEncoder2 => "the second text encoder (SDXL's text_encoder_2)",
        }
    }
}

/// One LoRA module read from a file: its component, module path (dots, as the file says it),
/// down `[rank, in...]` and up `[out, rank, ...]` matrices and alpha.
struct Module {
    part: Part,
    /// The module as the file names it (for messages).
    key: String,
    path: String,
    down: (Vec<f32>, Vec<usize>),
    up: (Vec<f32>, Vec<usize>),
    alpha: Option<f32>,
}

/// The deltas of LoRA files for each component, keyed by the checkpoint's tensor name.
pub type Deltas = HashMap<Part, HashMap<String, Vec<Delta>>>;

/// Reads a LoRA file (`label` names it in errors) and maps every module onto the tensors of
/// the model's `parts` (U-Net, text encoder(s)); the deltas carry `scale`.
pub fn deltas(
    label: &str,
    bytes: Vec<u8>,
    scale: f32,
    parts: &[(Part, &Weights)],
    layout: Option<&UnetLayout>,
    out: &mut Deltas,
) -> Result<usize> {
    let bad = |msg: String| Error::Data {
        name: format!("LoRA {label}"),
        msg,
    };
    if !scale.is_finite() {
        return Err(bad(format!("scale {scale} (expected a finite number)")));
    }
    let meta = adapter_metadata(&bytes);
    let mut st = SafeTensors::new();
    st.add_file(label, bytes)?;
    let modules = read_modules(&st, &bad)?;
    if modules.is_empty() {
        return Err(bad(
            "no LoRA tensors (expected diffusers' '.lora_A.weight' / '.lora_B.weight' or \
             kohya's '.lora_down.weight' / '.lora_up.weight' names)"
                .into(),
        ));
    }
    let flat = |w: &Weights| -> HashMap<String, String> {
        w.names()
            .into_iter()
            .filter_map(|n| {
                let stem = n.strip_suffix(".weight")?.to_string();
                Some((stem.replace('.', "_"), n))
            })
            .collect()
    };
    let flats: HashMap<Part, HashMap<String, String>> =
        parts.iter().map(|&(p, w)| (p, flat(w))).collect();
    let count = modules.len();
    for m in modules {
        let (w, flat) = match (parts.iter().find(|(p, _)| *p == m.part), flats.get(&m.part)) {
            (Some(&(_, w)), Some(f)) => (w, f),
            _ => {
                return Err(bad(format!(
                    "'{}' is for {}, which this pipeline does not have",
                    m.key,
                    m.part.describe()
                )))
            }
        };
        // kohya's SDXL files name U-Net modules by their original (SGM) paths.
        let sgm = ["#input_blocks_", "#middle_block_", "#output_blocks_"];
        let m = match (m.part, layout) {
            (Part::Unet, Some(l)) if sgm.iter().any(|p| m.path.starts_with(p)) => {
                let path = sgm_to_diffusers(&m.path[1..], l).ok_or_else(|| {
                    bad(format!(
                        "'{}': an original (SGM) U-Net path that fits no block of this U-Net",
                        m.key
                    ))
                })?;
                Module {
                    path: format!("#{path}"),
                    ..m
                }
            }
            _ => m,
        };
        let target = target_name(&m, w, flat).ok_or_else(|| {
            bad(format!(
                "'{}' names no tensor of {}",
                m.key,
                m.part.describe()
            ))
        })?;
        let shape = w.raw(&target).map(|r| r.shape.to_vec()).unwrap_or_default();
        let (rank, inn) = (m.down.1[0], m.down.1[1..].iter().product::<usize>());
        let outn = m.up.1[0];
        let up_ok = m.up.1.len() >= 2 && m.up.1[1] == rank && m.up.1[2..].iter().all(|&d| d == 1);
        let numel: usize = shape.iter().product();
        if !up_ok || shape.first() != Some(&outn) || numel != outn * inn || rank == 0 {
            return Err(bad(format!(
                "'{}': up {:?} and down {:?} do not make the shape of '{target}' {shape:?}",
                m.key, m.up.1, m.down.1
            )));
        }
        let alpha = m
            .alpha
            .or_else(|| meta.as_ref().and_then(|j| meta_alpha(j, m.part, &m.path)))
            .unwrap_or(rank as f32);
        let rank_meta = meta
            .as_ref()
            .and_then(|j| meta_rank(j, m.part, &m.path))
            .unwrap_or(rank);
        let factor = scale * alpha / rank_meta as f32;
        out.entry(m.part)
            .or_default()
            .entry(target)
            .or_default()
            .push(Delta {
                up: m.up.0,
                down: m.down.0,
                rank,
                factor,
            });
    }
    Ok(count)
}

/// What mapping the U-Net's original (SGM) module paths needs: ResNets per down block, and
/// which up blocks have attentions.
#[derive(Clone, Debug)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    pub up_cross: Vec<bool>,
}

/// An SGM U-Net path (kohya's SDXL names, underscores for dots:
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q`) as diffusers' flattened path
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`), as diffusers'
/// `_maybe_map_sgm_blocks_to_diffusers` maps them: input block `1 + level (L + 1) + i` holds
/// down level `level`'s ResNet (`.0`) and attention (`.1`) `i` (`i == L`: its downsampler),
/// output block `level (L + 1) + i` up level `level`'s (`.2`, or `.1` without attentions: the
/// upsampler), the middle block ResNet, attention, ResNet; ResNet layers renamed
/// (`in_layers_0` norm1, `in_layers_2` conv1, `emb_layers_1` time_emb_proj, `out_layers_0`
/// norm2, `out_layers_3` conv2, `skip_connection` conv_shortcut).
pub fn sgm_to_diffusers(flat: &str, l: &UnetLayout) -> Option<String> {
    let per = l.layers_per_block + 1;
    fn num(s: &str) -> Option<(usize, &str)> {
        let end = s.find('_').unwrap_or(s.len());
        Some((s[..end].parse().ok()?, s.get(end + 1..).unwrap_or("")))
    }
    let resnet = |rest: &str| -> String {
        for (from, to) in [
            ("in_layers_0", "norm1"),
            ("in_layers_2", "conv1"),
            ("emb_layers_1", "time_emb_proj"),
            ("out_layers_0", "norm2"),
            ("out_layers_3", "conv2"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if let Some(r) = rest.strip_prefix(from) {
                return format!("{to}{r}");
            }
        }
        rest.to_string()
    };
    let join = |head: String, rest: &str| {
        if rest.is_empty() {
            head
        } else {
            format!("{head}_{rest}")
        }
    };
    if let Some(r) = flat.strip_prefix("input_blocks_") {
        let (k, r) = num(r)?;
        let (j, rest) = num(r)?;
        let (level, i) = ((k.checked_sub(1)?) / per, (k.checked_sub(1)?) % per);
        return Some(match (i == l.layers_per_block, j) {
            (true, 0) => join(
                format!("down_blocks_{level}_downsamplers_0_conv"),
                rest.strip_prefix("op")
                    .unwrap_or(rest)
                    .trim_start_matches('_'),
            ),
            (false, 0) => join(format!("down_blocks_{level}_resnets_{i}"), &resnet(rest)),
            (false, 1) => join(format!("down_blocks_{level}_attentions_{i}"), rest),
            _ => return None,
        });
    }
    if let Some(r) = flat.strip_prefix("output_blocks_") {
        let (k, r) = num(r)?;
        let (j, rest) = num(r)?;
        let (level, i) = (k / per, k % per);
        let cross = *l.up_cross.get(level)?;
        return Some(match j {
            0 => join(format!("up_blocks_{level}_resnets_{i}"), &resnet(rest)),
            1 if cross => join(format!("up_blocks_{level}_attentions_{i}"), rest),
            1 | 2 => join(format!("up_blocks_{level}_upsamplers_0"), rest),
            _ => return None,
        });
    }
    let r = flat.strip_prefix("middle_block_")?;
    let (j, rest) = num(r)?;
    Some(match j {
        0 => join("mid_block_resnets_0".into(), &resnet(rest)),
        1 => join("mid_block_attentions_0".into(), rest),
        2 => join("mid_block_resnets_1".into(), &resnet(rest)),
        _ => return None,
    })
}

/// The checkpoint tensor a module targets: its path (under `text_model.` or without it, as
/// transformers 4 and 5 name CLIP's modules) + `.weight`; kohya's flattened names by lookup.
fn target_name(m: &Module, w: &Weights, map: &HashMap<String, String>) -> Option<String> {
    if let Some(flat) = m.path.strip_prefix('#') {
        return map
            .get(flat)
            .or_else(|| map.get(flat.strip_prefix("text_model_")?))
            .or_else(|| map.get(&format!("text_model_{flat}")))
            .cloned();
    }
    let p = &m.path;
    let bare = p.strip_prefix("text_model.").unwrap_or(p);
    [p.clone(), bare.to_string(), format!("text_model.{bare}")]
        .into_iter()
        .map(|c| format!("{c}.weight"))
        .find(|c| w.raw(c).is_some())
}

/// The modules of a LoRA file; kohya's flattened paths are kept with a leading `#`.
fn read_modules(st: &SafeTensors, bad: &dyn Fn(String) -> Error) -> Result<Vec<Module>> {
    // (part, path) -> (down, up, alpha)
    type Slot = (
        Option<(Vec<f32>, Vec<usize>)>,
        Option<(Vec<f32>, Vec<usize>)>,
        Option<f32>,
        String,
    );
    let mut slots: HashMap<(Part, String), Slot> = HashMap::new();
    let mut names = st.names();
    names.sort();
    for name in names {
        let Some((part, path, kind)) = parse_key(&name) else {
            return Err(bad(format!(
                "tensor '{name}' is not a LoRA tensor of a U-Net or text encoder (expected \
                 'unet.' / 'text_encoder.' or 'lora_unet_' / 'lora_te_' names)"
            )));
        };
        let Some(raw) = st.tensor(&name) else {
            continue;
        };
        let n: usize = raw.shape.iter().product();
        let v = dequantize(raw.dtype, raw.data, n)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("tensor '{name}': value {i} is {}", v[i])));
        }
        let slot = slots.entry((part, path)).or_default();
        if slot.3.is_empty() {
            slot.3 = module_key(&name);
        }
        match kind {
            Kind::Down | Kind::Up if raw.shape.len() < 2 || raw.shape.len() > 4 => {
                return Err(bad(format!(
                    "tensor '{name}': shape {:?} (2 to 4 dimensions)",
                    raw.shape
                )))
            }
            Kind::Down => slot.0 = Some((v, raw.shape.to_vec())),
            Kind::Up => slot.1 = Some((v, raw.shape.to_vec())),
            Kind::Alpha if v.len() == 1 => slot.2 = Some(v[0]),
            Kind::Alpha => {
                return Err(bad(format!(
                    "tensor '{name}': an alpha of {} values",
                    v.len()
                )))
            }
        }
    }
    let mut out = Vec::new();
    let mut keys: Vec<_> = slots.into_iter().collect();
    keys.sort_by(|a, b| a.0 .1.cmp(&b.0 .1));
    for ((part, path), (down, up, alpha, key)) in keys {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(bad(format!(
                "module '{key}' has only one of its two LoRA matrices"
            )));
        };
        out.push(Module {
            part,
            key,
            path,
            down,
            up,
            alpha,
        });
    }
    Ok(out)
}

/// A LoRA tensor's name without its matrix suffix: the module as the file names it.
fn module_key(name: &str) -> String {
    [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
    ]
    .iter()
    .find_map(|s| name.strip_suffix(s))
    .unwrap_or(name)
    .to_string()
}

enum Kind {
    Down,
    Up,
    Alpha,
}

/// (component, module path, tensor kind) of a LoRA tensor name.
fn parse_key(name: &str) -> Option<(Part, String, Kind)> {
    for (suffix, kind) in [
        (".lora_A.weight", Kind::Down),
        (".lora_B.weight", Kind::Up),
        (".lora.down.weight", Kind::Down),
        (".lora.up.weight", Kind::Up),
        (".lora_down.weight", Kind::Down),
        (".lora_up.weight", Kind::Up),
        (".alpha", Kind::Alpha),
    ] {
        let Some(stem) = name.strip_suffix(suffix) else {
            continue;
        };
        for (prefix, part, flat) in [
            ("unet.", Part::Unet, false),
            ("text_encoder.", Part::TextEncoder, false),
            ("text_encoder_2.", Part::TextEncoder2, false),
            ("lora_unet_", Part::Unet, true),
            ("lora_te_", Part::TextEncoder, true),
            ("lora_te1_", Part::TextEncoder, true),
            ("lora_te2_", Part::TextEncoder2, true),
        ] {
            if let Some(path) = stem.strip_prefix(prefix) {
                let path = if flat {
                    format!("#{path}")
                } else {
                    path.to_string()
                };
                return Some((part, path, kind));
            }
        }
        return None;
    }
    None
}

/// The header's `lora_adapter_metadata` (diffusers' rank and alpha per component), parsed.
fn adapter_metadata(bytes: &[u8]) -> Option<serde_json::Value> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let text = header
        .get("__metadata__")?
        .get("lora_adapter_metadata")?
        .as_str()?;
    serde_json::from_str(text).ok()
}

fn meta_prefix(part: Part) -> &'static str {
    match part {
        Part::Unet => "unet",
        Part::TextEncoder => "text_encoder",
        Part::TextEncoder2 => "text_encoder_2",
    }
}

/// A per-module pattern value (`alpha_pattern`/`rank_pattern`: module name suffixes), else the
/// component's default (`lora_alpha`/`r`).
fn meta_value(
    meta: &serde_json::Value,
    part: Part,
    path: &str,
    pattern: &str,
    default: &str,
) -> Option<f64> {
    let p = meta_prefix(part);
    let pat = meta
        .get(format!("{p}.{pattern}"))
        .and_then(|v| v.as_object());
    if let Some(v) = pat.and_then(|m| {
        m.iter()
            .filter(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}")))
            .max_by_key(|(k, _)| k.len())
            .and_then(|(_, v)| v.as_f64())
    }) {
        return Some(v);
    }
    meta.get(format!("{p}.{default}")).and_then(|v| v.as_f64())
}

fn meta_alpha(meta: &serde_json::Value, part: Part, path: &str) -> Option<f32> {
    meta_value(meta, part, path, "alpha_pattern", "lora_alpha").map(|v| v as f32)
}

fn meta_rank(meta: &serde_json::Value, part: Part, path: &str) -> Option<usize> {
    meta_value(meta, part, path, "rank_pattern", "r")
        .filter(|&r| r >= 1.0)
        .map(|r| r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_layouts() {
        let k = |n| parse_key(n).map(|(p, path, _)| (p, path));
        assert_eq!(
            k("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"),
            Some((Part::Unet, "down_blocks.0.attentions.0.proj_in".into()))
        );
        assert_eq!(
            k("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"),
            Some((
                Part::TextEncoder,
                "#text_model_encoder_layers_0_self_attn_q_proj".into()
            ))
        );
        assert_eq!(
            k("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
            Some((
                Part::TextEncoder2,
                "#text_model_encoder_layers_0_mlp_fc1".into()
            ))
        );
        assert_eq!(
            k("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"),
            Some((
                Part::TextEncoder2,
                "text_model.encoder.layers.0.self_attn.q_proj".into()
            ))
        );
        assert_eq!(k("model.diffusion_model.input_blocks.1.weight"), None);
        let l = UnetLayout {
            layers_per_block: 2,
            up_cross: vec![true, true, false],
        };
        for (sgm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_2_0_in_layers_2",
                "down_blocks_0_resnets_1_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_5_1_proj_out",
                "up_blocks_1_attentions_2_proj_out",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_8_1_conv", "up_blocks_2_upsamplers_0_conv"),
            (
                "output_blocks_6_0_skip_connection",
                "up_blocks_2_resnets_0_conv_shortcut",
            ),
        ] {
            assert_eq!(
                sgm_to_diffusers(sgm, &l).as_deref(),
                Some(diffusers),
                "{sgm}"
            );
        }
        assert_eq!(k("lora_vae_decoder_conv_in.lora_up.weight"), None);
    }
}
