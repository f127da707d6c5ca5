//! Scheduler step (`shaders/scheduler.wgsl`): one elementwise kernel per denoising step that
//! applies classifier-free guidance, the x0 prediction and the update of any supported
//! scheduler from one row of a coefficient table (the rows are made by
//! `diffusion::schedulers`).

use super::{
    dispatch, elementwise_groups, u, Binding, Bound, Ctx, Dispatch, Dyn, Inferred, Kernel,
    KernelKey, Meta,
};
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tensor::numel;

/// Coefficients per step (one row of the table): `[a, b, clip, p, q, r, s, t, in_scale]`,
/// see [`StepCoeffs`].
pub const COEFFS: usize = 9;

super::params!(
    /// Uniforms of `scheduler.wgsl`.
    SchedulerParams, "scheduler.wgsl", [] {
        n: u32, cfg: u32, copies: u32, rows: u32, step_add: u32, step_slot: u32, step_mul: u32,
    }
);

super::params!(
    /// Uniforms of `scheduler.wgsl`'s BLEND entry point.
    BlendParams, "scheduler.wgsl", ["BLEND"] {
        n: u32, hw: u32, copies: u32, rows: u32, step_add: u32, step_slot: u32, step_mul: u32,
    }
);

/// One row of the coefficient table (see [`crate::diffusion::schedulers`] for the update it parametrizes).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepCoeffs {
    /// `x0 = a x + b m`.
    pub a: f32,
    pub b: f32,
    /// `x0` is clamped to `[-clip, clip]` when `clip > 0`.
    pub clip: f32,
    /// `x' = p x + q x0 + r x0_prev + s noise + t m`.
    pub p: f32,
    pub q: f32,
    pub r: f32,
    pub s: f32,
    pub t: f32,
    /// `unet_in = in_scale x'` (the next step's `scale_model_input`).
    pub in_scale: f32,
}

impl StepCoeffs {
    /// A row from f64 coefficients (each rounded to f32 once).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: f64,
        b: f64,
        clip: f64,
        p: f64,
        q: f64,
        r: f64,
        s: f64,
        t: f64,
        in_scale: f64,
    ) -> Self {
        let f = |v: f64| v as f32;
        StepCoeffs {
            a: f(a),
            b: f(b),
            clip: f(clip),
            p: f(p),
            q: f(q),
            r: f(r),
            s: f(s),
            t: f(t),
            in_scale: f(in_scale),
        }
    }

    /// The row as the kernel reads it: `[a, b, clip, p, q, r, s, t, in_scale]`.
    pub fn to_row(&self) -> [f32; COEFFS] {
        [
            self.a,
            self.b,
            self.clip,
            self.p,
            self.q,
            self.r,
            self.s,
            self.t,
            self.in_scale,
        ]
    }

    /// A row from the kernel's layout.
    pub fn from_row(r: &[f32]) -> Self {
        StepCoeffs {
            a: r[0],
            b: r[1],
            clip: r[2],
            p: r[3],
            q: r[4],
            r: r[5],
            s: r[6],
            t: r[7],
            in_scale: r[8],
        }
    }
}

/// One denoising step at coefficient row `step`. Inputs: model_out (`[b, ..]`: `b` = batch of
/// `x`, or twice it for CFG `[uncond, cond]`), coeffs f32 `[steps, COEFFS]`, guidance f32 `[1]`,
/// then the state written in place: x, x0_prev, unet_in (copies of x), status u32 `[1]` (the
/// first step whose values were NaN or infinite, by atomic minimum; start it at `u32::MAX`),
/// and, with `noise`, a noise input like x.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerStep {
    pub step: Dyn,
    pub noise: bool,
}

impl Kernel for SchedulerStep {
    fn name(&self) -> &'static str {
        "scheduler_step"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        let numel = |i: usize| numel(ins[i].0);
        if ins
            .iter()
            .enumerate()
            .any(|(k, i)| i.1 != [DType::F32, DType::U32][(k == 6) as usize])
        {
            return Err(err("inputs must be f32 (the status u32)".into()));
        }
        if numel(6) != 1 {
            return Err(err(format!("status {:?}, expected [1]", ins[6].0)));
        }
        let n = numel(3);
        if n == 0 || (numel(0) != n && numel(0) != 2 * n) {
            return Err(err(format!(
                "model output {:?} must hold x {:?} once or twice (CFG)",
                ins[0].0, ins[3].0
            )));
        }
        if ins[1].0.len() != 2 || ins[1].0[1] != COEFFS || ins[1].0[0] == 0 {
            return Err(err(format!(
                "coefficients {:?}, expected [steps, {COEFFS}]",
                ins[1].0
            )));
        }
        if numel(2) != 1 {
            return Err(err(format!("guidance {:?}, expected [1]", ins[2].0)));
        }
        if numel(4) != n || numel(5) == 0 || numel(5) % n != 0 || (self.noise && numel(7) != n) {
            return Err(err(format!(
                "x {:?}: x0_prev {:?} and noise must match it, unet_in {:?} hold copies of it",
                ins[3].0, ins[4].0, ins[5].0
            )));
        }
        Ok(None)
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], _: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let n = ins[3].numel();
        let [step_add, step_slot, step_mul] = self.step.words();
        let p = SchedulerParams {
            n: u(n),
            cfg: (ins[0].numel() == 2 * n) as u32,
            copies: u(ins[5].numel() / n.max(1)),
            rows: u(ins[1].shape[0]),
            step_add,
            step_slot,
            step_mul,
        };
        let mut key = KernelKey::new("scheduler.wgsl", "main");
        let mut bindings = vec![
            Binding::read(ins[0].buf()),
            Binding::read(ins[1].buf()),
            Binding::read(ins[2].buf()),
            Binding::write(ins[3].buf()),
            Binding::write(ins[4].buf()),
            Binding::write(ins[5].buf()),
            Binding::write(ins[6].buf()),
        ];
        if self.noise {
            key = key.def("NOISE", "");
            bindings.push(Binding::read(ins[7].buf()));
        }
        Ok(vec![dispatch(key, &p, bindings, elementwise_groups(n))])
    }
}

/// Inpainting with an ordinary U-Net, after the step at row `step`: the pixels outside the
/// mask go back to the image's latents at the next step's noise level. Inputs: table f32
/// `[steps, 3]` (per step `[a, b, in_scale]`), init `[1, c, h, w]` (the image's latents),
/// noise (like init), mask `[1, 1, h, w]` (1 = repaint); then the state written in place: x
/// (like init) and unet_in (copies of x):
/// `x = (1 - mask) (a init + b noise) + mask x`, `unet_in[k] = in_scale x`.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentBlend {
    pub step: Dyn,
}

impl Kernel for LatentBlend {
    fn name(&self) -> &'static str {
        "latent_blend"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        let err = |m: String| shape_err(self.name(), m);
        if ins.iter().any(|i| i.1 != DType::F32) {
            return Err(err("inputs must be f32".into()));
        }
        let t = ins[0].0;
        if t.len() != 2 || t[1] != 3 || t[0] == 0 {
            return Err(err(format!("table {t:?}, expected [steps, 3]")));
        }
        let x = ins[4].0;
        let (m, n) = (ins[3].0, numel(x));
        let ok = x.len() == 4
            && x[0] == 1
            && ins[1].0 == x
            && ins[2].0 == x
            && m == [1, 1, x[2], x[3]]
            && n > 0
            && numel(ins[5].0).is_multiple_of(n)
            && numel(ins[5].0) > 0;
        if !ok {
            return Err(err(format!(
                "x {x:?}: init and noise must match it, the mask be [1, 1, h, w] ({m:?}), \
                 unet_in {:?} hold copies of it",
                ins[5].0
            )));
        }
        Ok(None)
    }

    fn encode(&self, _: &Ctx, ins: &[Bound], _: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let n = ins[4].numel();
        let [step_add, step_slot, step_mul] = self.step.words();
        let p = BlendParams {
            n: u(n),
            hw: u(ins[3].numel()),
            copies: u(ins[5].numel() / n.max(1)),
            rows: u(ins[0].shape[0]),
            step_add,
            step_slot,
            step_mul,
        };
        let bindings = vec![
            Binding::read(ins[0].buf()),
            Binding::read(ins[1].buf()),
            Binding::read(ins[2].buf()),
            Binding::read(ins[3].buf()),
            Binding::write(ins[4].buf()),
            Binding::write(ins[5].buf()),
        ];
        Ok(vec![dispatch(
            KernelKey::new("scheduler.wgsl", "blend").def("BLEND", ""),
            &p,
            bindings,
            elementwise_groups(n),
        )])
    }
}
