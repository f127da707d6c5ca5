//! diffusers' `set_timesteps`: the U-Net timesteps of each spacing, and the step counts whose
//! schedule degenerates. Those are refused before any work: a timestep outside the training
//! range (leading spacing with `steps_offset` 1 reaches `num_train_timesteps`; numpy's `arange`
//! gives trailing spacing one timestep too many, -1, for a few counts) or a repeated one (a step
//! of size zero: DPM++'s second-order update divides by it). diffusers runs these schedules and
//! ends in NaN (DPM++ at 999 and 1000 steps over SD's config) or indexes past its tables (DDIM).

use super::{SchedulerConfig, SchedulerKind, Spacing};
use crate::error::{Error, Result};

impl Spacing {
    fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        }
    }
}

impl SchedulerConfig {
    /// The timesteps of `steps` steps as diffusers' `set_timesteps` computes them, or an error
    /// saying why that schedule degenerates and which counts work instead. `last`: the
    /// timesteps DPM++ keeps after `lambda_min_clipped` (else `num_train_timesteps`).
    pub(super) fn timesteps(&self, steps: usize, last: usize) -> Result<Vec<f64>> {
        let ts = self.spaced_timesteps(steps, last)?;
        let Some(why) = self.degenerate(steps, &ts) else {
            return Ok(ts);
        };
        Err(Error::Unsupported(format!(
            "{steps} steps: {} with {} spacing over {} training timesteps {why}, a degenerate \
             schedule (diffusers' too); {}",
            self.kind.class_name(),
            self.spacing.name(),
            self.num_train_timesteps,
            self.working_counts(steps, last)
        )))
    }

    /// `set_timesteps` of each scheduler class, unchecked.
    fn spaced_timesteps(&self, steps: usize, last: usize) -> Result<Vec<f64>> {
        let tt = self.num_train_timesteps;
        let offset = self.steps_offset;
        Ok(match (self.kind, self.spacing) {
            (SchedulerKind::Lcm, _) => {
                let orig = self.original_inference_steps;
                if orig == 0 || orig > tt || steps > orig {
                    return Err(Error::Unsupported(format!("{steps} LCM steps with original_inference_steps {orig} (need steps <= {orig} <= {tt})")));
                }
                let k = tt / orig;
                // lcm_origin_timesteps reversed, sampled at floor(linspace(0, len, steps,
                // endpoint=False)).
                let origin: Vec<f64> = (1..=orig).rev().map(|i| (i * k - 1) as f64).collect();
                (0..steps)
                    .map(|i| origin[(i as f64 * (orig as f64 / steps as f64)).floor() as usize])
                    .collect()
            }
            // DDIM rounds linspace to integers; Euler keeps the fractional values (f32).
            (SchedulerKind::Ddim, Spacing::Linspace) => linspace(0.0, (tt - 1) as f64, steps)
                .iter()
                .rev()
                .map(|t| t.round_ties_even())
                .collect(),
            (SchedulerKind::Euler | SchedulerKind::EulerAncestral, Spacing::Linspace) => {
                linspace(0.0, (tt - 1) as f64, steps)
                    .iter()
                    .rev()
                    .map(|&t| t as f32 as f64)
                    .collect()
            }
            // DPM++ spaces steps + 1 points over the kept timesteps and drops the last.
            (SchedulerKind::DpmSolverMultistep, Spacing::Linspace) => {
                linspace(0.0, (last - 1) as f64, steps + 1)
                    .iter()
                    .rev()
                    .take(steps)
                    .map(|t| t.round_ties_even())
                    .collect()
            }
            (SchedulerKind::DpmSolverMultistep, Spacing::Leading) => {
                leading(steps + 1, last / (steps + 1), offset)
                    .into_iter()
                    .take(steps)
                    .collect()
            }
            (SchedulerKind::DpmSolverMultistep, Spacing::Trailing) => {
                trailing(last as f64, tt as f64 / steps as f64)
            }
            (_, Spacing::Leading) => leading(steps, tt / steps, offset),
            (_, Spacing::Trailing) => trailing(tt as f64, tt as f64 / steps as f64),
        })
    }

    /// Why the timesteps of `steps` steps cannot be run, or `None`.
    fn degenerate(&self, steps: usize, ts: &[f64]) -> Option<String> {
        let top = (self.num_train_timesteps - 1) as f64;
        if let Some(t) = ts.iter().find(|t| !(0.0..=top).contains(*t)) {
            let count = if ts.len() == steps {
                String::new()
            } else {
                format!("{} timesteps, among them ", ts.len())
            };
            return Some(format!(
                "gives {count}timestep {t}, outside the training range 0..={top}"
            ));
        }
        let w = ts.windows(2).find(|w| w[1] >= w[0])?;
        Some(if w[1] == w[0] {
            format!("repeats timestep {} (a step of size zero)", w[1])
        } else {
            format!("goes back up from timestep {} to {}", w[0], w[1])
        })
    }

    /// The nearest step counts below and above `steps` whose schedules work (only on the
    /// error path: at most `num_train_timesteps` schedules of timesteps, no coefficients).
    fn working_counts(&self, steps: usize, last: usize) -> String {
        let works = |n: usize| {
            self.spaced_timesteps(n, last)
                .is_ok_and(|ts| self.degenerate(n, &ts).is_none())
        };
        let below = (1..steps).rev().find(|&n| works(n));
        let above = (steps + 1..=self.num_train_timesteps).find(|&n| works(n));
        match (below, above) {
            (Some(b), Some(a)) => format!("{b} or {a} steps work"),
            (Some(b), None) => format!("at most {b} steps work with this scheduler config"),
            (None, Some(a)) => format!("at least {a} steps work with this scheduler config"),
            (None, None) => "no step count works with this scheduler config".into(),
        }
    }
}

/// `np.linspace(a, b, n)` in f64 (the last value is exactly `b`).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    let step = if n > 1 { (b - a) / (n - 1) as f64 } else { 0.0 };
    (0..n)
        .map(|i| {
            if i + 1 == n && n > 1 {
                b
            } else {
                a + i as f64 * step
            }
        })
        .collect()
}

/// "leading": `arange(0, n) * ratio` reversed, plus `steps_offset` (saturating: a config's
/// offset is any count, and one past the range is refused by the caller).
fn leading(n: usize, ratio: usize, offset: usize) -> Vec<f64> {
    (0..n)
        .rev()
        .map(|i| (i * ratio).saturating_add(offset) as f64)
        .collect()
}

/// "trailing": `round(np.arange(start, 0, -ratio)) - 1`, with numpy's arange length and fill
/// rule (so a few step counts get one extra timestep, -1, as in diffusers).
fn trailing(start: f64, ratio: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -ratio).ceil().max(0.0) as usize;
    let delta = (start - ratio) - start;
    (0..len)
        .map(|i| (start + i as f64 * delta).round_ties_even() - 1.0)
        .collect()
}

/// `np.interp(t, arange(len), table)` rounded to f32.
pub(super) fn interp(t: f64, table: &[f32]) -> f32 {
    let j = (t.floor().max(0.0) as usize).min(table.len() - 1);
    if j + 1 >= table.len() || t == j as f64 {
        return table[j];
    }
    let (lo, hi) = (table[j] as f64, table[j + 1] as f64);
    ((hi - lo) * (t - j as f64) + lo) as f32
}
