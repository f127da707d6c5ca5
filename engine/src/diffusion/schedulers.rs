//! Diffusion schedulers as diffusers defines them, configured from a `scheduler_config.json`.
//!
//! All the maths of a schedule (timesteps, sigmas, per-step coefficients) runs once on the CPU
//! in [`SchedulerConfig::schedule`]; the GPU runs one kernel per step
//! ([`crate::Graph::scheduler_step`]) that reads row `i` of the coefficient table. Every
//! scheduler is the same update with its own [`StepCoeffs`]:
//!
//! ```text
//! m   = cfg && g > 1 ? m_uncond + g (m_cond - m_uncond) : m_cond
//! x0  = clamp(a x + b m, -clip, clip)          (no clamp when clip = 0)
//! x'  = p x + q x0 + r x0_prev + s noise + t m
//! x0_prev <- x0;  unet_in[k] <- in_scale x'   for each batch copy k
//! ```
//!
//! `x` is the scheduler's sample (diffusers' `sample`, unscaled), `m` the model output and
//! `in_scale` the `scale_model_input` factor of the next step. With `ac` the training
//! `alphas_cumprod` (f32, computed exactly as diffusers does), per step `i` at timestep `t`:
//!
//! - **DDIM** (`scheduling_ddim.py`, `eta = 0`): `ap = ac[t]`, `ap' = ac[t - T/n]` (or
//!   `final_alpha_cumprod`). epsilon: `a = 1/√ap, b = -√(1-ap)/√ap`, `q = √ap', t = √(1-ap')`;
//!   v: `a = √ap, b = -√(1-ap)`, `q = √ap', p = √(1-ap')√(1-ap), t = √(1-ap')√ap` (the
//!   predicted epsilon is `√ap m + √(1-ap) x`). `clip = clip_sample_range` with `clip_sample`.
//! - **Euler** (`scheduling_euler_discrete.py`, no churn): `σ = sigmas[i], σ' = sigmas[i+1]`.
//!   epsilon: `a = 1, b = -σ`; v: `a = 1/(σ²+1), b = -σ/√(σ²+1)`; `p = σ'/σ, q = 1 - σ'/σ`.
//!   `in_scale = 1/√(σ'²+1)`.
//! - **Euler ancestral** (`scheduling_euler_ancestral_discrete.py`): x0 as Euler,
//!   `σ_up = √(σ'²(σ²-σ'²)/σ²)`, `σ_down = √(σ'²-σ_up²)`, `p = σ_down/σ, q = 1 - p, s = σ_up`.
//!   diffusers draws noise at every step (the last with `σ_up = 0`).
//! - **DPM++ 2M** (`scheduling_dpmsolver_multistep.py`, `dpmsolver++`): `α(σ) = 1/√(σ²+1)`,
//!   `σ_vp = σα`, `λ = ln α - ln σ_vp`, `h = λ_t - λ_s0`, `r0 = (λ_s0 - λ_s1)/h`. epsilon:
//!   `a = 1/α_s, b = -σ_s`; v: `a = α_s, b = -σ_vp,s`. First order: `p = σ_vp,t/σ_vp,s`,
//!   `q = -α_t(e^-h - 1)`. Second order midpoint: `q = -α_t(e^-h - 1)(1 + 1/(2 r0))`,
//!   `r = α_t(e^-h - 1)/(2 r0)`; heun: `q = -α_t(e^-h - 1) + α_t((e^-h - 1)/h + 1)/r0`,
//!   `r = -α_t((e^-h - 1)/h + 1)/r0`. First order at step 0 (no history yet) and at the last
//!   step: diffusers' `lower_order_final` condition always holds there because the final sigma
//!   is zero (`final_sigmas_type` "zero", the only one supported), whatever
//!   `lower_order_final`/`euler_at_final` say, and the first-order update with `σ_t = 0` is
//!   `x' = x0`. (`lower_order_second` only matters for order 3.)
//! - **LCM** (`scheduling_lcm.py`): x0 as DDIM, `c_skip = 0.25/((t τ)² + 0.25)`,
//!   `c_out = t τ/√((t τ)² + 0.25)` with `τ = timestep_scaling`; `ap'` of the next timestep.
//!   `p = √ap' c_skip, q = √ap' c_out, s = √(1-ap')`, except the last step which returns the
//!   denoised sample without noise: `p = c_skip, q = c_out, s = 0`.
//!
//! After the last step `in_scale = 1` (unet_in then holds the final latents).

use crate::error::{Error, Result};
use crate::formats::config::Keys;
pub use crate::kernels::scheduler::{StepCoeffs, COEFFS};
use serde_json::Value as Json;
use timesteps::interp;

mod timesteps;

/// The most training timesteps a scheduler config may claim.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The schedulers Kiln runs (as text: their CLI names `ddim`, `euler`, `euler-a`, `dpm++2m`,
/// `lcm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Lcm,
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_cli(s)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl TryFrom<String> for SchedulerKind {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::from_cli(&s)
    }
}

impl From<SchedulerKind> for String {
    fn from(k: SchedulerKind) -> String {
        k.cli_name().to_string()
    }
}

impl SchedulerKind {
    /// All kinds, in CLI order.
    pub const ALL: [SchedulerKind; 5] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmSolverMultistep,
        Self::Lcm,
    ];

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// The CLI name (`--scheduler`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmSolverMultistep => "dpm++2m",
            Self::Lcm => "lcm",
        }
    }

    /// The kind of a CLI name.
    pub fn from_cli(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name() == name)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "scheduler '{name}' (expected one of ddim, euler, euler-a, dpm++2m, lcm)"
                ))
            })
    }

    fn from_class(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// A parsed `scheduler_config.json`, with diffusers' per-class defaults for absent keys.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub kind: SchedulerKind,
    pub prediction: Prediction,
    /// Set when the file names a class Kiln does not run; says which one is used instead.
    pub note: Option<String>,
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: BetaSchedule,
    spacing: Spacing,
    steps_offset: usize,
    set_alpha_to_one: bool,
    /// `clip_sample_range` when `clip_sample` (DDIM, LCM).
    clip: Option<f64>,
    original_inference_steps: usize,
    timestep_scaling: f64,
    solver_order: usize,
    heun: bool,
    lambda_min_clipped: f64,
}

impl SchedulerConfig {
    /// Parses a diffusers `scheduler_config.json`. `kind` overrides the file's `_class_name`
    /// (the config's values still apply, as diffusers' `from_config` does); a class Kiln does
    /// not run maps to Euler with a [`Self::note`].
    pub fn from_json(text: &str, kind: Option<SchedulerKind>) -> Result<Self> {
        let keys = Keys::parse("scheduler_config.json", text)?;
        let (kind, note) = scheduler_kind(&keys, kind)?;
        use SchedulerKind::*;
        let (start, end, schedule, spacing) = match kind {
            Lcm => (0.00085, 0.012, "scaled_linear", "leading"),
            Ddim => (0.0001, 0.02, "linear", "leading"),
            _ => (0.0001, 0.02, "linear", "linspace"),
        };
        let (prediction, beta_schedule, spacing) = named_choices(&keys, schedule, spacing)?;
        refuse_unsupported_options(&keys, kind)?;
        let solver_order = keys.count("solver_order", 2)?;
        if kind == DpmSolverMultistep && !matches!(solver_order, 1 | 2) {
            return Err(Error::Unsupported(format!(
                "solver_order {solver_order} (1 or 2 supported)"
            )));
        }
        let heun = match keys.text("solver_type", "midpoint")? {
            "midpoint" => false,
            "heun" => true,
            other if kind == DpmSolverMultistep => {
                return Err(Error::Unsupported(format!(
                    "solver_type '{other}' (expected midpoint or heun)"
                )))
            }
            _ => false,
        };
        let num_train_timesteps = keys.count("num_train_timesteps", 1000)?;
        // Every released pipeline trains on 1000 steps; the tables are sized by this number, so
        // a damaged value is refused rather than allocated (found by fuzzing: 4 GB of betas).
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&num_train_timesteps) {
            return Err(keys.err(format!(
                "'num_train_timesteps': expected 2 to {MAX_TRAIN_TIMESTEPS}, found {num_train_timesteps}"
            )));
        }
        let clip_default = kind == Ddim;
        let clip = keys
            .flag("clip_sample", clip_default)?
            .then(|| keys.num("clip_sample_range", 1.0))
            .transpose()?;
        Ok(SchedulerConfig {
            kind,
            prediction,
            note,
            num_train_timesteps,
            beta_start: keys.num("beta_start", start)?,
            beta_end: keys.num("beta_end", end)?,
            beta_schedule,
            spacing,
            steps_offset: keys.count("steps_offset", 0)?,
            set_alpha_to_one: keys.flag("set_alpha_to_one", true)?,
            clip: clip.filter(|_| matches!(kind, Ddim | Lcm)),
            original_inference_steps: keys.count("original_inference_steps", 50)?,
            timestep_scaling: keys.num("timestep_scaling", 10.0)?,
            solver_order,
            heun,
            lambda_min_clipped: keys.num("lambda_min_clipped", f64::NEG_INFINITY)?,
        })
    }

    /// Whether the timesteps are spaced "trailing" (SD-Turbo's, and few-step schedules').
    pub fn trailing(&self) -> bool {
        self.spacing == Spacing::Trailing
    }

    /// diffusers' `alphas_cumprod`, bit for bit: betas in f32 as torch computes them
    /// (`linspace` with an f32 step and fused multiply-adds), `1 - beta` in f32, the cumulative
    /// product accumulated in f64 and rounded to f32 (torch's CPU `cumprod`).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let linspace = |a: f64, b: f64| -> Vec<f32> {
            let (s, e) = (a as f32, b as f32);
            let step = (e - s) / (n - 1) as f32;
            (0..n)
                .map(|i| {
                    if i < n / 2 {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, e)
                    }
                })
                .collect()
        };
        let betas: Vec<f32> = match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt())
                .iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredCos => {
                // betas_for_alpha_bar (Glide's cosine schedule), in Python floats.
                let f = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                            as f32
                    })
                    .collect()
            }
        };
        let mut acc = 1f64;
        betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect()
    }

    /// The schedule of `steps` denoising steps (diffusers' `set_timesteps` + every `step`).
    /// A count whose schedule degenerates (a timestep outside the training range or a repeated
    /// one) is an error naming the counts that work.
    pub fn schedule(&self, steps: usize) -> Result<Schedule> {
        self.schedule_from(steps, 0)
    }

    /// The steps of a `steps`-step schedule from index `start` on, as diffusers runs them after
    /// `set_begin_index(start)` (img2img and inpainting with `strength` < 1): the same
    /// timesteps, sigmas and updates, except that DPM++'s first step here is first order (it
    /// has no previous x0 yet) and the first U-Net input is scaled for this step.
    pub fn schedule_from(&self, steps: usize, start: usize) -> Result<Schedule> {
        let full = self.full_schedule(steps, start)?;
        if start >= full.steps() {
            return Err(Error::Unsupported(format!(
                "starting at step {start} of {steps} (no step left)"
            )));
        }
        Ok(full.starting_at(start))
    }

    fn full_schedule(&self, steps: usize, start: usize) -> Result<Schedule> {
        let tt = self.num_train_timesteps;
        if steps == 0 || steps > tt {
            return Err(Error::Unsupported(format!(
                "{steps} inference steps (1 ..= num_train_timesteps = {tt})"
            )));
        }
        let ac = self.alphas_cumprod();
        // diffusers' sigma table: torch f32 ((1 - ac) / ac) ** 0.5.
        let train_sigmas: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let last = match self.kind {
            SchedulerKind::DpmSolverMultistep => self.dpm_last(&ac)?,
            _ => tt,
        };
        let timesteps = self.timesteps(steps, last)?;
        let final_ac = if self.set_alpha_to_one {
            1.0
        } else {
            ac[0] as f64
        };
        // Timesteps are checked to lie in 0..tt; a previous timestep below 0 is the final one.
        let ac_at = |t: f64| {
            if t >= 0.0 {
                ac[t as usize] as f64
            } else {
                final_ac
            }
        };
        Ok(match self.kind {
            SchedulerKind::Ddim => self.ddim(steps, &timesteps, &ac_at),
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => {
                self.euler(&timesteps, &train_sigmas)
            }
            SchedulerKind::DpmSolverMultistep => self.dpm(&timesteps, &train_sigmas, start),
            SchedulerKind::Lcm => self.lcm(&timesteps, &ac_at),
        })
    }

    fn x0_from_alpha(&self, ap: f64) -> (f64, f64) {
        match self.prediction {
            Prediction::Epsilon => (1.0 / ap.sqrt(), -(1.0 - ap).sqrt() / ap.sqrt()),
            Prediction::VPrediction => (ap.sqrt(), -(1.0 - ap).sqrt()),
        }
    }

    fn clip(&self) -> f64 {
        self.clip.unwrap_or(0.0)
    }

    fn ddim(&self, steps: usize, timesteps: &[f64], ac_at: &dyn Fn(f64) -> f64) -> Schedule {
        let tt = self.num_train_timesteps;
        let ratio = (tt / steps) as f64;
        let coeffs = timesteps.iter().map(|&t| {
            let (ap, prev) = (ac_at(t), ac_at(t - ratio));
            let (a, b) = self.x0_from_alpha(ap);
            let (p, t_m) = match self.prediction {
                Prediction::Epsilon => (0.0, (1.0 - prev).sqrt()),
                Prediction::VPrediction => (
                    (1.0 - prev).sqrt() * (1.0 - ap).sqrt(),
                    (1.0 - prev).sqrt() * ap.sqrt(),
                ),
            };
            StepCoeffs::new(a, b, self.clip(), p, prev.sqrt(), 0.0, 0.0, t_m, 1.0)
        });
        let sigmas = timesteps
            .iter()
            .map(|&t| ac_at(t))
            .chain([ac_at(timesteps[timesteps.len() - 1] - ratio)]);
        Schedule::vp(self.kind, timesteps, sigmas, coeffs.collect())
    }

    fn lcm(&self, timesteps: &[f64], ac_at: &dyn Fn(f64) -> f64) -> Schedule {
        let n = timesteps.len();
        let mut coeffs = Vec::with_capacity(n);
        for (i, &t) in timesteps.iter().enumerate() {
            let ap = ac_at(t);
            let (a, b) = self.x0_from_alpha(ap);
            let st = t * self.timestep_scaling;
            let c_skip = 0.25 / (st * st + 0.25);
            let c_out = st / (st * st + 0.25).sqrt();
            coeffs.push(if i + 1 < n {
                let prev = ac_at(timesteps[i + 1]);
                StepCoeffs::new(
                    a,
                    b,
                    self.clip(),
                    prev.sqrt() * c_skip,
                    prev.sqrt() * c_out,
                    0.0,
                    (1.0 - prev).sqrt(),
                    0.0,
                    1.0,
                )
            } else {
                StepCoeffs::new(a, b, self.clip(), c_skip, c_out, 0.0, 0.0, 0.0, 1.0)
            });
        }
        let sigmas = timesteps.iter().map(|&t| ac_at(t)).chain([1.0]);
        Schedule::vp(self.kind, timesteps, sigmas, coeffs)
    }

    fn euler(&self, timesteps: &[f64], train_sigmas: &[f32]) -> Schedule {
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, train_sigmas)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().fold(0f32, |m, &s| m.max(s)) as f64;
        let init = if self.spacing == Spacing::Leading {
            (max * max + 1.0).sqrt()
        } else {
            max
        };
        let scale = |s: f64| 1.0 / (s * s + 1.0).sqrt();
        let n = timesteps.len();
        let coeffs = (0..n).map(|i| {
            let (s, s1) = (sigmas[i] as f64, sigmas[i + 1] as f64);
            let (a, b) = match self.prediction {
                Prediction::Epsilon => (1.0, -s),
                Prediction::VPrediction => (1.0 / (s * s + 1.0), -s / (s * s + 1.0).sqrt()),
            };
            let in_scale = if i + 1 < n { scale(s1) } else { 1.0 };
            if self.kind == SchedulerKind::EulerAncestral {
                let up = (s1 * s1 * (s * s - s1 * s1) / (s * s)).sqrt();
                let down = (s1 * s1 - up * up).sqrt();
                StepCoeffs::new(a, b, 0.0, down / s, 1.0 - down / s, 0.0, up, 0.0, in_scale)
            } else {
                StepCoeffs::new(a, b, 0.0, s1 / s, 1.0 - s1 / s, 0.0, 0.0, 0.0, in_scale)
            }
        });
        let coeffs = coeffs.collect();
        Schedule {
            kind: self.kind,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            init_noise_sigma: init as f32,
            first_input_scale: scale(sigmas[0] as f64) as f32,
            sigmas,
            coeffs,
        }
    }

    /// The timesteps DPM++ keeps: those whose log-SNR is at least `lambda_min_clipped`.
    fn dpm_last(&self, ac: &[f32]) -> Result<usize> {
        let lambda = |a: f32| ((a as f64).sqrt()).ln() - ((1.0 - a as f64).sqrt()).ln();
        let clipped = ac
            .iter()
            .filter(|&&a| lambda(a) < self.lambda_min_clipped)
            .count();
        let last = self.num_train_timesteps - clipped;
        if last < 2 {
            return Err(Error::Unsupported(format!(
                "lambda_min_clipped {} leaves {last} timesteps",
                self.lambda_min_clipped
            )));
        }
        Ok(last)
    }

    /// `start`: the first step run (first order, with no history).
    fn dpm(&self, timesteps: &[f64], train_sigmas: &[f32], start: usize) -> Schedule {
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, train_sigmas)).collect();
        sigmas.push(0.0);
        let n = timesteps.len();
        // (alpha, sigma_vp, lambda) of a VE sigma (_sigma_to_alpha_sigma_t).
        let vp = |s: f32| {
            let alpha = 1.0 / ((s as f64).powi(2) + 1.0).sqrt();
            let sv = s as f64 * alpha;
            (alpha, sv, alpha.ln() - sv.ln())
        };
        let mut coeffs = Vec::with_capacity(n);
        for i in 0..n {
            let (a_s, s_s, l_s) = vp(sigmas[i]);
            let (a_t, s_t, l_t) = vp(sigmas[i + 1]);
            let (a, b) = match self.prediction {
                Prediction::Epsilon => (1.0 / a_s, -s_s / a_s),
                Prediction::VPrediction => (a_s, -s_s),
            };
            // The final sigma is zero (final_sigmas_type "zero"), so diffusers' lower_order_final
            // condition always holds at the last step: a first-order update, which lands on x0.
            let c = if i + 1 == n {
                StepCoeffs::new(a, b, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            } else {
                let h = l_t - l_s;
                let em1 = (-h).exp() - 1.0;
                let (q, r) = if self.solver_order == 1 || i <= start {
                    (-a_t * em1, 0.0)
                } else {
                    let (_, _, l_s1) = vp(sigmas[i - 1]);
                    let r0 = (l_s - l_s1) / h;
                    if self.heun {
                        let k = a_t * (em1 / h + 1.0) / r0;
                        (-a_t * em1 + k, -k)
                    } else {
                        (-a_t * em1 * (1.0 + 0.5 / r0), a_t * em1 * 0.5 / r0)
                    }
                };
                StepCoeffs::new(a, b, 0.0, s_t / s_s, q, r, 0.0, 0.0, 1.0)
            };
            coeffs.push(c);
        }
        Schedule {
            kind: self.kind,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas,
            init_noise_sigma: 1.0,
            first_input_scale: 1.0,
            coeffs,
        }
    }
}

/// A schedule of denoising steps, ready for the GPU.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: SchedulerKind,
    /// The U-Net's timestep at each step.
    pub timesteps: Vec<f32>,
    /// `steps + 1` noise levels `σ = √((1 - ᾱ)/ᾱ)`: diffusers' `sigmas` for Euler, Euler
    /// ancestral and DPM++; for DDIM and LCM (which have none) the σ of each timestep and of
    /// the value the last step lands on (0 when that is `ᾱ = 1`).
    pub sigmas: Vec<f32>,
    /// The caller starts from unscaled standard normal latents times this.
    pub init_noise_sigma: f32,
    /// `scale_model_input` of the first step: the first U-Net input is
    /// `latents * init_noise_sigma * first_input_scale`.
    pub first_input_scale: f32,
    pub coeffs: Vec<StepCoeffs>,
}

impl Schedule {
    /// A variance-preserving schedule (DDIM, LCM) from timesteps and the `ᾱ` of each.
    fn vp(
        kind: SchedulerKind,
        timesteps: &[f64],
        alphas: impl Iterator<Item = f64>,
        coeffs: Vec<StepCoeffs>,
    ) -> Self {
        Schedule {
            kind,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: alphas.map(|a| ((1.0 - a) / a).sqrt() as f32).collect(),
            init_noise_sigma: 1.0,
            first_input_scale: 1.0,
            coeffs,
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.coeffs.len()
    }

    /// The steps from `start` on (`start` < [`Schedule::steps`]).
    fn starting_at(mut self, start: usize) -> Schedule {
        if start == 0 {
            return self;
        }
        self.timesteps.drain(..start);
        self.sigmas.drain(..start);
        self.coeffs.drain(..start);
        if matches!(
            self.kind,
            SchedulerKind::Euler | SchedulerKind::EulerAncestral
        ) {
            // scale_model_input at the first step run: 1/√(σ²+1) of its sigma.
            let s = self.sigmas[0] as f64;
            self.first_input_scale = (1.0 / (s * s + 1.0).sqrt()) as f32;
        }
        self
    }

    /// The first step of `steps` that `strength` runs, as diffusers' img2img and inpainting
    /// pipelines choose it (`get_timesteps`): `steps - floor(steps * strength)`. An error when
    /// that leaves no step.
    pub fn start_for_strength(steps: usize, strength: f32) -> Result<usize> {
        // Python's int(num_inference_steps * strength), with the f32 strength as a double.
        let run = ((steps as f64 * strength as f64).floor() as usize).min(steps);
        if run == 0 {
            return Err(Error::Data {
                name: "strength".into(),
                msg: format!(
                    "{strength} with {steps} steps runs no step (steps x strength must be at                      least 1)"
                ),
            });
        }
        Ok(steps - run)
    }

    /// The scheduler's `add_noise` at step `k` of this schedule as `(a, b)`: a sample at that
    /// step is `a x0 + b noise`. Euler and Euler ancestral keep unscaled samples (`a = 1`,
    /// `b = σ`); DDIM, LCM and DPM++ variance-preserving ones (`a = √ᾱ = 1/√(σ²+1)`,
    /// `b = √(1-ᾱ) = σ/√(σ²+1)`). `k` = [`Schedule::steps`] is the clean end: `(1, 0)`.
    pub fn noise_coeffs(&self, k: usize) -> (f32, f32) {
        if k >= self.steps() {
            return (1.0, 0.0);
        }
        let s = self.sigmas[k] as f64;
        match self.kind {
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => (1.0, s as f32),
            _ => {
                let a = 1.0 / (s * s + 1.0).sqrt();
                (a as f32, (s * a) as f32)
            }
        }
    }

    /// The `[steps, COEFFS]` coefficient table input of [`crate::Graph::scheduler_step`].
    pub fn coeff_table(&self) -> Vec<f32> {
        self.coeffs.iter().flat_map(|c| c.to_row()).collect()
    }
}

/// The scheduler to run: `kind` when given, else the config's `_class_name`; a class Kiln does
/// not run maps to Euler, with a note saying so.
fn scheduler_kind(
    keys: &Keys,
    kind: Option<SchedulerKind>,
) -> Result<(SchedulerKind, Option<String>)> {
    let class = keys.text("_class_name", "")?;
    Ok(match (kind, SchedulerKind::from_class(class)) {
        (Some(k), _) | (None, Some(k)) => (k, None),
        (None, None) => {
            let name = if class.is_empty() {
                "a config without _class_name"
            } else {
                class
            };
            (
                SchedulerKind::Euler,
                Some(format!(
                    "{name} is not supported; using EulerDiscreteScheduler"
                )),
            )
        }
    })
}

/// `prediction_type`, `beta_schedule` and `timestep_spacing`, with the scheduler's defaults.
fn named_choices(
    keys: &Keys,
    schedule: &str,
    spacing: &str,
) -> Result<(Prediction, BetaSchedule, Spacing)> {
    let prediction = match keys.text("prediction_type", "epsilon")? {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::VPrediction,
        other => {
            return Err(Error::Unsupported(format!(
                "prediction_type '{other}' (expected epsilon or v_prediction)"
            )))
        }
    };
    let beta_schedule = match keys.text("beta_schedule", schedule)? {
        "linear" => BetaSchedule::Linear,
        "scaled_linear" => BetaSchedule::ScaledLinear,
        "squaredcos_cap_v2" => BetaSchedule::SquaredCos,
        other => {
            return Err(Error::Unsupported(format!(
                "beta_schedule '{other}' (expected linear, scaled_linear or squaredcos_cap_v2)"
            )))
        }
    };
    let spacing = match keys.text("timestep_spacing", spacing)? {
        "leading" => Spacing::Leading,
        "trailing" => Spacing::Trailing,
        "linspace" => Spacing::Linspace,
        other => {
            return Err(Error::Unsupported(format!(
                "timestep_spacing '{other}' (expected leading, trailing or linspace)"
            )))
        }
    };
    Ok((prediction, beta_schedule, spacing))
}

/// Options that change the schedule in ways Kiln does not run, refused unless at their
/// defaults (per scheduler, as diffusers reads them).
fn refuse_unsupported_options(keys: &Keys, kind: SchedulerKind) -> Result<()> {
    use SchedulerKind::*;
    keys.only("trained_betas", Json::Null)?;
    keys.only("rescale_betas_zero_snr", false.into())?;
    if matches!(kind, Ddim | Lcm | DpmSolverMultistep) {
        keys.only("thresholding", false.into())?;
    }
    if matches!(kind, Euler | DpmSolverMultistep) {
        for k in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            keys.only(k, false.into())?;
        }
        keys.only("final_sigmas_type", "zero".into())?;
    }
    if kind == Euler {
        keys.only("interpolation_type", "linear".into())?;
        keys.only("timestep_type", "discrete".into())?;
    }
    if kind == DpmSolverMultistep {
        keys.only("algorithm_type", "dpmsolver++".into())?;
        keys.only("use_lu_lambdas", false.into())?;
        keys.only("use_flow_sigmas", false.into())?;
        keys.only("variance_type", Json::Null)?;
    }
    Ok(())
}
