//! Scheduler step (`shaders/scheduler.wgsl`): one elementwise kernel per denoising step that
//! applies classifier-free guidance, the x0 prediction and the update of any supported
//! scheduler from one row of a coefficient table (see [`crate::diffusion::schedulers`]).

use super::{elementwise_groups, Binding, Bound, Dispatch, KernelKey, Params};
use crate::error::{shape_err, Result};
use crate::graph::{Op, Value};

/// Coefficients per step (one row of the table): `[a, b, clip, p, q, r, s, t, in_scale]`,
/// see [`crate::diffusion::schedulers::StepCoeffs`].
pub const COEFFS: usize = 9;

/// The values one [`crate::Graph::scheduler_step`] reads and writes. `x`, `x0_prev` and
/// `unet_in` are state tensors (added with `Graph::tensor`) written in place.
#[derive(Clone, Copy, Debug)]
pub struct StepValues {
    /// Model output `[b, ..]`: `b` = batch of `x` (no guidance) or twice it (`[uncond, cond]`).
    pub model_out: Value,
    /// f32 `[steps, COEFFS]`, from `Schedule::coeff_table`.
    pub coeffs: Value,
    /// f32 `[1]`: the guidance scale (used when the model output has the CFG batch).
    pub guidance: Value,
    /// The scheduler's sample (unscaled latents), updated in place.
    pub x: Value,
    /// Previous step's x0 (DPM++ 2M's history), updated in place.
    pub x0_prev: Value,
    /// The next U-Net input: `k` copies of `x' * in_scale`, written in place.
    pub unet_in: Value,
    /// Standard normal noise like `x` (Euler ancestral, LCM); `None` when the scheduler draws none.
    pub noise: Option<Value>,
}

/// Encodes [`Op::SchedulerStep`]. Inputs: model_out, coeffs, guidance, x, x0_prev, unet_in
/// and, with noise, noise.
pub fn encode(op: &Op, ins: &[Bound]) -> Result<Vec<Dispatch>> {
    let Op::SchedulerStep { step, noise } = op else {
        return Err(shape_err(op.name(), "not a scheduler step"));
    };
    let n = ins[3].numel();
    let cfg = ins[0].numel() == 2 * n;
    let copies = ins[5].numel() / n.max(1);
    let rows = ins[1].shape[0];
    let [sa, ss, sm] = step.words();
    let mut key = KernelKey::new("scheduler.wgsl", "main");
    let mut bindings = vec![
        Binding::read(ins[0].buf()),
        Binding::read(ins[1].buf()),
        Binding::read(ins[2].buf()),
        Binding::write(ins[3].buf()),
        Binding::write(ins[4].buf()),
        Binding::write(ins[5].buf()),
    ];
    if *noise {
        key = key.def("NOISE", "");
        bindings.push(Binding::read(ins[6].buf()));
    }
    Ok(vec![Dispatch {
        key,
        params: Params::default()
            .u(n)
            .u(cfg as u32)
            .u(copies)
            .u(rows)
            .u(sa)
            .u(ss)
            .u(sm)
            .0,
        bindings,
        groups: elementwise_groups(n),
    }])
}

/// Shape rules of [`Op::SchedulerStep`] (see [`encode`] for the input order).
pub(crate) fn check(ins: &[(&[usize], crate::dtype::DType)], noise: bool) -> Result<()> {
    let err = |m: String| shape_err("scheduler_step", m);
    let numel = |i: usize| crate::tensor::numel(ins[i].0);
    if ins.iter().any(|i| i.1 != crate::dtype::DType::F32) {
        return Err(err("all inputs must be f32".into()));
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
    if numel(4) != n || numel(5) == 0 || numel(5) % n != 0 || (noise && numel(6) != n) {
        return Err(err(format!(
            "x {:?}: x0_prev {:?} and noise must match it, unet_in {:?} hold copies of it",
            ins[3].0, ins[4].0, ins[5].0
        )));
    }
    Ok(())
}
