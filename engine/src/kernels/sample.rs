//! Sampling family: token sampling (`sample.wgsl`), seeded normal noise (`noise.wgsl`), both on
//! the Philox4x32-10 counter-based RNG (`philox.wgsl`), so one seed gives the same tokens and the
//! same noise natively and in the browser.

use super::{elementwise_groups, Binding, Bound, Ctx, Dispatch, KernelKey, Params};
use crate::device::Gpu;
use crate::error::{shape_err, Error, Result};
use crate::graph::Op;
use crate::tensor::STORAGE;
use std::sync::Arc;

/// Number of f32 sampler settings (the `settings` input of [`crate::Graph::sample`]).
pub const SETTINGS_LEN: usize = 8;

/// Sampler settings, passed to the graph as a plain f32 input ([`SamplerSettings::to_f32s`]) so
/// they change between tokens without recompiling.
///
/// With `c` the counter of the draw, `V` the vocabulary size and `x` the logits:
///
/// 1. **Repetition penalty** (HF / llama.cpp): every distinct id `j < V` in
///    `history[max(0, c - repeat_window) .. min(c, cap)]` gets `x[j] > 0 ? x[j] * (1/r) : x[j] * r`
///    with `r = repeat_penalty` (`1` disables). `1/r` is rounded to f32 once on the CPU, so the
///    result is bit-identical on every adapter (it may differ from `x / r` by one ulp).
/// 2. `temperature <= 0` is **greedy**: the argmax of the penalized logits, the lowest index
///    on ties. Steps 3-7 are skipped.
/// 3. **Temperature**: `s = x * (1/temperature)` (the reciprocal again rounded on the CPU).
/// 4. **Top-k** (`0` or `>= V` disables): keep ids with `s >=` the k-th largest `s`, ties
///    included.
/// 5. **Weights**: `w = floor(min(exp(s - max s), 1) * 2^31)` as integers; probabilities are
///    `w / sum(w)`. Ids below `2^-31` of the most likely one get weight 0 and are never drawn.
/// 6. **Top-p** (`>= 1` disables), over the top-k survivors: keep the smallest set of highest
///    `s` whose weight reaches `ceil(P * W_k / 2^32)` (at least 1), where `W_k` is the top-k
///    mass and `P = floor(top_p * 2^32)`; ties at the cut are kept.
/// 7. **Min-p** (`0` disables): keep ids with `w >= ceil(min_p * 2^31)`, i.e. probability at
///    least `min_p` times the maximum.
/// 8. **Draw**: `u` = word 0 of Philox4x32-10 with counter `(c, 0, 1, 0)` and key `(seed, 0)`;
///    the token is the first id in index order whose running kept weight exceeds
///    `floor(u * W / 2^32)`, `W` the total kept weight (so `u / 2^32` is uniform in [0, 1)).
///
/// Finally the id is written to `history[c]` (when `c < cap`) and to the output together with
/// `log_softmax(x_raw)[id]`, the log-probability under the raw, unmodified logits.
/// Steps 4-8 are integer arithmetic (exact on every adapter); the floats are the scalings,
/// `exp` and the log-probability. NaN logits count as `-inf`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerSettings {
    /// Softmax temperature; `<= 0` selects greedy decoding.
    pub temperature: f32,
    /// Keep the `top_k` most likely ids; 0 disables.
    pub top_k: u32,
    /// Nucleus mass in (0, 1); 1 disables.
    pub top_p: f32,
    /// Minimum probability relative to the most likely id; 0 disables.
    pub min_p: f32,
    /// Repetition penalty (> 0); 1 disables.
    pub repeat_penalty: f32,
    /// How many previous ids the penalty looks at.
    pub repeat_window: u32,
}

impl Default for SamplerSettings {
    fn default() -> Self {
        SamplerSettings {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_window: 64,
        }
    }
}

impl SamplerSettings {
    /// Rejects values that mean nothing (a NaN anywhere, a negative temperature, `top_p` outside
    /// (0, 1], `min_p` outside [0, 1], a repetition penalty that is not a positive number)
    /// instead of sampling with them.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32, want: &str| {
            Err(Error::Data {
                name: "sampler".into(),
                msg: format!("{what} {v} is out of range: {want}"),
            })
        };
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return bad("temperature", t, "a finite number >= 0 (0 is greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "0 < top_p <= 1 (1 disables it)");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "0 <= min_p <= 1 (0 disables it)");
        }
        let r = self.repeat_penalty;
        if !(r.is_finite() && r > 0.0) {
            return bad("repeat_penalty", r, "a finite number > 0 (1 disables it)");
        }
        Ok(())
    }

    /// Greedy decoding, no penalty.
    pub fn greedy() -> Self {
        SamplerSettings {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// The settings input: `[temperature, top_k, top_p, min_p, repeat_penalty, repeat_window,
    /// 1/temperature (0 when greedy), 1/repeat_penalty]`. Counts saturate at 2^24, where f32
    /// stops being exact.
    pub fn to_f32s(&self) -> [f32; SETTINGS_LEN] {
        let inv_t = if self.temperature > 0.0 {
            1.0 / self.temperature
        } else {
            0.0
        };
        let inv_r = if self.repeat_penalty > 0.0 {
            1.0 / self.repeat_penalty
        } else {
            1.0
        };
        let count = |n: u32| n.min(1 << 24) as f32;
        [
            self.temperature,
            count(self.top_k),
            self.top_p,
            self.min_p,
            self.repeat_penalty,
            count(self.repeat_window),
            inv_t,
            inv_r,
        ]
    }
}

/// Encodes [`Op::Sample`] (one workgroup) and [`Op::RandNormal`] (four values per thread).
pub fn encode(ctx: &Ctx, op: &Op, ins: &[Bound], out: &Bound) -> Result<Vec<Dispatch>> {
    match op {
        Op::Sample { counter, seed } => {
            let v = ins[0].numel();
            if v == 0 || v > (u32::MAX / 2) as usize {
                return Err(shape_err(
                    "sample",
                    format!("vocabulary of {v} ids (1 .. 2^31 supported)"),
                ));
            }
            let work = ctx.scratch("sample-work", 8 * v as u64);
            let [ca, cs, cm] = counter.words();
            let [sa, ss, sm] = seed.words();
            let params = Params::default()
                .u(v)
                .u(ins[2].numel())
                .u(ca)
                .u(cs)
                .u(cm)
                .u(sa)
                .u(ss)
                .u(sm);
            Ok(vec![Dispatch {
                key: KernelKey::new("sample.wgsl", "main"),
                params: params.0,
                bindings: vec![
                    Binding::read(ins[0].buf()),
                    Binding::read(ins[1].buf()),
                    Binding::write(ins[2].buf()),
                    Binding::write(out.buf()),
                    Binding::write(&work),
                ],
                groups: [1, 1, 1],
            }])
        }
        Op::RandNormal { seed, stream, .. } => {
            let n = out.numel();
            let [sa, ss, sm] = seed.words();
            Ok(vec![Dispatch {
                key: KernelKey::new("noise.wgsl", "main"),
                params: Params::default().u(n).u(sa).u(ss).u(sm).u(*stream).0,
                bindings: vec![Binding::write(out.buf())],
                groups: elementwise_groups(n.div_ceil(4)),
            }])
        }
        other => Err(shape_err(other.name(), "not a sampling op")),
    }
}

/// Runs Philox4x32-10 on the GPU for each `(counter, key)` block and returns the four output
/// words of each: an adapter self-check against Random123's known answers (and what the tests
/// use to check the shader's integer path bit for bit). Creates its own pipeline and buffers.
pub async fn philox_on_gpu(gpu: &Gpu, blocks: &[([u32; 4], [u32; 2])]) -> Result<Vec<[u32; 4]>> {
    let n = blocks.len();
    let words: Vec<u32> = blocks
        .iter()
        .flat_map(|(c, k)| c.iter().chain(k).copied())
        .collect();
    let key = KernelKey::new("noise.wgsl", "kat").def("PHILOX_KAT", "");
    let access = [false, true];
    let pipeline = gpu.pipeline(&key, &access).await?;
    let layout = gpu.bind_group_layout(&access);
    let uniform = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
    let params = gpu.create_buffer("kat-params", 16, uniform);
    gpu.write_buffer(&params, 0, bytemuck::cast_slice(&[n as u32, 0, 0, 0]));
    let scalars = gpu.create_buffer("kat-scalars", (super::RUN_SCALARS * 4) as u64, uniform);
    let inp = Arc::new(gpu.create_buffer("kat-in", (words.len() * 4) as u64, STORAGE));
    gpu.write_buffer(&inp, 0, bytemuck::cast_slice(&words));
    let outb = gpu.create_buffer("kat-out", (n * 16) as u64, STORAGE);
    let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("philox-kat"),
        layout: &layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: scalars.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: inp.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 3,
                resource: outb.as_entire_binding(),
            },
        ],
    });
    if let Some(e) = scope.pop().await {
        return Err(Error::Gpu {
            context: "philox self-check bind group".into(),
            msg: e.to_string(),
        });
    }
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("philox-kat"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups((n as u32).div_ceil(64).max(1), 1, 1);
    }
    gpu.submit([enc.finish()]);
    let bytes = gpu.read_buffer(&outb, 0, (n * 16) as u64).await?;
    let flat: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
    Ok(flat
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}
