//! The shader ABI. Each family module holds, for each op it computes, a plain parameter struct
//! (what the op is: `Attention { heads, kv_heads, .. }`) implementing [`Kernel`]: its shape rule
//! ([`Kernel::infer`]) and its [`Dispatch`]es ([`Kernel::encode`]). Each shader's uniform block
//! is a `#[repr(C)]` struct declared with [`params!`], whose field names, order and types a test
//! compares with the WGSL `struct Params` it feeds.
//!
//! This layer knows devices, buffers and dtypes; it knows nothing of graphs, models or files.
//! Run-time integers ([`Dyn`]) refer to a [`Scalar`] slot of the per-run uniform.

pub mod attention;
pub mod conv;
pub mod delta;
pub mod elementwise;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod scheduler;

pub use crate::device::{grid, Binding, Dispatch, KernelKey, MAX_GROUPS_X};

use crate::device::Gpu;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use std::sync::Arc;

/// Number of per-run scalar slots (`RunScalars` in `common.wgsl`).
pub const RUN_SCALARS: usize = 64;

/// A per-run scalar slot (a position, a step index, a seed), set before each `Plan::run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scalar(pub u32);

/// A per-run integer: fixed at compile time, or `add + mul * scalar` read at run time, or
/// (`Rows`, for a batch of sequences in one run) `add + mul * scalar[first + r]` for batch row
/// `r`: one scalar per row, in consecutive slots ([`crate::Graph::scalars`]). Only the kernels
/// that index rows by sequence read `Rows` (attention, rope, rope_kv, gather, sample, and the
/// linear-attention ops of `kernels::delta`); kernels reading `dyn_val` refuse it
/// ([`need_uniform_dyn`]), and only `llm::model::build_batch` makes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dyn {
    Static(u32),
    Slot { slot: Scalar, mul: u32, add: u32 },
    Rows { first: Scalar, mul: u32, add: u32 },
}

/// The slot word's flag of a per-row [`Dyn`] (`ROWS` in `common.wgsl`).
pub const ROWS_FLAG: u32 = 0x8000_0000;

impl Dyn {
    /// The value of scalar slot `s`.
    pub fn slot(s: Scalar) -> Self {
        Dyn::Slot {
            slot: s,
            mul: 1,
            add: 0,
        }
    }
    /// `add + mul * s`.
    pub fn affine(s: Scalar, mul: u32, add: u32) -> Self {
        Dyn::Slot { slot: s, mul, add }
    }
    /// Row `r`'s value is scalar `first + r`.
    pub fn rows(first: Scalar) -> Self {
        Dyn::Rows {
            first,
            mul: 1,
            add: 0,
        }
    }
    /// `self * k` (a row offset turned into an element offset).
    pub fn times(self, k: u32) -> Self {
        match self {
            Dyn::Static(v) => Dyn::Static(v * k),
            Dyn::Slot { slot, mul, add } => Dyn::Slot {
                slot,
                mul: mul * k,
                add: add * k,
            },
            Dyn::Rows { first, mul, add } => Dyn::Rows {
                first,
                mul: mul * k,
                add: add * k,
            },
        }
    }
    /// `self + k`.
    pub fn plus(self, k: u32) -> Self {
        match self {
            Dyn::Static(v) => Dyn::Static(v + k),
            Dyn::Slot { slot, mul, add } => Dyn::Slot {
                slot,
                mul,
                add: add + k,
            },
            Dyn::Rows { first, mul, add } => Dyn::Rows {
                first,
                mul,
                add: add + k,
            },
        }
    }
    /// Whether each batch row reads its own scalar.
    pub fn per_row(self) -> bool {
        matches!(self, Dyn::Rows { .. })
    }
    /// The (add, slot, mul) words a shader's `dyn_val` / `dyn_row` reads; slot `0xffffffff` =
    /// static, slot with [`ROWS_FLAG`] = per row.
    pub fn words(self) -> [u32; 3] {
        match self {
            Dyn::Static(v) => [v, u32::MAX, 0],
            Dyn::Slot { slot, mul, add } => [add, slot.0, mul],
            Dyn::Rows { first, mul, add } => [add, first.0 | ROWS_FLAG, mul],
        }
    }
    /// The value for batch row `row` given the run scalars (used by the CPU side and tests).
    pub fn eval_row(self, scalars: &[u32], row: usize) -> u32 {
        match self {
            Dyn::Static(v) => v,
            Dyn::Slot { slot, mul, add } => add + mul * scalars[slot.0 as usize],
            Dyn::Rows { first, mul, add } => add + mul * scalars[first.0 as usize + row],
        }
    }
    /// The value given the run scalars (row 0 of a per-row value).
    pub fn eval(self, scalars: &[u32]) -> u32 {
        self.eval_row(scalars, 0)
    }
}

/// An error unless `d` is the same for every row: kernels that read `dyn_val` take no
/// per-row values.
pub fn need_uniform_dyn(op: &str, what: &str, d: Dyn) -> Result<()> {
    if d.per_row() {
        return Err(shape_err(
            op,
            format!("{what} cannot differ per batch row here"),
        ));
    }
    Ok(())
}

/// A uniform parameter block: a `#[repr(C)]` plain-old-data struct whose layout is the WGSL
/// `struct Params` of one shader variant (declared with [`params!`]).
pub trait ShaderParams: bytemuck::Pod {
    /// Shader file.
    const SHADER: &'static str;
    /// Defines selecting the variant that declares this `Params` (`#ifdef` branches).
    const DEFINES: &'static [&'static str];
    /// `(name, type)` of every field in declaration order (`u32` or `f32`).
    const FIELDS: &'static [(&'static str, &'static str)];
    /// The uniform words.
    fn words(&self) -> Vec<u32> {
        bytemuck::cast_slice(std::slice::from_ref(self)).to_vec()
    }
}

/// Declares a shader's uniform block: `params!(MatvecParams, "matvec.wgsl", [] { rows: u32, .. })`.
/// Crate-private and used as `super::params!` by the kernel files, so they import nothing above
/// the kernels layer.
macro_rules! params {
    ($(#[$m:meta])* $name:ident, $shader:literal, [$($def:literal),*] { $($f:ident : $t:ident),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub struct $name { $(pub $f: $t),* }
        impl $crate::kernels::ShaderParams for $name {
            const SHADER: &'static str = $shader;
            const DEFINES: &'static [&'static str] = &[$($def),*];
            const FIELDS: &'static [(&'static str, &'static str)] = &[$((stringify!($f), stringify!($t))),*];
        }
    };
}
pub(crate) use params;

/// The layout of one parameter block, for the WGSL parity test.
#[derive(Clone, Copy, Debug)]
pub struct ParamsLayout {
    pub rust_name: &'static str,
    pub shader: &'static str,
    pub defines: &'static [&'static str],
    pub fields: &'static [(&'static str, &'static str)],
}

fn layout<P: ShaderParams>() -> ParamsLayout {
    ParamsLayout {
        rust_name: std::any::type_name::<P>(),
        shader: P::SHADER,
        defines: P::DEFINES,
        fields: P::FIELDS,
    }
}

/// Every parameter block the kernels write.
pub fn all_params() -> Vec<ParamsLayout> {
    vec![
        layout::<attention::AttentionParams>(),
        layout::<conv::ConvParams>(),
        layout::<delta::ConvStateParams>(),
        layout::<delta::DeltaParams>(),
        layout::<elementwise::UnaryParams>(),
        layout::<elementwise::BinaryParams>(),
        layout::<elementwise::GluParams>(),
        layout::<elementwise::TimestepParams>(),
        layout::<elementwise::CopyParams>(),
        layout::<elementwise::UpsampleParams>(),
        layout::<elementwise::ConcatParams>(),
        layout::<elementwise::TransposeParams>(),
        layout::<linear::MatvecParams>(),
        layout::<linear::MatmulParams>(),
        layout::<linear::GatherParams>(),
        layout::<moe::RouterParams>(),
        layout::<moe::ListsParams>(),
        layout::<moe::CombineParams>(),
        layout::<norm::NormParams>(),
        layout::<norm::SoftmaxParams>(),
        layout::<rope::RopeParams>(),
        layout::<rope::RopeKvParams>(),
        layout::<sample::SampleParams>(),
        layout::<sample::NoiseParams>(),
        layout::<sample::PhiloxKatParams>(),
        layout::<scheduler::SchedulerParams>(),
        layout::<scheduler::BlendParams>(),
    ]
}

/// A value as a kernel sees it: shape, dtype and buffer(s) (several for a split weight).
#[derive(Clone, Debug)]
pub struct Bound {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub parts: Vec<crate::tensor::TensorPart>,
}

impl Bound {
    /// A value held in one buffer.
    pub fn single(shape: &[usize], dtype: DType, buffer: Arc<wgpu::Buffer>) -> Self {
        Bound {
            shape: shape.to_vec(),
            dtype,
            parts: vec![crate::tensor::TensorPart {
                buffer,
                row_start: 0,
                rows: shape.first().copied().unwrap_or(1),
            }],
        }
    }
    /// The first (for activations, only) buffer.
    pub fn buf(&self) -> &Arc<wgpu::Buffer> {
        &self.parts[0].buffer
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        crate::tensor::numel(&self.shape)
    }
}

/// Workgroups of 256 threads covering `n` elements, one per thread.
pub fn elementwise_groups(n: usize) -> [u32; 3] {
    grid((n as u32).div_ceil(256))
}

/// Scratch buffers the ops of one plan share, by name (see [`Ctx::shared_scratch`]).
pub type SharedScratch =
    std::cell::RefCell<std::collections::HashMap<&'static str, Arc<wgpu::Buffer>>>;

/// What an op's encoder may use besides its inputs and output: the device, to create scratch
/// buffers (partial results, statistics). They are created once, at compile time.
pub struct Ctx<'a> {
    pub gpu: &'a Gpu,
    pub shared: &'a SharedScratch,
}

impl Ctx<'_> {
    /// A storage buffer of `bytes` for intermediate results private to one op.
    pub fn scratch(&self, name: &str, bytes: u64) -> Result<Arc<wgpu::Buffer>> {
        self.gpu.fits(name, bytes)?;
        Ok(Arc::new(self.gpu.create_buffer(
            name,
            bytes,
            crate::tensor::STORAGE,
        )))
    }

    /// Scratch of at least `bytes` that every op of the plan asking for `name` shares: an op
    /// writes it and reads it back within its own dispatches, and a plan's dispatches run in
    /// order, so one buffer serves them all. A request larger than the current one makes a new
    /// buffer (rounded up to a power of two, so there are few) that later requests share.
    pub fn shared_scratch(&self, name: &'static str, bytes: u64) -> Result<Arc<wgpu::Buffer>> {
        let mut shared = self.shared.borrow_mut();
        if let Some(b) = shared.get(name).filter(|b| b.size() >= bytes) {
            return Ok(b.clone());
        }
        let b = self.scratch(name, bytes.next_power_of_two())?;
        shared.insert(name, b.clone());
        Ok(b)
    }
}

/// An input as shape inference sees it.
pub type Meta<'a> = (&'a [usize], DType);

/// What shape inference returns: the output's shape and dtype, `None` for in-place ops.
pub type Inferred = Option<(Vec<usize>, DType)>;

/// One operation's parameters, shape rule and encoding.
pub trait Kernel {
    /// Short name for messages.
    fn name(&self) -> &'static str;
    /// Output shape and dtype from the inputs, or an error naming the op and what is wrong.
    fn infer(&self, ins: &[Meta]) -> Result<Inferred>;
    /// The dispatches computing the op (inputs in the order of the graph builder's method).
    fn encode(&self, ctx: &Ctx, ins: &[Bound], out: Option<&Bound>) -> Result<Vec<Dispatch>>;
    /// Bytes of input `i` (of `whole` bytes, shaped `ins[i]`) one run reads: all of it, unless
    /// the op reads a part (a gather reads its rows). For the plan's traffic accounting.
    fn input_bytes(&self, _i: usize, whole: u64, _ins: &[Meta]) -> u64 {
        whole
    }
}

/// A size as a uniform word, saturating (a size past `u32::MAX` cannot be bound anyway).
pub fn u(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// A one-dispatch encoding.
pub fn dispatch<P: ShaderParams>(
    key: KernelKey,
    params: &P,
    bindings: Vec<Binding>,
    groups: [u32; 3],
) -> Dispatch {
    Dispatch {
        key,
        params: params.words(),
        bindings,
        groups,
        indirect: None,
    }
}

/// The output binding an op with an output needs.
pub fn out<'a>(op: &dyn Kernel, out: Option<&'a Bound>) -> Result<&'a Bound> {
    out.ok_or_else(|| shape_err(op.name(), "missing output"))
}

/// An f32 tensor an op requires.
pub fn need_f32(op: &str, dt: DType) -> Result<()> {
    if dt != DType::F32 {
        return Err(Error::DType {
            op: op.into(),
            expected: "f32".into(),
            found: dt.to_string(),
        });
    }
    Ok(())
}

/// Ops that move 32-bit words (copies, slices, transposes) need one element per word.
pub fn need_plain(op: &str, dt: DType) -> Result<()> {
    if !matches!(dt, DType::F32 | DType::U32) {
        return Err(Error::DType {
            op: op.into(),
            expected: "f32 or u32".into(),
            found: dt.to_string(),
        });
    }
    Ok(())
}

/// An f32 output of `shape`.
pub fn f32_out(shape: &[usize]) -> Result<Inferred> {
    Ok(Some((shape.to_vec(), DType::F32)))
}

/// The last dimension, or an error for a scalar.
pub fn last_dim(op: &str, shape: &[usize]) -> Result<usize> {
    shape
        .last()
        .copied()
        .ok_or_else(|| shape_err(op, "input is a scalar"))
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}
