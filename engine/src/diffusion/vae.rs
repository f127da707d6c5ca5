//! diffusers' `AutoencoderKL`. The decoder: post_quant_conv, conv_in, mid block (ResNet,
//! single-head attention, ResNet), up blocks (ResNets, nearest-2x + conv), norm + SiLU +
//! conv_out; latents in, RGB in [-1, 1] out. The encoder (img2img, inpainting): conv_in, down
//! blocks (ResNets, a stride-2 convolution padded (0, 1, 0, 1)), the same mid block, norm +
//! SiLU + conv_out to the latent distribution's mean and log-variance, quant_conv; RGB in, the
//! distribution's mean out.

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
    /// Image channels the encoder takes.
    pub in_channels: usize,
    /// Why the encoder cannot run (a down block type Kiln does not have), `None` when it can:
    /// text-to-image needs only the decoder.
    pub encoder_unsupported: Option<String>,
    /// The 1x1 convolutions around the latent space (`use_quant_conv`, default true).
    pub quant_conv: bool,
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
            in_channels: c.count("in_channels", 3)?,
            // diffusers' default is DownEncoderBlock2D.
            encoder_unsupported: match c.get("down_block_types") {
                None => None,
                Some(_) => c
                    .strings("down_block_types")?
                    .iter()
                    .find(|b| b.as_str() != "DownEncoderBlock2D")
                    .map(|b| format!("VAE down block type '{b}' (the encoder, for an init image)")),
            },
            quant_conv: c.flag("use_quant_conv", true)?,
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
        let z = if cfg.quant_conv {
            vb.pp("post_quant_conv")
                .conv(g, z, cfg.latent_channels, 1, 1)?
        } else {
            z
        };
        let dec = vb.pp("decoder");
        let top = ch[ch.len() - 1];
        let mut x = dec.pp("conv_in").conv(g, z, top, 3, 1)?;
        x = self.mid_block(g, &dec.pp("mid_block"), x, top)?;
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

    /// ResNet, attention, ResNet at the bottom of the encoder and the decoder.
    fn mid_block(&self, g: &mut Graph, mid: &VarBuilder, x: Value, c: usize) -> Result<Value> {
        let gr = self.cfg.groups;
        let x = resnet(g, &mid.pp("resnets.0"), x, c, gr, EPS, None)?;
        let x = self.attention(g, &mid.pp("attentions.0"), x)?;
        resnet(g, &mid.pp("resnets.1"), x, c, gr, EPS, None)
    }

    /// Encodes an image `[1, 3, H, W]` in [-1, 1] to the mean of the latent distribution
    /// `[1, latent, H/f, W/f]` (not yet multiplied by the scaling factor), `f` =
    /// [`VaeConfig::scale_factor`].
    pub fn encode_mean(&self, g: &mut Graph, img: Value) -> Result<Value> {
        let moments = self.encode_moments(g, img)?;
        let lat = self.cfg.latent_channels;
        // The mean is the first half of the channels (batch 1: rows of [2 lat, h w]).
        let (h, w) = (g.shape(moments)[2], g.shape(moments)[3]);
        let m = g.reshape(moments, &[2 * lat, h * w])?;
        let mean = g.slice_rows(m, crate::Dyn::Static(0), lat)?;
        g.reshape(mean, &[1, lat, h, w])
    }

    /// The latent distribution's moments `[1, 2 latent, H/f, W/f]`: the mean, then the
    /// log-variance (diffusers' `DiagonalGaussianDistribution` parameters).
    pub fn encode_moments(&self, g: &mut Graph, img: Value) -> Result<Value> {
        let cfg = &self.cfg;
        if let Some(why) = &cfg.encoder_unsupported {
            return Err(Error::Unsupported(why.clone()));
        }
        let s = g.shape(img).to_vec();
        if s.len() != 4 || s[0] != 1 || s[1] != cfg.in_channels {
            return Err(Error::Data {
                name: "init image".into(),
                msg: format!("shape {s:?}, expected [1, {}, h, w]", cfg.in_channels),
            });
        }
        let (gr, ch) = (cfg.groups, &cfg.block_out_channels);
        let vb = self.weights.root();
        let enc = vb.pp("encoder");
        let mut x = enc.pp("conv_in").conv(g, img, ch[0], 3, 1)?;
        for (i, &c) in ch.iter().enumerate() {
            let blk = enc.pp("down_blocks").pp(i);
            for j in 0..cfg.layers_per_block {
                x = resnet(g, &blk.pp("resnets").pp(j), x, c, gr, EPS, None)?;
            }
            if i + 1 < ch.len() {
                // Downsample2D with padding 0: zero-padded (0, 1, 0, 1), then a stride-2 conv.
                let conv = blk.pp("downsamplers.0.conv");
                let w = conv.value(g, "weight", &[c, c, 3, 3])?;
                let b = conv.optional("bias", &[c])?.map(|b| g.tensor(&b));
                x = g.conv2d_padded(x, w, b, 2, 0, 1)?;
            }
        }
        let top = ch[ch.len() - 1];
        x = self.mid_block(g, &enc.pp("mid_block"), x, top)?;
        let x = enc.pp("conv_norm_out").group_norm(g, x, gr, EPS, true)?;
        let lat = cfg.latent_channels;
        let moments = enc.pp("conv_out").conv(g, x, 2 * lat, 3, 1)?;
        if cfg.quant_conv {
            vb.pp("quant_conv").conv(g, moments, 2 * lat, 1, 1)
        } else {
            Ok(moments)
        }
    }
}

/// A draw from the latent distribution with `moments` `[2 n]` (mean, log-variance) and standard
/// normal `noise` `[n]`, as diffusers' `DiagonalGaussianDistribution.sample` computes it:
/// `mean + exp(0.5 clamp(logvar, -30, 20)) noise`.
pub fn sample_latents(moments: &[f32], noise: &[f32]) -> Vec<f32> {
    let n = noise.len();
    (0..n)
        .map(|i| {
            let logvar = moments[n + i].clamp(-30.0, 20.0);
            moments[i] + (0.5 * logvar).exp() * noise[i]
        })
        .collect()
}
