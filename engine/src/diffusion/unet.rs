//! `UNet2DConditionModel` as a graph, read top to bottom like diffusers' forward: time
//! embedding, conv_in, down blocks (ResNet + optional cross-attention transformer, then a
//! strided-conv downsampler), the cross-attention mid block, up blocks (skip concatenation,
//! ResNet, optional transformer, nearest-2x + conv upsampler), norm + SiLU + conv_out.
//! Every size is read from `unet/config.json` and the checkpoint's tensor shapes.

use super::weights::ComponentWeights;
use crate::error::{Error, Result};
use crate::graph::{Act, GluInput, Graph, Value};
use crate::Dyn;
use serde_json::Value as Json;

/// The parts of `unet/config.json` the graph needs.
#[derive(Clone, Debug)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<String>,
    pub up_blocks: Vec<String>,
    pub layers_per_block: usize,
    /// Attention heads per block (diffusers' `num_attention_heads`, or the legacy
    /// `attention_head_dim` which SD configs use to mean the same).
    pub heads: Vec<usize>,
    pub groups: usize,
    pub eps: f32,
    pub cross_attention_dim: usize,
    pub linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub transformer_layers: usize,
    /// Default latent size (`sample_size`).
    pub sample_size: usize,
}

fn cfg_err(msg: impl Into<String>) -> Error {
    Error::Data {
        name: "unet/config.json".into(),
        msg: msg.into(),
    }
}

fn per_block(v: Option<&Json>, n: usize) -> Option<Vec<usize>> {
    match v? {
        Json::Number(x) => x.as_u64().map(|x| vec![x as usize; n]),
        Json::Array(a) => a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect(),
        _ => None,
    }
}

impl UnetConfig {
    /// Parses the config, rejecting what the graph does not implement.
    pub fn from_json(s: &str) -> Result<UnetConfig> {
        let c: Json = serde_json::from_str(s).map_err(|e| cfg_err(e.to_string()))?;
        let list = |k: &str| -> Result<Vec<String>> {
            Ok(c.get(k)
                .and_then(|v| v.as_array())
                .ok_or_else(|| cfg_err(format!("missing '{k}'")))?
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect())
        };
        let block_out_channels = per_block(c.get("block_out_channels"), 0)
            .ok_or_else(|| cfg_err("missing 'block_out_channels'"))?;
        let n = block_out_channels.len();
        let down_blocks = list("down_block_types")?;
        let up_blocks = list("up_block_types")?;
        for b in down_blocks.iter().chain(&up_blocks) {
            if !matches!(
                b.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(Error::Unsupported(format!("UNet block type '{b}'")));
            }
        }
        let mid = c
            .get("mid_block_type")
            .and_then(|v| v.as_str())
            .unwrap_or("UNetMidBlock2DCrossAttn");
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(Error::Unsupported(format!("UNet mid_block_type '{mid}'")));
        }
        for (k, ok) in [
            ("class_embed_type", None::<&str>),
            ("addition_embed_type", None),
            ("encoder_hid_dim", None),
        ] {
            if c.get(k).is_some_and(|v| !v.is_null()) && ok.is_none() {
                return Err(Error::Unsupported(format!("UNet config '{k}' = {}", c[k])));
            }
        }
        let heads = per_block(c.get("num_attention_heads").filter(|v| !v.is_null()), n)
            .or_else(|| per_block(c.get("attention_head_dim"), n))
            .ok_or_else(|| cfg_err("missing 'attention_head_dim'"))?;
        let tl = per_block(c.get("transformer_layers_per_block"), n).unwrap_or(vec![1; n]);
        if tl.iter().any(|&t| t != 1) {
            return Err(Error::Unsupported(format!(
                "transformer_layers_per_block {tl:?} (only 1)"
            )));
        }
        if down_blocks.len() != n || up_blocks.len() != n || heads.len() != n {
            return Err(cfg_err(format!(
                "{n} block_out_channels but {} down, {} up blocks, {} head counts",
                down_blocks.len(),
                up_blocks.len(),
                heads.len()
            )));
        }
        Ok(UnetConfig {
            in_channels: c.get("in_channels").and_then(|v| v.as_u64()).unwrap_or(4) as usize,
            block_out_channels,
            down_blocks,
            up_blocks,
            layers_per_block: c
                .get("layers_per_block")
                .and_then(|v| v.as_u64())
                .unwrap_or(2) as usize,
            heads,
            groups: c
                .get("norm_num_groups")
                .and_then(|v| v.as_u64())
                .unwrap_or(32) as usize,
            eps: c.get("norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-5) as f32,
            cross_attention_dim: c
                .get("cross_attention_dim")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| cfg_err("missing 'cross_attention_dim'"))?
                as usize,
            linear_projection: c
                .get("use_linear_projection")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            flip_sin_to_cos: c
                .get("flip_sin_to_cos")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            freq_shift: c.get("freq_shift").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32,
            transformer_layers: 1,
            sample_size: c.get("sample_size").and_then(|v| v.as_u64()).unwrap_or(64) as usize,
        })
    }
}

/// Graph-building context: weights, config, and the values every block reads.
pub struct Unet<'a> {
    pub w: &'a mut ComponentWeights,
    pub cfg: &'a UnetConfig,
    /// Time embedding `[1, temb]` (one timestep for the whole batch).
    pub temb: Value,
    /// Text states `[batch, tokens, cross_attention_dim]`.
    pub context: Value,
}

impl Unet<'_> {
    /// ResnetBlock2D: norm-SiLU-conv, + projected time embedding, norm-SiLU-conv, + shortcut.
    fn resnet(&mut self, g: &mut Graph, p: &str, x: Value) -> Result<Value> {
        let (groups, eps) = (self.cfg.groups, self.cfg.eps);
        let h = self
            .w
            .group_norm(g, &format!("{p}.norm1"), x, groups, eps, true)?;
        let h = self.w.conv(g, &format!("{p}.conv1"), h, 1)?; // [b, out, h, w]
        let out = g.shape(h)[1];
        let t = g.unary(self.temb, crate::graph::UnaryOp::Silu)?;
        let t = self.w.linear(g, &format!("{p}.time_emb_proj"), t)?; // [1, out]
        let t = g.reshape(t, &[1, out, 1, 1])?;
        let h = g.add(h, t)?;
        let h = self
            .w
            .group_norm(g, &format!("{p}.norm2"), h, groups, eps, true)?;
        let h = self.w.conv(g, &format!("{p}.conv2"), h, 1)?;
        let skip = if self.w.has(&format!("{p}.conv_shortcut.weight")) {
            self.w.conv(g, &format!("{p}.conv_shortcut"), x, 1)?
        } else {
            x
        };
        g.add(skip, h)
    }

    /// Multi-head attention of diffusers' `Attention` (to_q/to_k/to_v without bias, to_out.0).
    fn attention(
        &mut self,
        g: &mut Graph,
        p: &str,
        x: Value,
        ctx: Option<Value>,
        heads: usize,
    ) -> Result<Value> {
        let kv_src = ctx.unwrap_or(x);
        let q = self.w.linear(g, &format!("{p}.to_q"), x)?;
        let k = self.w.linear(g, &format!("{p}.to_k"), kv_src)?;
        let v = self.w.linear(g, &format!("{p}.to_v"), kv_src)?;
        let lk = g.shape(k)[1] as u32;
        let a = g.attention(
            q,
            k,
            v,
            heads,
            heads,
            false,
            Dyn::Static(0),
            Dyn::Static(lk),
        )?;
        self.w.linear(g, &format!("{p}.to_out.0"), a)
    }

    /// Transformer2DModel with one BasicTransformerBlock: self-attention, cross-attention on
    /// the text, GEGLU feed-forward, each pre-LayerNorm with a residual.
    fn transformer(&mut self, g: &mut Graph, p: &str, x: Value, heads: usize) -> Result<Value> {
        let s = g.shape(x).to_vec(); // [b, c, h, w]
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let h = self
            .w
            .group_norm(g, &format!("{p}.norm"), x, self.cfg.groups, 1e-6, false)?;
        let inner = self.w.shape(&format!("{p}.proj_in.weight"))?[0];
        let mut t = if self.cfg.linear_projection {
            let t = g.reshape(h, &[b, c, hw])?;
            let t = g.transpose(t)?; // [b, hw, c]
            self.w.linear(g, &format!("{p}.proj_in"), t)?
        } else {
            let t = self.w.conv(g, &format!("{p}.proj_in"), h, 1)?; // [b, inner, h, w]
            let t = g.reshape(t, &[b, inner, hw])?;
            g.transpose(t)?
        }; // [b, hw, inner]
        let bp = format!("{p}.transformer_blocks.0");
        let n = self.w.layer_norm(g, &format!("{bp}.norm1"), t, 1e-5)?;
        let a = self.attention(g, &format!("{bp}.attn1"), n, None, heads)?;
        t = g.add(t, a)?;
        let n = self.w.layer_norm(g, &format!("{bp}.norm2"), t, 1e-5)?;
        let a = self.attention(g, &format!("{bp}.attn2"), n, Some(self.context), heads)?;
        t = g.add(t, a)?;
        let n = self.w.layer_norm(g, &format!("{bp}.norm3"), t, 1e-5)?;
        let f = self.w.linear(g, &format!("{bp}.ff.net.0.proj"), n)?; // [b, hw, 2 * ff]
        let f = g.glu(
            GluInput::Halves {
                x: f,
                gate_first: false,
            },
            Act::GeluErf,
        )?;
        let f = self.w.linear(g, &format!("{bp}.ff.net.2"), f)?;
        t = g.add(t, f)?;
        let out = if self.cfg.linear_projection {
            let o = self.w.linear(g, &format!("{p}.proj_out"), t)?; // [b, hw, c]
            let o = g.transpose(o)?;
            g.reshape(o, &[b, c, s[2], s[3]])?
        } else {
            let o = g.transpose(t)?; // [b, inner, hw]
            let o = g.reshape(o, &[b, inner, s[2], s[3]])?;
            self.w.conv(g, &format!("{p}.proj_out"), o, 1)?
        };
        g.add(out, x)
    }

    /// The whole UNet: sample `[b, in, h, w]` → noise prediction `[b, out, h, w]`.
    pub fn forward(&mut self, g: &mut Graph, sample: Value) -> Result<Value> {
        let cfg = self.cfg.clone();
        let n = cfg.block_out_channels.len();
        let mut x = self.w.conv(g, "conv_in", sample, 1)?;
        let mut skips = vec![x];
        for i in 0..n {
            let cross = cfg.down_blocks[i].starts_with("CrossAttn");
            for j in 0..cfg.layers_per_block {
                x = self.resnet(g, &format!("down_blocks.{i}.resnets.{j}"), x)?;
                if cross {
                    x = self.transformer(
                        g,
                        &format!("down_blocks.{i}.attentions.{j}"),
                        x,
                        cfg.heads[i],
                    )?;
                }
                skips.push(x);
            }
            if i + 1 < n {
                x = self
                    .w
                    .conv(g, &format!("down_blocks.{i}.downsamplers.0.conv"), x, 2)?;
                skips.push(x);
            }
        }
        x = self.resnet(g, "mid_block.resnets.0", x)?;
        x = self.transformer(g, "mid_block.attentions.0", x, cfg.heads[n - 1])?;
        x = self.resnet(g, "mid_block.resnets.1", x)?;
        let rev_heads: Vec<usize> = cfg.heads.iter().rev().copied().collect();
        for i in 0..n {
            let cross = cfg.up_blocks[i].starts_with("CrossAttn");
            for j in 0..=cfg.layers_per_block {
                let skip = skips
                    .pop()
                    .ok_or_else(|| cfg_err("skip connections do not match the blocks"))?;
                x = g.concat(x, skip, 1)?;
                x = self.resnet(g, &format!("up_blocks.{i}.resnets.{j}"), x)?;
                if cross {
                    x = self.transformer(
                        g,
                        &format!("up_blocks.{i}.attentions.{j}"),
                        x,
                        rev_heads[i],
                    )?;
                }
            }
            if i + 1 < n {
                x = g.upsample2x(x)?;
                x = self
                    .w
                    .conv(g, &format!("up_blocks.{i}.upsamplers.0.conv"), x, 1)?;
            }
        }
        let x = self
            .w
            .group_norm(g, "conv_norm_out", x, cfg.groups, cfg.eps, true)?;
        self.w.conv(g, "conv_out", x, 1)
    }
}

/// Time embedding of timestep value `t` `[1]`: sinusoidal projection, linear, SiLU, linear.
pub fn time_embedding(
    g: &mut Graph,
    w: &mut ComponentWeights,
    cfg: &UnetConfig,
    t: Value,
) -> Result<Value> {
    let e = g.timestep_embedding(
        t,
        cfg.block_out_channels[0],
        cfg.flip_sin_to_cos,
        cfg.freq_shift,
    )?;
    let e = w.linear(g, "time_embedding.linear_1", e)?;
    let e = g.unary(e, crate::graph::UnaryOp::Silu)?;
    w.linear(g, "time_embedding.linear_2", e)
}
