//! Convolution (`conv2d.wgsl`): an implicit GEMM on the shared tile loop on GPUs; on software
//! adapters the GEMM of its input windows (`IM2COL`, then matmul.wgsl's DIRECT variant).

use super::linear::{matmul_groups, matmul_key, weight_key, MatmulParams};
use super::{
    dispatch, elementwise_groups, need_f32, u, Binding, Bound, Ctx, Dispatch, Inferred, Kernel,
    Meta,
};
use crate::dtype::DType;
use crate::error::{shape_err, Result};

super::params!(
    /// Uniforms of `conv2d.wgsl`.
    ConvParams, "conv2d.wgsl", [] {
        m: u32, n: u32, k: u32, ci: u32,
        h: u32, w: u32, wo: u32, ks: u32,
        stride: u32, pad: u32, row_words: u32, has_bias: u32,
        row0: u32,
    }
);

/// 2D convolution, NCHW: x `[b, ci, h, w]`, w `[co, ci, k, k]` (k 1 or 3, any weight dtype),
/// optional bias `[co]`. Zero padding of `pad` on every side and `pad_end` more after the last
/// row and column (the VAE encoder's down-sampling pads (0, 1, 0, 1): `pad` 0, `pad_end` 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    pub stride: usize,
    pub pad: usize,
    pub pad_end: usize,
    pub bias: bool,
}

impl Conv2d {
    /// Output height and width for an `h x w` input and kernel size `k`.
    pub fn out_hw(&self, h: usize, w: usize, k: usize) -> Option<(usize, usize)> {
        let extra = 2 * self.pad + self.pad_end;
        let ho = (h + extra).checked_sub(k)? / self.stride + 1;
        let wo = (w + extra).checked_sub(k)? / self.stride + 1;
        Some((ho, wo))
    }
}

impl Kernel for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let (x, w) = (ins[0].0, ins[1].0);
        need_f32(self.name(), ins[0].1)?;
        if x.len() != 4 || w.len() != 4 || w[1] != x[1] || w[2] != w[3] || !matches!(w[2], 1 | 3) {
            return Err(err(format!(
                "expected x [b, ci, h, w], w [co, ci, k, k] with k 1 or 3; found {x:?}, {w:?}"
            )));
        }
        if !matches!(self.stride, 1 | 2) {
            return Err(err(format!("stride {} (1 or 2 supported)", self.stride)));
        }
        if self.bias && ins[2].0 != [w[0]] {
            return Err(err(format!(
                "bias shape {:?}, expected [{}]",
                ins[2].0, w[0]
            )));
        }
        let (ho, wo) = self
            .out_hw(x[2], x[3], w[2])
            .ok_or_else(|| err(format!("input {x:?} too small")))?;
        Ok(Some((vec![x[0], w[0], ho, wo], DType::F32)))
    }

    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let (x, w) = (&ins[0], &ins[1]);
        if w.parts.len() != 1 {
            return Err(shape_err(
                self.name(),
                format!(
                    "weight '{:?}' is split across bindings; convolution weights must fit one",
                    w.shape
                ),
            ));
        }
        let (b, ci, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (co, ks) = (w.shape[0], w.shape[2]);
        let (ho, wo) = (out.shape[2], out.shape[3]);
        let k = ci * ks * ks;
        let m = ho * wo;
        let bias = ins.get(2);
        let p = ConvParams {
            m: u(m),
            n: u(co),
            k: u(k),
            ci: u(ci),
            h: u(h),
            w: u(wd),
            wo: u(wo),
            ks: u(ks),
            stride: u(self.stride),
            pad: u(self.pad),
            row_words: u(w.dtype.row_words(k)),
            has_bias: bias.is_some() as u32,
            row0: 0,
        };
        let bias_buf = bias.map(|b| b.buf()).unwrap_or(x.buf());
        if ctx.gpu.features.software {
            // The GEMM of the input windows (lavapipe, against the barrier-free direct
            // convolution this replaced: SD 1.5-layout U-Net step at an 8x8 latent 4736 -> 2777
            // ms, VAE decode to 64 px 6174 -> 3263 ms).
            return self.encode_windows(ctx, w, x, bias_buf, out, p, b * m);
        }
        Ok(vec![dispatch(
            super::linear::gemm_key(ctx.gpu, weight_key("conv2d.wgsl", w.dtype)?, m, co, b),
            &p,
            vec![
                Binding::read(w.buf()),
                Binding::read(x.buf()),
                Binding::read(bias_buf),
                Binding::write(out.buf()),
            ],
            super::linear::gemm_groups(m, co, b),
        )])
    }
}

/// Bytes of scratch one convolution's window matrix may take: larger outputs go in chunks of
/// rows.
const WINDOWS_BYTES: usize = 16 << 20;

impl Conv2d {
    /// Software adapters: the windows of all images as a matrix [rows, k] (`IM2COL`, in chunks
    /// of rows that fit WINDOWS_BYTES), each chunk then through the software GEMM (weights read
    /// once per 8 window rows, straight from their dtype), stored NCHW.
    #[allow(clippy::too_many_arguments)]
    fn encode_windows(
        &self,
        ctx: &Ctx,
        w: &Bound,
        x: &Bound,
        bias: &std::sync::Arc<wgpu::Buffer>,
        out: &Bound,
        p: ConvParams,
        rows: usize,
    ) -> Result<Vec<Dispatch>> {
        let k = p.k as usize;
        let chunk = (WINDOWS_BYTES / (4 * k)).max(8) / 8 * 8;
        let chunk = chunk.min(rows.next_multiple_of(8));
        let cols = ctx.shared_scratch("conv-windows", (chunk * k * 4) as u64)?;
        let mut ds = Vec::new();
        for row0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - row0);
            let windows = ConvParams {
                n: u(n),
                row0: u(row0),
                has_bias: 0,
                ..p
            };
            let gemm = MatmulParams {
                m: u(n),
                n: p.n,
                k: p.k,
                row_words: p.row_words,
                w_batch_words: 0,
                out_off: 0,
                n_total: p.n,
                has_bias: p.has_bias,
                has_res: 0,
                out_pix: p.m,
                out_row0: u(row0),
                ..Default::default()
            };
            ds.push(dispatch(
                weight_key("conv2d.wgsl", w.dtype)?.def("IM2COL", ""),
                &windows,
                vec![
                    Binding::read(w.buf()),
                    Binding::read(x.buf()),
                    Binding::read(x.buf()),
                    Binding::write(&cols),
                ],
                elementwise_groups(n * k),
            ));
            ds.push(dispatch(
                matmul_key(ctx, w.dtype, k, n, p.n as usize, 1)?,
                &gemm,
                vec![
                    Binding::read(w.buf()),
                    Binding::read(&cols),
                    Binding::read(bias),
                    Binding::write(out.buf()),
                    Binding::read(&cols),
                ],
                matmul_groups(ctx, n, p.n as usize, 1),
            ));
        }
        Ok(ds)
    }
}
