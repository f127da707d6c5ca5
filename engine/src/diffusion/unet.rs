//! `UNet2DConditionModel` as a graph, read top to bottom like diffusers' forward: time
//! embedding, conv_in, down blocks (ResNet + optional cross-attention transformer, then a
//! strided-conv downsampler), the cross-attention mid block, up blocks (skip concatenation,
//! ResNet, optional transformer, nearest-2x + conv upsampler), norm + SiLU + conv_out.
//! Every size comes from `unet/config.json`; the loader checks each tensor's shape against it.

use super::blocks::{attention, resnet};
use crate::error::{Error, Result};
use crate::formats::config::Keys;
use crate::graph::{Act, GluInput, Graph, UnaryOp, Value};
use crate::weights::{VarBuilder, Weights};
use serde_json::Value as Json;

/// The parts of `unet/config.json` the graph needs.
#[derive(Clone, Debug)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
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
    /// Width of the time embedding (`time_embedding_dim`, else 4 x the first block's channels).
    pub time_embed_dim: usize,
    /// Default latent size (`sample_size`).
    pub sample_size: usize,
    /// LCM-distilled U-Nets: the width of the guidance-scale embedding added to the time
    /// embedding (`time_cond_proj_dim`); such a U-Net runs without classifier-free guidance.
    pub time_cond_proj_dim: Option<usize>,
    /// Transformer blocks in each level's cross-attention layers (`transformer_layers_per_block`;
    /// SDXL's 1, 2, 10), down the U-Net; the up blocks take them reversed, the mid block the last.
    pub transformer_layers: Vec<usize>,
    /// SDXL's added conditioning (`addition_embed_type` "text_time").
    pub text_time: Option<TextTime>,
}

/// SDXL's added conditioning: the pooled text embedding and six size numbers (`add_time_ids`:
/// original height and width, crop top and left, target height and width), each number
/// embedded sinusoidally, concatenated and projected by `add_embedding` into the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextTime {
    /// The sinusoidal width per number (`addition_time_embed_dim`, 256 for SDXL).
    pub time_dim: usize,
    /// The pooled text embedding's width: `projection_class_embeddings_input_dim` less the six
    /// numbers' embeddings (1280 for SDXL).
    pub pooled_dim: usize,
}

/// The number of SDXL's `add_time_ids` per image.
pub const TIME_IDS: usize = 6;

impl UnetConfig {
    /// Parses the config, rejecting what the graph does not implement.
    pub fn from_json(s: &str) -> Result<UnetConfig> {
        let c = Keys::parse("unet/config.json", s)?;
        let block_out_channels = c
            .per_block("block_out_channels", 0)?
            .filter(|v| !v.is_empty())
            .ok_or_else(|| c.err("missing 'block_out_channels'"))?;
        let n = block_out_channels.len();
        let down_blocks = c.strings("down_block_types")?;
        let up_blocks = c.strings("up_block_types")?;
        for b in down_blocks.iter().chain(&up_blocks) {
            if !matches!(
                b.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(Error::Unsupported(format!("UNet block type '{b}'")));
            }
        }
        c.only("mid_block_type", Json::from("UNetMidBlock2DCrossAttn"))?;
        // Keys that change the math (LCM's guidance embedding, class and added-time embeddings,
        // other time embeddings or activations) are refused at their defaults' values only.
        for k in [
            "class_embed_type",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "num_class_embeds",
            "time_embedding_act_fn",
            "timestep_post_act",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            c.only(k, Json::Null)?;
        }
        for k in [
            "dual_cross_attention",
            "only_cross_attention",
            "center_input_sample",
            "class_embeddings_concat",
            "mid_block_only_cross_attention",
            "resnet_skip_time_act",
        ] {
            c.off(k)?;
        }
        c.only("time_embedding_type", Json::from("positional"))?;
        c.only("act_fn", Json::from("silu"))?;
        c.only("resnet_time_scale_shift", Json::from("default"))?;
        c.only("attention_type", Json::from("default"))?;
        for k in ["conv_in_kernel", "conv_out_kernel"] {
            c.only(k, Json::from(3))?;
        }
        for k in [
            "downsample_padding",
            "mid_block_scale_factor",
            "resnet_out_scale_factor",
        ] {
            c.only_num(k, 1.0)?;
        }
        let heads = match c.per_block("num_attention_heads", n)? {
            Some(h) => h,
            None => c
                .per_block("attention_head_dim", n)?
                .ok_or_else(|| c.err("missing 'attention_head_dim'"))?,
        };
        let transformer_layers = c
            .per_block("transformer_layers_per_block", n)?
            .unwrap_or(vec![1; n]);
        if transformer_layers.iter().any(|&t| t == 0 || t > 64) {
            return Err(c.err(format!(
                "transformer_layers_per_block {transformer_layers:?} (1 to 64 each)"
            )));
        }
        let text_time = match c.get("addition_embed_type") {
            None | Some(Json::Null) => {
                c.only("addition_time_embed_dim", Json::Null)?;
                c.only("projection_class_embeddings_input_dim", Json::Null)?;
                None
            }
            Some(Json::String(t)) if t == "text_time" => {
                let time_dim = c.need_count("addition_time_embed_dim")?;
                let input = c.need_count("projection_class_embeddings_input_dim")?;
                let pooled_dim = input
                    .checked_sub(TIME_IDS * time_dim)
                    .filter(|&p| p > 0)
                    .ok_or_else(|| {
                        c.err(format!(
                            "projection_class_embeddings_input_dim {input} leaves no room for a \
                             pooled text embedding beside {TIME_IDS} x addition_time_embed_dim \
                             {time_dim}"
                        ))
                    })?;
                Some(TextTime {
                    time_dim,
                    pooled_dim,
                })
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "U-Net addition_embed_type {other} (only \"text_time\", SDXL's)"
                )))
            }
        };
        if down_blocks.len() != n
            || up_blocks.len() != n
            || heads.len() != n
            || transformer_layers.len() != n
        {
            return Err(c.err(format!(
                "{n} block_out_channels but {} down, {} up blocks, {} head counts, {} \
                 transformer_layers_per_block",
                down_blocks.len(),
                up_blocks.len(),
                heads.len(),
                transformer_layers.len()
            )));
        }
        let groups = c.count("norm_num_groups", 32)?;
        if let Some(&bad) = block_out_channels
            .iter()
            .zip(&heads)
            .find(|(&ch, &h)| groups == 0 || ch % groups != 0 || ch % h != 0)
            .map(|(ch, _)| ch)
        {
            return Err(c.err(format!(
                "{bad} channels do not divide into {groups} groups and the block's heads"
            )));
        }
        Ok(UnetConfig {
            in_channels: c.count("in_channels", 4)?,
            out_channels: c.count("out_channels", 4)?,
            time_embed_dim: c.count("time_embedding_dim", 4 * block_out_channels[0])?,
            time_cond_proj_dim: match c.get("time_cond_proj_dim") {
                None | Some(Json::Null) => None,
                Some(_) => Some(c.count("time_cond_proj_dim", 0)?).filter(|&d| d > 0),
            },
            block_out_channels,
            down_blocks,
            up_blocks,
            layers_per_block: c.count("layers_per_block", 2)?,
            heads,
            groups,
            eps: c.num("norm_eps", 1e-5)? as f32,
            cross_attention_dim: c.need_count("cross_attention_dim")?,
            linear_projection: c.flag("use_linear_projection", false)?,
            flip_sin_to_cos: c.flag("flip_sin_to_cos", true)?,
            freq_shift: c.num("freq_shift", 0.0)? as f32,
            sample_size: c.count("sample_size", 64)?,
            transformer_layers,
            text_time,
        })
    }
}

/// The U-Net: its config and its weights.
pub struct Unet {
    pub cfg: UnetConfig,
    pub weights: Weights,
}

/// What every block of one forward pass reads.
struct Pass<'a> {
    cfg: &'a UnetConfig,
    /// Time embedding `[1, temb]` (one timestep for the whole batch), or `[b, temb]` with
    /// SDXL's per-image added conditioning.
    temb: Value,
    /// Text states `[batch, tokens, cross_attention_dim]`.
    context: Value,
}

impl Unet {
    /// The noise prediction `[b, out, h, w]` for `sample` `[b, in, h, w]` at timestep `t` (f32
    /// `[1]`, one timestep for the batch) given text states `context` `[b, n, cross_dim]`.
    pub fn forward(&self, g: &mut Graph, sample: Value, t: Value, context: Value) -> Result<Value> {
        self.forward_cond(g, sample, t, context, &UnetExtra::default())
    }

    /// [`Unet::forward`] with the conditioning some U-Nets take beside the text states.
    pub fn forward_cond(
        &self,
        g: &mut Graph,
        sample: Value,
        t: Value,
        context: Value,
        extra: &UnetExtra,
    ) -> Result<Value> {
        let width = g.shape(context).last().copied().unwrap_or(0);
        if width != self.cfg.cross_attention_dim {
            return Err(Error::Data {
                name: "unet/config.json".into(),
                msg: format!(
                    "cross_attention_dim is {}, but the text states are {width} wide",
                    self.cfg.cross_attention_dim
                ),
            });
        }
        let vb = self.weights.root();
        let pass = Pass {
            cfg: &self.cfg,
            temb: self.time_embedding(g, &vb, t, extra)?,
            context,
        };
        pass.forward(g, &vb, sample)
    }

    /// Time embedding of timestep value `t` `[1]`: sinusoidal projection, linear, SiLU, linear.
    /// An LCM U-Net adds `cond_proj` of the guidance embedding before `linear_1`; SDXL adds its
    /// added embedding after `linear_2`.
    fn time_embedding(
        &self,
        g: &mut Graph,
        vb: &VarBuilder,
        t: Value,
        extra: &UnetExtra,
    ) -> Result<Value> {
        let cfg = &self.cfg;
        let mut e = g.timestep_embedding(
            t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?;
        let tvb = vb.pp("time_embedding");
        if let (Some(c), Some(_)) = (extra.guidance, cfg.time_cond_proj_dim) {
            let p = tvb
                .pp("cond_proj")
                .linear(g, c, cfg.block_out_channels[0])?;
            e = g.add(e, p)?;
        }
        let e = tvb.pp("linear_1").linear(g, e, cfg.time_embed_dim)?;
        let e = g.unary(e, UnaryOp::Silu)?;
        let e = tvb.pp("linear_2").linear(g, e, cfg.time_embed_dim)?;
        if cfg.text_time.is_none() {
            return Ok(e);
        }
        let Some(a) = extra.added else {
            return Err(Error::Data {
                name: "unet".into(),
                msg: "an SDXL U-Net (addition_embed_type \"text_time\") needs its added \
                      embedding ([`Unet::added_embedding`] of the pooled text embedding and the \
                      size numbers)"
                    .into(),
            });
        };
        g.add(e, a)
    }

    /// SDXL's added embedding `[b, time_embed_dim]`: `add_embedding` of the pooled text
    /// embedding `[b, pooled_dim]` beside the sinusoidal embedding of each size number (f32
    /// `[b * 6]`, `add_time_ids`). The same at every step, so a generation computes it once.
    pub fn added_embedding(&self, g: &mut Graph, pooled: Value, time_ids: Value) -> Result<Value> {
        let cfg = &self.cfg;
        let tt = cfg.text_time.ok_or_else(|| {
            Error::Unsupported("an added embedding for a U-Net without SDXL's text_time".into())
        })?;
        let b = g.shape(pooled)[0];
        let te =
            g.timestep_embedding(time_ids, tt.time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?;
        let te = g.reshape(te, &[b, TIME_IDS * tt.time_dim])?;
        let add = g.concat(pooled, te, 1)?;
        let avb = self.weights.root().pp("add_embedding");
        let a = avb.pp("linear_1").linear(g, add, cfg.time_embed_dim)?;
        let a = g.unary(a, UnaryOp::Silu)?;
        avb.pp("linear_2").linear(g, a, cfg.time_embed_dim)
    }
}

/// Conditioning some U-Nets take beside the text states (all `None` for SD 1.x/2.x).
#[derive(Clone, Copy, Debug, Default)]
pub struct UnetExtra {
    /// An LCM U-Net's guidance-scale embedding `[1, time_cond_proj_dim]` ([`guidance_embedding`]).
    pub guidance: Option<Value>,
    /// SDXL: the added embedding `[b, time_embed_dim]` ([`Unet::added_embedding`]).
    pub added: Option<Value>,
}

impl Pass<'_> {
    fn resnet(&self, g: &mut Graph, vb: &VarBuilder, x: Value, out: usize) -> Result<Value> {
        resnet(
            g,
            vb,
            x,
            out,
            self.cfg.groups,
            self.cfg.eps,
            Some(self.temb),
        )
    }

    /// Transformer2DModel with `layers` BasicTransformerBlocks: self-attention, cross-attention
    /// on the text, GEGLU feed-forward, each pre-LayerNorm with a residual.
    fn transformer(
        &self,
        g: &mut Graph,
        vb: &VarBuilder,
        x: Value,
        heads: usize,
        layers: usize,
    ) -> Result<Value> {
        let s = g.shape(x).to_vec(); // [b, c, h, w]
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let inner = c; // heads x (c / heads)
        let h = vb
            .pp("norm")
            .group_norm(g, x, self.cfg.groups, 1e-6, false)?;
        let mut t = if self.cfg.linear_projection {
            let t = g.reshape(h, &[b, c, hw])?;
            let t = g.transpose(t)?; // [b, hw, c]
            vb.pp("proj_in").linear(g, t, inner)?
        } else {
            let t = vb.pp("proj_in").conv(g, h, inner, 1, 1)?; // [b, inner, h, w]
            let t = g.reshape(t, &[b, inner, hw])?;
            g.transpose(t)?
        }; // [b, hw, inner]
        for k in 0..layers {
            let blk = vb.pp("transformer_blocks").pp(k);
            let names = ["to_q", "to_k", "to_v", "to_out.0"];
            let n = blk.pp("norm1").layer_norm(g, t, 1e-5)?;
            let a = attention(g, &blk.pp("attn1"), n, n, heads, inner, names)?;
            t = g.add(t, a)?;
            let n = blk.pp("norm2").layer_norm(g, t, 1e-5)?;
            let a = attention(g, &blk.pp("attn2"), n, self.context, heads, inner, names)?;
            t = g.add(t, a)?;
            let n = blk.pp("norm3").layer_norm(g, t, 1e-5)?;
            let ff = 4 * inner;
            let f = blk.pp("ff.net.0.proj").linear(g, n, 2 * ff)?; // [b, hw, 2 * ff]
            let f = g.glu(
                GluInput::Halves {
                    x: f,
                    gate_first: false,
                },
                Act::GeluErf,
            )?;
            let f = blk.pp("ff.net.2").linear(g, f, inner)?;
            t = g.add(t, f)?;
        }
        let out = if self.cfg.linear_projection {
            let o = vb.pp("proj_out").linear(g, t, c)?; // [b, hw, c]
            let o = g.transpose(o)?;
            g.reshape(o, &[b, c, s[2], s[3]])?
        } else {
            let o = g.transpose(t)?; // [b, inner, hw]
            let o = g.reshape(o, &[b, inner, s[2], s[3]])?;
            vb.pp("proj_out").conv(g, o, c, 1, 1)?
        };
        g.add(out, x)
    }

    /// The whole U-Net after the time embedding.
    fn forward(&self, g: &mut Graph, vb: &VarBuilder, sample: Value) -> Result<Value> {
        let cfg = self.cfg;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut x = vb.pp("conv_in").conv(g, sample, ch[0], 3, 1)?;
        let mut skips = vec![x];
        for i in 0..n {
            let blk = vb.pp("down_blocks").pp(i);
            let cross = cfg.down_blocks[i].starts_with("CrossAttn");
            for j in 0..cfg.layers_per_block {
                x = self.resnet(g, &blk.pp("resnets").pp(j), x, ch[i])?;
                if cross {
                    let tl = cfg.transformer_layers[i];
                    x = self.transformer(g, &blk.pp("attentions").pp(j), x, cfg.heads[i], tl)?;
                }
                skips.push(x);
            }
            if i + 1 < n {
                x = blk.pp("downsamplers.0.conv").conv(g, x, ch[i], 3, 2)?;
                skips.push(x);
            }
        }
        let mid = vb.pp("mid_block");
        x = self.resnet(g, &mid.pp("resnets.0"), x, ch[n - 1])?;
        let tl = cfg.transformer_layers[n - 1];
        x = self.transformer(g, &mid.pp("attentions.0"), x, cfg.heads[n - 1], tl)?;
        x = self.resnet(g, &mid.pp("resnets.1"), x, ch[n - 1])?;
        for (i, (&c, &heads)) in ch.iter().rev().zip(cfg.heads.iter().rev()).enumerate() {
            let tl = cfg.transformer_layers[n - 1 - i];
            let blk = vb.pp("up_blocks").pp(i);
            let cross = cfg.up_blocks[i].starts_with("CrossAttn");
            for j in 0..=cfg.layers_per_block {
                let skip = skips.pop().ok_or_else(|| {
                    Error::Unsupported("skip connections do not match the blocks".into())
                })?;
                x = g.concat(x, skip, 1)?;
                x = self.resnet(g, &blk.pp("resnets").pp(j), x, c)?;
                if cross {
                    x = self.transformer(g, &blk.pp("attentions").pp(j), x, heads, tl)?;
                }
            }
            if i + 1 < n {
                x = g.upsample2x(x)?;
                x = blk.pp("upsamplers.0.conv").conv(g, x, c, 3, 1)?;
            }
        }
        let x = vb
            .pp("conv_norm_out")
            .group_norm(g, x, cfg.groups, cfg.eps, true)?;
        vb.pp("conv_out").conv(g, x, cfg.out_channels, 3, 1)
    }
}

/// The guidance-scale embedding of an LCM U-Net (diffusers' `get_guidance_scale_embedding` of
/// `w = guidance - 1`, in f32 as torch computes it): `[sin(1000 w f_i), cos(1000 w f_i)]` with
/// `f_i = exp(-i ln(10000) / (dim/2 - 1))`, zero-padded to an odd `dim`.
pub fn guidance_embedding(guidance: f32, dim: usize) -> Vec<f32> {
    let w = (guidance - 1.0) * 1000.0;
    let half = dim / 2;
    let step = (10000f32).ln() / (half.max(2) - 1) as f32;
    let args: Vec<f32> = (0..half)
        .map(|i| w * ((i as f32 * -step) as f64).exp() as f32)
        .collect();
    let mut out: Vec<f32> = args.iter().map(|&a| (a as f64).sin() as f32).collect();
    out.extend(args.iter().map(|&a| (a as f64).cos() as f32));
    out.resize(dim, 0.0);
    out
}
