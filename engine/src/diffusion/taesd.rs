//! The tiny autoencoder's decoder (diffusers' `AutoencoderTiny`, madebyollin's TAESD): a
//! fast stand-in for the VAE decoder, for live previews and optionally the final image.
//! `tanh(z / 3) * 3`, a 3x3 convolution and ReLU, then per block `num_decoder_blocks[i]`
//! residual blocks (three 3x3 convolutions with ReLU between, a skip, ReLU), a nearest
//! up-sampling and a 3x3 convolution (without bias but for the last, which makes RGB in
//! [0, 1], mapped to [-1, 1]). Its weights are `decoder.layers.<i>` in `nn.Sequential` order.

use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::graph::{Graph, UnaryOp, Value};
use crate::weights::{VarBuilder, Weights};
use serde_json::Value as Json;

/// The parts of a TAESD `config.json` the decoder needs.
#[derive(Clone, Debug)]
pub struct TinyConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub num_blocks: Vec<usize>,
    /// Latents are divided by this before decoding (1 for TAESD: it takes the U-Net's latents).
    pub scaling_factor: f32,
}

impl TinyConfig {
    pub fn from_json(s: &str) -> Result<TinyConfig> {
        let c = Keys::parse("taesd config.json", s)?;
        let class = c.text("_class_name", "AutoencoderTiny")?;
        if class != "AutoencoderTiny" {
            return Err(Error::Unsupported(format!(
                "'{class}' as a tiny decoder (expected diffusers' AutoencoderTiny, e.g. madebyollin/taesd)"
            )));
        }
        c.only("act_fn", Json::from("relu"))?;
        c.only("upsample_fn", Json::from("nearest"))?;
        c.only("upsampling_scaling_factor", Json::from(2))?;
        c.only_num("shift_factor", 0.0)?;
        let block_out_channels = c
            .per_block("decoder_block_out_channels", 0)?
            .unwrap_or_else(|| vec![64; 4]);
        let num_blocks = c
            .per_block("num_decoder_blocks", block_out_channels.len())?
            .unwrap_or_else(|| vec![3, 3, 3, 1]);
        if block_out_channels.is_empty()
            || block_out_channels.len() > 8
            || num_blocks.len() != block_out_channels.len()
            || num_blocks.iter().any(|&n| n > 64)
        {
            return Err(c.err(
                "'decoder_block_out_channels' and 'num_decoder_blocks' must be 1 to 8 blocks each, as many of one as of the other",
            ));
        }
        Ok(TinyConfig {
            latent_channels: c.count("latent_channels", 4)?,
            out_channels: c.count("out_channels", 3)?,
            block_out_channels,
            num_blocks,
            scaling_factor: c.num("scaling_factor", 1.0)? as f32,
        })
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// A tiny decoder: its config and weights.
pub struct TinyDecoder {
    pub cfg: TinyConfig,
    pub weights: Weights,
}

impl TinyDecoder {
    /// The image `[b, 3, f h, f w]` in [-1, 1] of latents `[b, c, h, w]` as the U-Net makes
    /// them (divided by [`TinyConfig::scaling_factor`] here).
    pub fn decode(&self, g: &mut Graph, z: Value) -> Result<Value> {
        let cfg = &self.cfg;
        let vb = self.weights.root();
        let layers = vb.pp("decoder.layers");
        let z = g.scale(z, 1.0 / cfg.scaling_factor, 0.0)?;
        let z = g.unary(z, UnaryOp::Softcap { cap: 3.0 })?;
        let mut i = 0;
        let conv = |g: &mut Graph, vb: VarBuilder, x: Value, co: usize| vb.conv(g, x, co, 3, 1);
        let mut x = conv(g, layers.pp(i), z, cfg.block_out_channels[0])?;
        x = g.unary(x, UnaryOp::Relu)?;
        i += 2;
        let n = cfg.block_out_channels.len();
        for (b, (&c, &blocks)) in cfg
            .block_out_channels
            .iter()
            .zip(&cfg.num_blocks)
            .enumerate()
        {
            for _ in 0..blocks {
                let blk = layers.pp(i);
                let cv = blk.pp("conv");
                let mut h = conv(g, cv.pp(0), x, c)?;
                h = g.unary(h, UnaryOp::Relu)?;
                h = conv(g, cv.pp(2), h, c)?;
                h = g.unary(h, UnaryOp::Relu)?;
                h = conv(g, cv.pp(4), h, c)?;
                let skip = if blk.has("skip.weight") {
                    blk.pp("skip").conv(g, x, c, 1, 1)?
                } else {
                    x
                };
                let s = g.add(h, skip)?;
                x = g.unary(s, UnaryOp::Relu)?;
                i += 1;
            }
            let last = b + 1 == n;
            if !last {
                x = g.upsample2x(x)?;
                i += 1;
            }
            let co = if last { cfg.out_channels } else { c };
            x = conv(g, layers.pp(i), x, co)?;
            i += 1;
        }
        g.scale(x, 2.0, -1.0)
    }
}
