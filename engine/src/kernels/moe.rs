//! Mixture-of-experts routing (`moe.wgsl`): the first piece of Gemma 4's and Qwen 3.5 MoE's
//! expert layers (the expert-indexed products that consume it come next).

use super::{
    dispatch, need_f32, u, Binding, Bound, Ctx, Dispatch, Inferred, Kernel, KernelKey, Meta,
};
use crate::dtype::DType;
use crate::error::{shape_err, Result};

/// Largest top k (`MAX_K` in `moe.wgsl`).
pub const MAX_TOP_K: usize = 32;

super::params!(
    /// Uniforms of `moe.wgsl`.
    RouterParams, "moe.wgsl", [] { experts: u32, k: u32, renorm: u32 }
);

/// Per row of router logits `[rows, experts]`: softmax (f32), the `top_k` most probable experts
/// (ties to the lower index), their probabilities renormalized to sum to 1 when `renorm`, times
/// `scale[expert]` (an f32 `[experts]` input: Gemma 4's per-expert scale, or ones). Output u32
/// `[rows, 2 top_k]`: (expert id, f32 bits of its weight) pairs, the most probable first.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeRouter {
    pub top_k: usize,
    pub renorm: bool,
}

impl Kernel for MoeRouter {
    fn name(&self) -> &'static str {
        "moe_router"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        need_f32(self.name(), ins[1].1)?;
        let (x, s) = (ins[0].0, ins[1].0);
        let experts = x.last().copied().unwrap_or(0);
        if x.len() != 2 || s != [experts] || experts == 0 {
            return Err(shape_err(
                self.name(),
                format!("logits {x:?} and scale {s:?} need [rows, experts] and [experts]"),
            ));
        }
        if self.top_k == 0 || self.top_k > experts.min(MAX_TOP_K) {
            return Err(shape_err(
                self.name(),
                format!(
                    "top {} of {experts} experts (1 to {})",
                    self.top_k,
                    experts.min(MAX_TOP_K)
                ),
            ));
        }
        Ok(Some((vec![x[0], 2 * self.top_k], DType::U32)))
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let p = RouterParams {
            experts: u(ins[0].shape[1]),
            k: u(self.top_k),
            renorm: self.renorm as u32,
        };
        Ok(vec![dispatch(
            KernelKey::new("moe.wgsl", "main"),
            &p,
            vec![
                Binding::read(ins[0].buf()),
                Binding::read(ins[1].buf()),
                Binding::write(out.buf()),
            ],
            [u(ins[0].shape[0]), 1, 1],
        )])
    }
}
