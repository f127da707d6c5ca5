//! The decoder half of `AutoencoderKL`: post_quant_conv, conv_in, mid block (ResNet,
//! single-head attention, ResNet), up blocks (ResNets, nearest-2x + conv), norm + SiLU +
//! conv_out. Latents in, RGB in [-1, 1] out.

use super::weights::ComponentWeights;
use crate::error::{Error, Result};
use crate::graph::{Graph, Value};
use crate::Dyn;
use serde_json::Value as Json;

/// The parts of `vae/config.json` the decoder needs.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub groups: usize,
    pub latent_channels: usize,
    pub scaling_factor: f32,
}

impl VaeConfig {
    /// Pixels per latent along each side: 2 per up-sampling stage (8 for SD's 4 blocks).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Parses the config.
    pub fn from_json(s: &str) -> Result<VaeConfig> {
        let c: Json = serde_json::from_str(s).map_err(|e| Error::Data {
            name: "vae/config.json".into(),
            msg: e.to_string(),
        })?;
        if c.get("shift_factor")
            .is_some_and(|v| !v.is_null() && v.as_f64() != Some(0.0))
        {
            return Err(Error::Unsupported(format!(
                "VAE shift_factor {}",
                c["shift_factor"]
            )));
        }
        if c.get("mid_block_add_attention").and_then(|v| v.as_bool()) == Some(false) {
            return Err(Error::Unsupported(
                "VAE without a mid-block attention".into(),
            ));
        }
        let channels: Vec<usize> = c
            .get("block_out_channels")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .ok_or_else(|| Error::Data {
                name: "vae/config.json".into(),
                msg: "missing 'block_out_channels'".into(),
            })?;
        Ok(VaeConfig {
            block_out_channels: channels,
            layers_per_block: c
                .get("layers_per_block")
                .and_then(|v| v.as_u64())
                .unwrap_or(2) as usize,
            groups: c
                .get("norm_num_groups")
                .and_then(|v| v.as_u64())
                .unwrap_or(32) as usize,
            latent_channels: c
                .get("latent_channels")
                .and_then(|v| v.as_u64())
                .unwrap_or(4) as usize,
            scaling_factor: c
                .get("scaling_factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.18215) as f32,
        })
    }
}

fn resnet(
    g: &mut Graph,
    w: &mut ComponentWeights,
    p: &str,
    x: Value,
    groups: usize,
) -> Result<Value> {
    let h = w.group_norm(g, &format!("{p}.norm1"), x, groups, 1e-6, true)?;
    let h = w.conv(g, &format!("{p}.conv1"), h, 1)?;
    let h = w.group_norm(g, &format!("{p}.norm2"), h, groups, 1e-6, true)?;
    let h = w.conv(g, &format!("{p}.conv2"), h, 1)?;
    let skip = if w.has(&format!("{p}.conv_shortcut.weight")) {
        w.conv(g, &format!("{p}.conv_shortcut"), x, 1)?
    } else {
        x
    };
    g.add(skip, h)
}

fn attention(
    g: &mut Graph,
    w: &mut ComponentWeights,
    p: &str,
    x: Value,
    groups: usize,
) -> Result<Value> {
    let s = g.shape(x).to_vec();
    let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
    let h = w.group_norm(g, &format!("{p}.group_norm"), x, groups, 1e-6, false)?;
    let h = g.reshape(h, &[b, c, hw])?;
    let t = g.transpose(h)?; // [b, hw, c]
                             // SD 1.x checkpoints keep the pre-0.14 diffusers names (query/key/value/proj_attn).
    let names = if w.has(&format!("{p}.to_q.weight")) {
        ["to_q", "to_k", "to_v", "to_out.0"]
    } else {
        ["query", "key", "value", "proj_attn"]
    };
    let q = w.linear(g, &format!("{p}.{}", names[0]), t)?;
    let k = w.linear(g, &format!("{p}.{}", names[1]), t)?;
    let v = w.linear(g, &format!("{p}.{}", names[2]), t)?;
    let a = g.attention(q, k, v, 1, 1, false, Dyn::Static(0), Dyn::Static(hw as u32))?;
    let o = w.linear(g, &format!("{p}.{}", names[3]), a)?;
    let o = g.transpose(o)?;
    let o = g.reshape(o, &[b, c, s[2], s[3]])?;
    g.add(o, x)
}

/// Decodes latents `[b, latent, h, w]` (already divided by the scaling factor) to an image
/// `[b, 3, 8h, 8w]` in [-1, 1] (for the usual three up-sampling stages).
pub fn decode(g: &mut Graph, w: &mut ComponentWeights, cfg: &VaeConfig, z: Value) -> Result<Value> {
    let gr = cfg.groups;
    let z = w.conv(g, "post_quant_conv", z, 1)?;
    let mut x = w.conv(g, "decoder.conv_in", z, 1)?;
    x = resnet(g, w, "decoder.mid_block.resnets.0", x, gr)?;
    x = attention(g, w, "decoder.mid_block.attentions.0", x, gr)?;
    x = resnet(g, w, "decoder.mid_block.resnets.1", x, gr)?;
    let n = cfg.block_out_channels.len();
    for i in 0..n {
        for j in 0..=cfg.layers_per_block {
            x = resnet(g, w, &format!("decoder.up_blocks.{i}.resnets.{j}"), x, gr)?;
        }
        if i + 1 < n {
            x = g.upsample2x(x)?;
            x = w.conv(g, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"), x, 1)?;
        }
    }
    let x = w.group_norm(g, "decoder.conv_norm_out", x, gr, 1e-6, true)?;
    w.conv(g, "decoder.conv_out", x, 1)
}
