//! The blocks the U-Net and the VAE share, as diffusers defines them.

use crate::error::Result;
use crate::graph::{Graph, UnaryOp, Value};
use crate::weights::VarBuilder;
use crate::Dyn;

/// `ResnetBlock2D` with `out` channels: norm1-SiLU-conv1, + the projected time embedding
/// (`time_emb_proj`, when `temb` is given), norm2-SiLU-conv2, + the input (through a 1x1
/// `conv_shortcut` when the checkpoint has one, i.e. when the channel count changes).
pub fn resnet(
    g: &mut Graph,
    vb: &VarBuilder,
    x: Value,
    out: usize,
    groups: usize,
    eps: f32,
    temb: Option<Value>,
) -> Result<Value> {
    let h = vb.pp("norm1").group_norm(g, x, groups, eps, true)?;
    let mut h = vb.pp("conv1").conv(g, h, out, 3, 1)?; // [b, out, h, w]
    if let Some(temb) = temb {
        let t = g.unary(temb, UnaryOp::Silu)?;
        let t = vb.pp("time_emb_proj").linear(g, t, out)?; // [1 or b, out]
        let tb = g.shape(t)[0];
        let t = g.reshape(t, &[tb, out, 1, 1])?;
        h = g.add(h, t)?;
    }
    let h = vb.pp("norm2").group_norm(g, h, groups, eps, true)?;
    let h = vb.pp("conv2").conv(g, h, out, 3, 1)?;
    let skip = if vb.has("conv_shortcut.weight") {
        vb.pp("conv_shortcut").conv(g, x, out, 1, 1)?
    } else {
        x
    };
    g.add(skip, h)
}

/// Multi-head attention of diffusers' `Attention` over token sequences `[b, l, c]`: queries
/// from `x`, keys and values from `kv` (`x` itself for self-attention), `inner` = heads x head
/// dim. `names` are the projections' names (`to_q`, `to_k`, `to_v`, `to_out.0`, or the
/// pre-0.14 `query`, `key`, `value`, `proj_attn` that SD 1.x VAEs keep).
pub fn attention(
    g: &mut Graph,
    vb: &VarBuilder,
    x: Value,
    kv: Value,
    heads: usize,
    inner: usize,
    names: [&str; 4],
) -> Result<Value> {
    let c = *g.shape(x).last().unwrap_or(&0);
    let q = vb.pp(names[0]).linear(g, x, inner)?;
    let k = vb.pp(names[1]).linear(g, kv, inner)?;
    let v = vb.pp(names[2]).linear(g, kv, inner)?;
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
    vb.pp(names[3]).linear(g, a, c)
}
