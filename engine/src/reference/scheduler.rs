//! CPU reference of `scheduler.wgsl`: one denoising step from a coefficient row, in f64.

use crate::kernels::scheduler::StepCoeffs;

/// The state a step updates in place.
#[derive(Clone, Debug, PartialEq)]
pub struct StepState {
    /// The scheduler's sample `[n]`.
    pub x: Vec<f32>,
    /// The previous step's x0 `[n]`.
    pub x0_prev: Vec<f32>,
    /// The next U-Net input `[copies, n]`.
    pub unet_in: Vec<f32>,
}

/// Applies one step: `model_out` holds `n` values, or `2n` (`[uncond, cond]`) for guidance
/// `g`; `noise` is read only when `c.s != 0` (likewise `x0_prev` when `c.r != 0`).
pub fn step(c: &StepCoeffs, model_out: &[f32], g: f32, noise: Option<&[f32]>, st: &mut StepState) {
    let n = st.x.len();
    let cfg = model_out.len() == 2 * n;
    let f = |v: f32| v as f64;
    for i in 0..n {
        let m = if cfg {
            let (u, mc) = (f(model_out[i]), f(model_out[n + i]));
            if g > 1.0 {
                u + f(g) * (mc - u)
            } else {
                mc
            }
        } else {
            f(model_out[i])
        };
        let x = f(st.x[i]);
        let mut x0 = f(c.a) * x + f(c.b) * m;
        if c.clip > 0.0 {
            x0 = x0.clamp(-f(c.clip), f(c.clip));
        }
        let mut y = f(c.p) * x + f(c.q) * x0 + f(c.t) * m;
        if c.r != 0.0 {
            y += f(c.r) * f(st.x0_prev[i]);
        }
        if c.s != 0.0 {
            y += f(c.s) * noise.map_or(0.0, |z| f(z[i]));
        }
        st.x[i] = y as f32;
        st.x0_prev[i] = x0 as f32;
        for k in 0..st.unet_in.len() / n.max(1) {
            st.unet_in[k * n + i] = (y * f(c.in_scale)) as f32;
        }
    }
}
