//! The decoder half of `AutoencoderKL`: post_quant_conv, conv_in, mid block (ResNet,
//! single-head attention, ResNet), up blocks (ResNets, nearest-2x + conv), norm + SiLU +
//! conv_out. Latents in, RGB in [-1, 1] out.

use super::blocks::{attention, resnet};
use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::graph::{Graph, Value};
use crate::weights::{VarBuilder, Weights};

/// The parts of `vae/config.json` the decoder needs.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub groups: usize,
    pub latent_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f32,
}

impl VaeConfig {
    /// Pixels per latent along each side: 2 per up-sampling stage (8 for SD's 4 blocks).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Parses the config.
    pub fn from_json(s: &str) -> Result<VaeConfig> {
        let c = Keys::parse("vae/config.json", s)?;
        if c.num("shift_factor", 0.0)? != 0.0 {
            return Err(Error::Unsupported(format!(
                "VAE shift_factor {}",
                c.num("shift_factor", 0.0)?
            )));
        }
        if !c.flag("mid_block_add_attention", true)? {
            return Err(Error::Unsupported(
                "VAE without a mid-block attention".into(),
            ));
        }
        c.only("act_fn", serde_json::Value::from("silu"))?;
        if let Some(b) = c
            .strings("up_block_types")?
            .iter()
            .find(|b| b.as_str() != "UpDecoderBlock2D")
        {
            return Err(Error::Unsupported(format!("VAE up block type '{b}'")));
        }
        let channels = c
            .per_block("block_out_channels", 0)?
            .filter(|v| !v.is_empty() && v.len() <= 8)
            .ok_or_else(|| c.err("missing 'block_out_channels' (1 to 8 blocks)"))?;
        Ok(VaeConfig {
            block_out_channels: channels,
            layers_per_block: c.count("layers_per_block", 2)?,
            groups: c.count("norm_num_groups", 32)?,
            latent_channels: c.count("latent_channels", 4)?,
            out_channels: c.count("out_channels", 3)?,
            scaling_factor: c.num("scaling_factor", 0.18215)? as f32,
        })
    }
}

/// The VAE decoder: its config and its weights.
pub struct Vae {
    pub cfg: VaeConfig,
    pub weights: Weights,
}

/// Diffusers' VAE blocks normalize with eps 1e-6.
const EPS: f32 = 1e-6;

impl Vae {
    /// Single-head self-attention over the pixels of `[b, c, h, w]`, with a residual.
    fn attention(&self, g: &mut Graph, vb: &VarBuilder, x: Value) -> Result<Value> {
        let s = g.shape(x).to_vec();
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let h = vb
            .pp("group_norm")
            .group_norm(g, x, self.cfg.groups, EPS, false)?;
        let h = g.reshape(h, &[b, c, hw])?;
        let t = g.transpose(h)?; // [b, hw, c]
                                 // SD 1.x checkpoints keep the pre-0.14 diffusers names (query/key/value/proj_attn).
        let names = if vb.has("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let o = attention(g, vb, t, t, 1, c, names)?;
        let o = g.transpose(o)?;
        let o = g.reshape(o, &[b, c, s[2], s[3]])?;
        g.add(o, x)
    }

    /// Decodes latents `[b, latent, h, w]` (already divided by the scaling factor) to an image
    /// `[b, 3, 8h, 8w]` in [-1, 1] (for the usual three up-sampling stages).
    pub fn decode(&self, g: &mut Graph, z: Value) -> Result<Value> {
        let cfg = &self.cfg;
        let (gr, ch) = (cfg.groups, &cfg.block_out_channels);
        let vb = self.weights.root();
        let z = vb
            .pp("post_quant_conv")
            .conv(g, z, cfg.latent_channels, 1, 1)?;
        let dec = vb.pp("decoder");
        let top = ch[ch.len() - 1];
        let mut x = dec.pp("conv_in").conv(g, z, top, 3, 1)?;
        let mid = dec.pp("mid_block");
        x = resnet(g, &mid.pp("resnets.0"), x, top, gr, EPS, None)?;
        x = self.attention(g, &mid.pp("attentions.0"), x)?;
        x = resnet(g, &mid.pp("resnets.1"), x, top, gr, EPS, None)?;
        for (i, &c) in ch.iter().rev().enumerate() {
            let blk = dec.pp("up_blocks").pp(i);
            for j in 0..=cfg.layers_per_block {
                x = resnet(g, &blk.pp("resnets").pp(j), x, c, gr, EPS, None)?;
            }
            if i + 1 < ch.len() {
                x = g.upsample2x(x)?;
                x = blk.pp("upsamplers.0.conv").conv(g, x, c, 3, 1)?;
            }
        }
        let x = dec.pp("conv_norm_out").group_norm(g, x, gr, EPS, true)?;
        dec.pp("conv_out").conv(g, x, cfg.out_channels, 3, 1)
    }
}
