//! Shared helpers for the integration tests: the GPU (a test fails when there is none), a
//! deterministic random generator, a one-op graph harness that poisons outputs, and closeness
//! checks that report index, expected and got.

pub mod fuzz;
pub mod surgery;

use kiln::{CompileOptions, DType, Gpu, GpuOptions, Graph, Scalar, Tensor, Value};
use std::sync::{Arc, OnceLock};

/// The shared GPU of a test binary, keeping f32 math (`GpuOptions::f32_math`: the parity
/// tests' contract). Panics (fails the test) when no adapter is found.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        gpu_with(GpuOptions {
            f32_math: true,
            ..Default::default()
        })
    })
    .clone()
}

/// The shared adapter four times: with the kernels written for GPUs, with and without the
/// optional features (subgroups, shader-f16), and with those for software adapters
/// (`GpuFeatures::software`), with and without them (no subgroups, as in a browser before
/// wgpu mapped them), so every kernel variant is tested whatever the adapter.
pub fn gpu_variants() -> [Arc<Gpu>; 4] {
    static GPUS: OnceLock<[Arc<Gpu>; 4]> = OnceLock::new();
    GPUS.get_or_init(|| {
        [(false, false), (false, true), (true, false), (true, true)].map(|(software, plain)| {
            gpu_with(GpuOptions {
                software: Some(software),
                disable_optional_features: plain,
                ..Default::default()
            })
        })
    })
    .clone()
}

/// The GPU kernels with the optional features but f32 math (no f16 GEMM tiles): the parity
/// tests' contract, on the kernels written for GPUs whatever the adapter.
pub fn gpu_kernels_f32_math() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        gpu_with(GpuOptions {
            software: Some(false),
            f32_math: true,
            ..Default::default()
        })
    })
    .clone()
}

/// Compiles `g` with intermediate and output buffers poisoned with NaN bits, so that a kernel
/// that leaves an element unwritten fails the test reading it.
pub fn compile_poisoned(gpu: &Arc<Gpu>, g: &Graph) -> kiln::Plan {
    let opts = CompileOptions {
        poison: true,
        ..Default::default()
    };
    pollster::block_on(g.compile(gpu, opts)).unwrap()
}

/// A GPU with specific options (e.g. a forced small binding limit).
pub fn gpu_with(opts: GpuOptions) -> Arc<Gpu> {
    match pollster::block_on(Gpu::new(opts)) {
        Ok(g) => g,
        Err(e) => panic!("GPU tests need an adapter: {e}"),
    }
}

/// SplitMix64: small, fast, deterministic.
pub struct Rng(pub u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    /// `n` uniform values in [lo, hi).
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere; the message names the first bad
/// index with expected and got, and the worst error.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length: expected {}, got {}",
        want.len(),
        got.len()
    );
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !(err <= atol + rtol * w.abs()) {
            panic!(
                "{what}: index {i}: expected {w}, got {g} (|err| {err}, atol {atol}, rtol {rtol})"
            );
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
    eprintln!("{what}: ok, max |err| {:.3e} at {}", worst.1, worst.0);
}

/// A graph around one op: add inputs and weights, build the op on `g`, run once.
pub struct OpTest {
    pub gpu: Arc<Gpu>,
    pub g: Graph,
    inputs: Vec<(Value, Vec<u32>)>,
}

impl OpTest {
    /// A harness on the shared GPU.
    pub fn new() -> Self {
        Self::on(gpu())
    }
    /// A harness on a given GPU.
    pub fn on(gpu: Arc<Gpu>) -> Self {
        OpTest {
            gpu,
            g: Graph::new(),
            inputs: Vec::new(),
        }
    }
    /// An f32 input with data.
    pub fn input(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Value {
        let v = self.g.input(name, shape, DType::F32).unwrap();
        self.inputs
            .push((v, data.iter().map(|f| f.to_bits()).collect()));
        v
    }
    /// A u32 input with data.
    pub fn input_u32(&mut self, name: &str, shape: &[usize], data: &[u32]) -> Value {
        let v = self.g.input(name, shape, DType::U32).unwrap();
        self.inputs.push((v, data.to_vec()));
        v
    }
    /// A weight uploaded from file-layout bytes.
    pub fn weight(&mut self, name: &str, shape: &[usize], dtype: DType, bytes: &[u8]) -> Value {
        let t = Tensor::upload(&self.gpu, name, shape, dtype, bytes).unwrap();
        self.g.tensor(&Arc::new(t))
    }
    /// A state tensor (e.g. a cache) from f32 data.
    pub fn state(&mut self, name: &str, shape: &[usize], data: &[f32]) -> (Value, Arc<Tensor>) {
        let t = Arc::new(Tensor::from_f32(&self.gpu, name, shape, data).unwrap());
        (self.g.tensor(&t), t)
    }
    /// Compiles with poisoned outputs, writes inputs, sets scalars, runs, reads `out` as f32.
    pub fn run(mut self, out: Value, scalars: &[(Scalar, u32)]) -> Vec<f32> {
        self.g.output(out);
        let mut plan = compile_poisoned(&self.gpu, &self.g);
        for (v, d) in &self.inputs {
            plan.write_u32(*v, d).unwrap();
        }
        for (s, x) in scalars {
            plan.set(*s, *x);
        }
        plan.run().unwrap();
        pollster::block_on(plan.read_f32(out)).unwrap()
    }
}

impl Default for OpTest {
    fn default() -> Self {
        Self::new()
    }
}

/// Random weights of `rows x k` in `dtype`'s file layout: random values for plain types,
/// random quants with sane random scales for the block formats (every bit pattern of the
/// quants is a valid block).
pub fn random_weight_bytes(rng: &mut Rng, dtype: DType, rows: usize, k: usize) -> Vec<u8> {
    assert!(dtype != DType::U32, "u32 is not a weight dtype");
    let n = rows * k;
    if !dtype.is_quantized() {
        return kiln::dtype::encode_plain(dtype, &rng.vec(n, -1.0, 1.0)).unwrap();
    }
    // The scale range keeps a product of K ~ 1000 random quants near 1; Q4_1/Q5_1's second
    // field is an additive min, the K-quants' a dmin (scaled like d).
    let d = match dtype.block_elems() {
        32 => (0.002, 0.05),
        _ if matches!(dtype, DType::Q3_K | DType::Q6_K) => (0.0005, 0.005),
        _ if dtype == DType::IQ4_XS => (0.0002, 0.002),
        _ => (0.001, 0.01),
    };
    let min = if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
        (-0.3, 0.3)
    } else {
        d
    };
    let mut out = rng.bytes(dtype.file_bytes(n).unwrap());
    for blk in out.chunks_mut(dtype.block_bytes()) {
        for (i, &o) in dtype.scale_offsets().iter().enumerate() {
            let (lo, hi) = if i == 0 { d } else { min };
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(rng.uniform(lo, hi)).to_le_bytes());
        }
    }
    out
}

/// Row length used by tests for a dtype: a multiple of its block, and odd for plain types so
/// the unaligned tail and the row padding of f16/bf16 are exercised.
pub fn test_k(dtype: DType) -> usize {
    match dtype.block_elems() {
        1 => 203,
        32 => 160,
        _ => 512,
    }
}

/// Tolerance for a dot product of length `k`: f32 accumulation in a different order than the
/// f64 reference grows like sqrt(k) * eps * sum|x*w|; 1e-5 * sum|x*w| leaves headroom.
pub fn dot_tolerance(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> f32 {
    let mut worst = 0f32;
    for i in 0..m {
        for j in 0..n {
            let s: f32 = (0..k).map(|t| (x[i * k + t] * w[j * k + t]).abs()).sum();
            worst = worst.max(s);
        }
    }
    1e-5 * worst + 1e-6
}

/// [`dot_tolerance`] for a product on `gpu`: with f16 GEMM tiles (`GpuFeatures::half_tiles`)
/// both operands are rounded to f16 (either neighbour, as WGSL allows: at most 2^-10 relative
/// each), so the bound grows to 2e-3 * sum|x*w|; an indexing error still costs O(|y|).
pub fn product_tolerance(gpu: &Gpu, x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> f32 {
    let t = dot_tolerance(x, w, m, n, k);
    if gpu.features.half_tiles {
        t * 200.0
    } else {
        t
    }
}

/// `v` as the GPU GEMM core holds it in its tiles on `gpu`: rounded to the nearest f16 where
/// the tiles are f16 (`GpuFeatures::half_tiles`), unchanged otherwise.
pub fn as_tile_operands(gpu: &Gpu, v: &[f32]) -> Vec<f32> {
    match gpu.features.half_tiles {
        true => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        false => v.to_vec(),
    }
}

/// Reads a JSON fixture; a missing or bad file fails the test with its path.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reads a `.npy` fixture; a missing or bad file fails the test with its path.
pub fn read_npy(path: &std::path::Path) -> kiln::formats::npy::Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    kiln::formats::npy::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a JSON array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// PSNR (dB, peak 1) of a decoded image `raw` (`[3, h, w]` in [-1, 1], as the VAE gives it)
/// against diffusers' `[h, w, 3]` image in [0, 1].
pub fn image_psnr(raw: &[f32], want_hwc: &[f32], h: usize, w: usize) -> f64 {
    let mut mse = 0f64;
    for p in 0..h * w {
        for c in 0..3 {
            let g = (raw[c * h * w + p] / 2.0 + 0.5).clamp(0.0, 1.0) as f64;
            mse += (g - want_hwc[p * 3 + c] as f64).powi(2);
        }
    }
    mse /= (3 * h * w) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (1.0 / mse).log10()
    }
}

/// Greedy ids and log-probabilities against a reference run as the fixture scripts write it
/// (`ids`, `logprobs`, `margins` per step): ids equal up to the first step whose reference top-2
/// margin is under 0.01 (where f32 rounding may legitimately flip the argmax), log-probabilities
/// within `tol` there. Returns the steps compared and the largest |logprob error|.
pub fn check_greedy_run(
    what: &str,
    ids: &[u32],
    logprobs: &[f32],
    run: &serde_json::Value,
    tol: f64,
) -> (usize, f64) {
    let want = json_ids(&run["ids"]);
    let num = |k: &str| -> Vec<f64> {
        run[k]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no '{k}' in the reference run"))
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect()
    };
    let (want_lp, margins) = (num("logprobs"), num("margins"));
    let firm = margins.iter().position(|&x| x < 0.01).unwrap_or(want.len());
    let n = firm.min(ids.len());
    let mut worst = 0f64;
    for i in 0..n {
        assert_eq!(
            ids[i],
            want[i],
            "{what}: step {i}: expected id {}, got {} (ids so far {:?})",
            want[i],
            ids[i],
            &ids[..=i]
        );
        let err = (logprobs[i] as f64 - want_lp[i]).abs();
        assert!(
            err <= tol,
            "{what}: step {i}: logprob expected {}, got {} (|err| {err})",
            want_lp[i],
            logprobs[i]
        );
        worst = worst.max(err);
    }
    (n, worst)
}

/// Options of a greedy generation of `max_tokens` tokens (no stop strings), as the parity tests
/// run them.
pub fn greedy(max_tokens: usize) -> kiln::llm::GenerateOptions {
    kiln::llm::GenerateOptions {
        max_tokens,
        sampler: kiln::kernels::sample::SamplerSettings::greedy(),
        seed: 0,
        stop: vec![],
        pipelined: true,
        grammar: None,
        logit_bias: vec![],
    }
}

/// Rounds values to f16 in place and returns their f16 bytes: what an f16 tensor (a KV cache)
/// is uploaded from, with the values a reference should then see.
pub fn to_f16(data: &mut [f32]) -> Vec<u8> {
    data.iter_mut()
        .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
    data.iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect()
}

/// An LLM fixture's folder: tests/fixtures/llm (tools/make_llm_fixtures.py) or
/// tests/fixtures/llm-arch (tools/make_arch_fixtures.py).
pub fn llm_fixture_dir(case: &str) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let main = root.join("llm").join(case);
    if main.exists() {
        main
    } else {
        root.join("llm-arch").join(case)
    }
}

/// The files of one run of an LLM fixture: its HF folder (`weights` = "hf"), or just the named
/// GGUF file in it.
pub fn llm_fixture_files(case: &str, weights: &str) -> kiln::llm::ModelFiles {
    let d = llm_fixture_dir(case);
    let path = if weights == "hf" { d } else { d.join(weights) };
    kiln::llm::generate::read_model_path(&path).unwrap()
}
