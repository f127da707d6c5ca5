//! Sampling family: token sampling (`sample.wgsl`), seeded normal noise (`noise.wgsl`), both on
//! the Philox4x32-10 counter-based RNG (`philox.wgsl`), so one seed gives the same tokens and the
//! same noise natively and in the browser.

use super::{
    dispatch, elementwise_groups, f32_out, need_f32, u, Binding, Bound, Ctx, Dispatch, Dyn,
    Inferred, Kernel, KernelKey, Meta, ShaderParams,
};
use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::tensor::STORAGE;
use std::sync::Arc;

/// Number of f32 sampler settings (the `settings` input of [`crate::Graph::sample`]).
pub const SETTINGS_LEN: usize = 11;

/// Most logit biases one draw takes (the `constraint` input's pairs).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// Words of the sampler's `constraint` input over a vocabulary of `v` ids: the allowed-id
/// bitmask (bit `i % 32` of word `i / 32`), then [`MAX_LOGIT_BIAS`] (id, f32 bits of the bias)
/// pairs, sorted by id ([`bias_words`]).
pub fn constraint_words(v: usize) -> usize {
    v.div_ceil(32) + 2 * MAX_LOGIT_BIAS
}

/// The bias part of the `constraint` input: the pairs sorted by id, the last bias of an id
/// repeated winning; ids outside the vocabulary of `v`, more than [`MAX_LOGIT_BIAS`] ids or a
/// bias that is not finite are errors.
pub fn bias_words(v: usize, biases: &[(u32, f32)]) -> Result<Vec<u32>> {
    let mut by_id = std::collections::BTreeMap::new();
    for &(id, b) in biases {
        if id as usize >= v || !b.is_finite() {
            return Err(Error::Data {
                name: "logit_bias".into(),
                msg: format!("token {id}: bias {b} (ids below {v}, finite biases)"),
            });
        }
        by_id.insert(id, b);
    }
    if by_id.len() > MAX_LOGIT_BIAS {
        return Err(Error::Data {
            name: "logit_bias".into(),
            msg: format!("{} tokens (at most {MAX_LOGIT_BIAS})", by_id.len()),
        });
    }
    Ok(by_id
        .into_iter()
        .flat_map(|(id, b)| [id, b.to_bits()])
        .collect())
}

/// The id the sampler writes when the logits hold NaN or infinity (its second word is then
/// how many do): the decode loop stops with [`crate::Error::Overflow`].
pub const NON_FINITE_ID: u32 = u32::MAX;

/// Most alternatives the sampler reports with their log-probabilities (OpenAI's limit for
/// `top_logprobs`).
pub const TOP_LOGPROBS_MAX: usize = 20;

/// Words of the sampler's output: the id and its log-probability, then
/// [`TOP_LOGPROBS_MAX`] (id, log-probability) pairs of the most likely ids.
pub const SAMPLE_OUT_LEN: usize = 2 + 2 * TOP_LOGPROBS_MAX;

/// Sampler settings, passed to the graph as a plain f32 input ([`SamplerSettings::to_f32s`]) so
/// they change between tokens without recompiling.
///
/// With `c` the counter of the draw, `V` the vocabulary size and `x` the logits:
///
/// 0. **Logit bias**: `x[j] += bias[j]` for the `biases` pairs of the `constraint` input.
/// 1. **Repetition penalty** (HF / llama.cpp): every distinct id `j < V` in
///    `history[max(0, c - repeat_window) .. min(c, cap)]` gets `x[j] > 0 ? x[j] * (1/r) : x[j] * r`
///    with `r = repeat_penalty` (`1` disables). `1/r` is rounded to f32 once on the CPU, so the
///    result is bit-identical on every adapter (it may differ from `x / r` by one ulp).
/// 2. `temperature <= 0` is **greedy**: the argmax of the penalized logits, the lowest index
///    on ties. Steps 3-7 are skipped.
/// 3. **Temperature**: `s = x * (1/temperature)` (the reciprocal again rounded on the CPU).
///    With `mask` set, ids whose bit in the `constraint` input's bitmask is 0 get `s = -inf`
///    (greedy decoding included): they are never drawn.
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
/// `log_softmax(x_raw)[id]`, the log-probability under the raw, unmodified logits. With
/// `top_logprobs = n > 0` the output also holds the `n` ids of the largest raw logits (in
/// descending order, the lower index first on ties) with their log-probabilities; this is what
/// OpenAI's `top_logprobs` reports, found on the GPU (n passes over the logits), so the logits
/// are never read back.
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
    /// How many of the most likely ids to report with their log-probabilities (at most
    /// [`TOP_LOGPROBS_MAX`]); 0 reports none. Changes nothing about the draw.
    pub top_logprobs: u32,
    /// Apply the `constraint` input's bitmask (a grammar's allowed tokens); set by the decode
    /// loop for constrained requests.
    pub mask: bool,
    /// How many (id, bias) pairs of the `constraint` input apply (at most [`MAX_LOGIT_BIAS`]).
    pub biases: u32,
}

impl SamplerSettings {
    /// Settings that change nothing: temperature 1, no top-k/top-p/min-p, no penalty. The
    /// front ends' defaults are `llm::TextOptions::default()`, not these.
    pub const fn neutral() -> Self {
        SamplerSettings {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_window: 64,
            top_logprobs: 0,
            mask: false,
            biases: 0,
        }
    }

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
        if self.top_logprobs as usize > TOP_LOGPROBS_MAX {
            return Err(Error::Data {
                name: "sampler".into(),
                msg: format!(
                    "top_logprobs {} is out of range: 0 ..= {TOP_LOGPROBS_MAX}",
                    self.top_logprobs
                ),
            });
        }
        Ok(())
    }

    /// Greedy decoding, no penalty.
    pub fn greedy() -> Self {
        SamplerSettings {
            temperature: 0.0,
            ..Self::neutral()
        }
    }

    /// The settings input: `[temperature, top_k, top_p, min_p, repeat_penalty, repeat_window,
    /// 1/temperature (0 when greedy), 1/repeat_penalty, top_logprobs, mask (0 or 1), biases]`.
    /// Counts saturate at 2^24, where f32 stops being exact.
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
            self.top_logprobs.min(TOP_LOGPROBS_MAX as u32) as f32,
            self.mask as u32 as f32,
            self.biases.min(MAX_LOGIT_BIAS as u32) as f32,
        ]
    }
}

super::params!(
    /// Uniforms of `sample.wgsl`.
    SampleParams, "sample.wgsl", [] {
        v: u32, cap: u32, c_add: u32, c_slot: u32, c_mul: u32, s_add: u32, s_slot: u32, s_mul: u32,
        groups: u32, chunk: u32, round: u32, h_add: u32, h_slot: u32, h_mul: u32, row: u32,
        cw: u32,
    }
);

/// Words of `sample.wgsl`'s per-chunk statistics and top_logprobs candidates, its selection
/// state, and its digit histograms (eight rounds of 256 bins of one or two words).
const PART_WORDS: usize = 8;
const TOPS_WORDS: usize = 2 * TOP_LOGPROBS_MAX;
const STATE_WORDS: usize = 4 * 9;
const HIST_WORDS: usize = 8 * 512;

/// The sampler's chunks: `(chunk, groups)`, at least 1024 ids a chunk and at most 256 chunks
/// (the finish pass merges one chunk per invocation); one chunk on software adapters.
fn sample_chunks(v: usize, software: bool) -> (usize, usize) {
    if software {
        return (v, 1);
    }
    let chunk = v.div_ceil(256).max(1024);
    (chunk, v.div_ceil(chunk))
}

super::params!(
    /// Uniforms of `noise.wgsl`.
    NoiseParams, "noise.wgsl", [] { n: u32, seed_add: u32, seed_slot: u32, seed_mul: u32, stream: u32 }
);

super::params!(
    /// Uniforms of `noise.wgsl`'s known-answer entry point.
    PhiloxKatParams, "noise.wgsl", ["PHILOX_KAT"] { n: u32 }
);

/// Samples one token from logits `[v]` with the settings input (f32 `[SETTINGS_LEN]`, see
/// [`SamplerSettings`]). `history` (u32 `[cap]`) holds previous ids for the repetition penalty;
/// the drawn id is appended at index `counter` (which also selects the RNG stream). Output: u32
/// `[SAMPLE_OUT_LEN]` = (token id, f32 bits of its log-probability under the unmodified logits),
/// then the `top_logprobs` most likely (id, log-probability bits) pairs. A history buffer
/// holding several sequences' ids gives this one's as `history_at` (its first index, and its
/// length `cap`): the counter and the window are relative to it.
///
/// Logits `[r, v]` are `r` samplers at once (a batch of decoding sequences): settings
/// `[r, SETTINGS_LEN]`, constraint `[r, ..]`, output `[r, SAMPLE_OUT_LEN]`, and per-row counter,
/// seed and history start ([`Dyn::Rows`]); each row draws as it would alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub counter: Dyn,
    pub seed: Dyn,
    /// This sequence's part of the history: (first index, length); `None`: all of it.
    pub history_at: Option<(Dyn, usize)>,
}

impl Kernel for Sample {
    fn name(&self) -> &'static str {
        "sample"
    }

    fn infer(&self, ins: &[Meta]) -> Result<Inferred> {
        need_f32(self.name(), ins[0].1)?;
        let l = ins[0].0;
        let (rows, v) = match l {
            [v] => (None, *v),
            [r, v] => (Some(*r), *v),
            _ => (None, 0),
        };
        let per_row = |n: usize| match rows {
            None => vec![n],
            Some(r) => vec![r, n],
        };
        if v == 0
            || ins[1].0 != per_row(SETTINGS_LEN)
            || ins[2].1 != DType::U32
            || ins[3].1 != DType::U32
            || ins[3].0 != per_row(constraint_words(v))
        {
            return Err(shape_err(
                self.name(),
                format!(
                    "expected logits [v] or [rows, v], settings [{SETTINGS_LEN}], u32 history, u32 constraint [{}] (per row); found {:?}, {:?}, {}, {} {:?}",
                    constraint_words(v), l, ins[1].0, ins[2].1, ins[3].1, ins[3].0
                ),
            ));
        }
        Ok(Some((per_row(SAMPLE_OUT_LEN), DType::U32)))
    }

    /// Ten passes over the vocabulary in chunks (`sample.wgsl` lists them): the statistics,
    /// two four-round radix selects (top-k, top-p), the weights and the draw. On software
    /// adapters, where a dispatch costs more than the parallelism buys, the same passes run
    /// one after another in one workgroup and one dispatch (`single`).
    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let v = ins[0].shape.last().copied().unwrap_or(0);
        let rows = ins[0].numel() / v.max(1);
        if v == 0 || v > (u32::MAX / 4) as usize {
            return Err(shape_err(
                self.name(),
                format!("vocabulary of {v} ids (1 .. 2^30 supported)"),
            ));
        }
        let software = ctx.gpu.features.software;
        let (chunk, groups) = sample_chunks(v, software);
        let words = 2 * v + groups * (PART_WORDS + TOPS_WORDS) + STATE_WORDS;
        let work = ctx.scratch("sample-work", 4 * (rows * words) as u64)?;
        let hist = ctx.scratch("sample-hist", 4 * (rows * HIST_WORDS) as u64)?;
        let [c_add, c_slot, c_mul] = self.counter.words();
        let [s_add, s_slot, s_mul] = self.seed.words();
        let (base, cap) = self.history_at.unwrap_or((Dyn::Static(0), ins[2].numel()));
        let [h_add, h_slot, h_mul] = base.words();
        let params = |round: usize, row: usize| SampleParams {
            v: u(v),
            cap: u(cap),
            c_add,
            c_slot,
            c_mul,
            s_add,
            s_slot,
            s_mul,
            groups: u(groups),
            chunk: u(chunk),
            round: u(round),
            h_add,
            h_slot,
            h_mul,
            row: u(row),
            cw: u(constraint_words(v)),
        };
        let pass = |entry: &'static str, round: usize, wgs: usize, row: usize| {
            let key = KernelKey::new("sample.wgsl", entry).def("WW", format!("{words}u"));
            let key = if rows == 1 {
                key.def("ONE_ROW", "")
            } else {
                key
            };
            dispatch(
                key,
                &params(round, row),
                vec![
                    Binding::read(ins[0].buf()),
                    Binding::read(ins[1].buf()),
                    Binding::write(ins[2].buf()),
                    Binding::write(out.buf()),
                    Binding::write(&work),
                    Binding::write(&hist),
                    Binding::read(ins[3].buf()),
                ],
                [u(wgs), 1, 1],
            )
        };
        if software {
            // A workgroup per row.
            return Ok(vec![pass("single", 0, rows, 0)]);
        }
        // The selection passes' workgroup counts, written by prep (zero where a pass has
        // nothing to do) and read by their indirect dispatches: top-k rounds at byte 0,
        // weights and kept at 12, top-p rounds at 24.
        let args = Arc::new(ctx.gpu.create_buffer(
            "sample-args",
            36,
            STORAGE | wgpu::BufferUsages::INDIRECT,
        ));
        // (Not bound to the passes that read it as counts: a dispatch may not write what it
        // takes its counts from.)
        let indirect = |mut d: Dispatch, offset: u64| {
            d.indirect = Some((args.clone(), offset));
            d
        };
        // Row after row (the arguments buffer is each row's in turn).
        let mut passes = Vec::with_capacity(12 * rows);
        for row in 0..rows {
            let mut prep = pass("prep", 0, groups, row);
            prep.bindings.push(Binding::write(&args));
            passes.push(prep);
            passes.extend((1..4).map(|r| indirect(pass("kround", r, groups, row), 0)));
            passes.push(indirect(pass("weights", 0, groups, row), 12));
            passes.extend((1..4).map(|r| indirect(pass("pround", r, groups, row), 24)));
            passes.push(indirect(pass("kept", 0, groups, row), 12));
            passes.push(pass("finish", 0, 1, row));
        }
        Ok(passes)
    }
}

/// Standard normal noise `[shape]` from the counter-based RNG (seeded per run; `stream`
/// separates draws of one seed). Four values per thread.
#[derive(Clone, Debug, PartialEq)]
pub struct RandNormal {
    pub shape: Vec<usize>,
    pub seed: Dyn,
    pub stream: u32,
}

impl Kernel for RandNormal {
    fn name(&self) -> &'static str {
        "randn"
    }

    fn infer(&self, _: &[Meta]) -> Result<Inferred> {
        f32_out(&self.shape)
    }

    fn encode(&self, _: &Ctx, _: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>> {
        let out = super::out(self, out)?;
        let n = out.numel();
        let [seed_add, seed_slot, seed_mul] = self.seed.words();
        let p = NoiseParams {
            n: u(n),
            seed_add,
            seed_slot,
            seed_mul,
            stream: self.stream,
        };
        Ok(vec![dispatch(
            KernelKey::new("noise.wgsl", "main"),
            &p,
            vec![Binding::write(out.buf())],
            elementwise_groups(n.div_ceil(4)),
        )])
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
    gpu.write_buffer(
        &params,
        0,
        bytemuck::cast_slice(&PhiloxKatParams { n: u(n) }.words()),
    );
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
