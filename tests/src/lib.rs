//! Shared helpers for the integration tests: the GPU (a test fails when there is none), a
//! deterministic random generator, a one-op graph harness that poisons outputs, and closeness
//! checks that report index, expected and got.

use kiln::{CompileOptions, DType, Graph, Gpu, GpuOptions, Scalar, Tensor, Value};
use std::sync::{Arc, OnceLock};

/// The shared GPU of a test binary. Panics (fails the test) when no adapter is found.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| gpu_with(GpuOptions::default())).clone()
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
    assert_eq!(got.len(), want.len(), "{what}: length: expected {}, got {}", want.len(), got.len());
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !(err <= atol + rtol * w.abs()) {
            panic!("{what}: index {i}: expected {w}, got {g} (|err| {err}, atol {atol}, rtol {rtol})");
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
        OpTest { gpu, g: Graph::new(), inputs: Vec::new() }
    }
    /// An f32 input with data.
    pub fn input(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Value {
        let v = self.g.input(name, shape, DType::F32).unwrap();
        self.inputs.push((v, data.iter().map(|f| f.to_bits()).collect()));
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
        let mut plan = pollster::block_on(self.g.compile(&self.gpu, CompileOptions { poison: true })).unwrap();
        for (v, d) in &self.inputs {
            plan.write_u32(*v, d).unwrap();
        }
        for (s, x) in scalars {
            plan.set(*s, *x);
        }
        plan.run();
        pollster::block_on(plan.read_f32(out)).unwrap()
    }
}

impl Default for OpTest {
    fn default() -> Self {
        Self::new()
    }
}
