//! Compiling a graph into a replayable plan: memory plan (buffers reused by liveness),
//! pipelines, one uniform buffer holding every dispatch's parameters, bind groups. A run
//! records every dispatch into one compute pass and submits once; it creates nothing.

use super::{Graph, Scalar, Source, Value};
use crate::device::{Counters, Gpu};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{Bound, Ctx, Dispatch, RUN_SCALARS};
use crate::tensor::{numel, TensorPart, STORAGE};
use std::collections::HashMap;
use std::sync::Arc;

/// Options for [`Graph::compile`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CompileOptions {
    /// Fill every intermediate and output buffer with NaN bits after allocation, so that a
    /// kernel that fails to write an element is caught by the tests.
    pub poison: bool,
    /// Compile the ops as written, without the fusion pass (`graph/fuse.rs`): for tests that
    /// compare the fused plan with the plain one.
    pub unfused: bool,
}

struct Step {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
    /// Workgroup counts from a buffer (`Dispatch::indirect`) instead of `groups`.
    indirect: Option<(Arc<wgpu::Buffer>, u64)>,
    /// The kernel, for profiles: `shader:VARIANT` (e.g. `matvec:W_Q4_0`, `norm:RMS`).
    label: String,
}

impl Step {
    /// Records the step's dispatch in `pass`.
    fn dispatch(&self, pass: &mut wgpu::ComputePass) {
        match &self.indirect {
            Some((buf, offset)) => pass.dispatch_workgroups_indirect(buf, *offset),
            None => pass.dispatch_workgroups(self.groups[0], self.groups[1], self.groups[2]),
        }
    }
}

/// A short name of a kernel variant for profiles.
fn kernel_label(key: &crate::kernels::KernelKey) -> String {
    let shader = key.shader.trim_end_matches(".wgsl");
    match key.defines.first() {
        Some((d, _)) => format!("{shader}:{d}"),
        None if key.entry != "main" => format!("{shader}:{}", key.entry),
        None => shader.to_string(),
    }
}

/// A compiled graph.
pub struct Plan {
    gpu: Arc<Gpu>,
    bound: Vec<Option<Bound>>,
    steps: Vec<Step>,
    scalars: [u32; RUN_SCALARS],
    scalar_names: Vec<String>,
    scalars_dirty: std::cell::Cell<bool>,
    scalar_buf: wgpu::Buffer,
    staging: HashMap<usize, wgpu::Buffer>,
    /// A second set like `staging`, made on first use: a pipelined loop copies one run's
    /// outputs into it while the other set is mapped ([`Plan::submit_read_heads`]).
    staging_b: std::cell::OnceCell<HashMap<usize, wgpu::Buffer>>,
    /// What a run moves through memory (the plan's own accounting).
    pub traffic: Traffic,
    /// Bytes of intermediate buffers after liveness reuse.
    pub arena_bytes: u64,
    /// Bytes the intermediates would need without reuse.
    pub unshared_bytes: u64,
}

/// What one run of a plan moves through memory, by kind of value, counting every value an op
/// reads or writes once per op (what the caches hold within a dispatch is not counted again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Weight bytes the ops read (a gather: its rows), and the least a run can read: each
    /// weight once, as much of it as its largest reader reads (a table only gathered from: its
    /// rows; tied to the output head: all of it).
    pub weights_read: u64,
    pub weights_needed: u64,
    /// Cache bytes (tensors an op writes in place: the KV caches) the ops read, counted at the
    /// caches' capacity (a run reads the live rows: scale by the live fraction); the caches'
    /// capacity in bytes and in elements.
    pub cache_read: u64,
    pub cache_bytes: u64,
    pub cache_elems: u64,
    /// Activation bytes read and written (inputs, intermediates and outputs, 4 bytes an
    /// element), and every activation once.
    pub activations_moved: u64,
    pub activations_once: u64,
}

impl Graph {
    /// The plan's traffic accounting (see [`Traffic`]).
    fn traffic(&self) -> Traffic {
        let written: std::collections::HashSet<usize> = self
            .nodes
            .iter()
            .flat_map(|n| n.writes.iter().map(|w| self.root(*w).0))
            .collect();
        let bytes = |v: usize| -> u64 {
            match &self.values[v].source {
                Source::Tensor(t) => t.parts.iter().map(|p| p.buffer.size()).sum(),
                _ => numel(&self.values[v].shape) as u64 * 4,
            }
        };
        let (mut t, mut seen) = (Traffic::default(), std::collections::HashSet::new());
        let mut needed: HashMap<usize, u64> = HashMap::new();
        for node in &self.nodes {
            let metas: Vec<crate::kernels::Meta> = node
                .inputs
                .iter()
                .map(|v| (self.values[v.0].shape.as_slice(), self.values[v.0].dtype))
                .collect();
            // A tensor an op writes in place (a cache row) is not read by it: the caller counts
            // the rows written.
            let in_place = |v: &Value| node.writes.iter().any(|w| self.root(*w) == self.root(*v));
            let reads = node.inputs.iter().enumerate();
            let reads = reads
                .filter(|(_, v)| !in_place(v))
                .map(|(i, v)| (Some(i), *v));
            for (i, v) in reads.chain(node.out.map(|o| (None, o))) {
                let r = self.root(v).0;
                let whole = bytes(r);
                let first = seen.insert(r);
                match (&self.values[r].source, written.contains(&r)) {
                    (Source::Tensor(_), true) => {
                        t.cache_read += whole;
                        if first {
                            t.cache_bytes += whole;
                            t.cache_elems += numel(&self.values[r].shape) as u64;
                        }
                    }
                    (Source::Tensor(_), false) => {
                        let op = node.op.kernel();
                        let read = i.map_or(whole, |i| op.input_bytes(i, whole, &metas));
                        t.weights_read += read;
                        let n = needed.entry(r).or_default();
                        *n = (*n).max(read);
                    }
                    _ => {
                        t.activations_moved += whole;
                        t.activations_once += if first { whole } else { 0 };
                    }
                }
            }
        }
        t.weights_needed = needed.values().sum();
        t
    }

    /// Errors when an input or an op's output would need a bigger buffer than the adapter
    /// binds at once (before anything is allocated): compile does this first, and a caller
    /// can check a graph it will only compile later (the VAE decode after a long loop).
    pub fn check_fits(&self, gpu: &Gpu) -> Result<()> {
        for v in &self.values {
            if matches!(v.source, Source::Input | Source::Node) {
                let n = v
                    .shape
                    .iter()
                    .fold(1u64, |a, &d| a.saturating_mul(d as u64));
                gpu.fits(&format!("{} {:?}", v.name, v.shape), n.saturating_mul(4))?;
            }
        }
        Ok(())
    }

    /// Compiles the graph for `gpu`: allocates, builds pipelines and bind groups.
    pub async fn compile(&self, gpu: &Arc<Gpu>, opts: CompileOptions) -> Result<Plan> {
        if opts.unfused {
            self.compile_ops(gpu, opts).await
        } else {
            self.fused(gpu).compile_ops(gpu, opts).await
        }
    }

    /// Compiles the op list as it stands: bind what has a buffer of its own, encode the nodes
    /// in order over a pooled arena, then one uniform buffer of parameters, pipelines and bind
    /// groups, and staging buffers for the outputs.
    async fn compile_ops(&self, gpu: &Arc<Gpu>, opts: CompileOptions) -> Result<Plan> {
        self.check_fits(gpu)?;
        let mut bound = self.bind_fixed(gpu);
        let encoded = self.encode_nodes(gpu, &mut bound)?;
        for i in 0..self.values.len() {
            if matches!(self.values[i].source, Source::Alias(_)) {
                bound[i] = self.view(&bound, Value(i));
            }
        }
        let scalar_buf = gpu.create_buffer(
            "run-scalars",
            (RUN_SCALARS * 4) as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let (param_buf, slots) = pack_params(gpu, &encoded.dispatches);
        let mut steps = Vec::with_capacity(encoded.dispatches.len());
        for (d, slot) in encoded.dispatches.iter().zip(slots) {
            steps.push(step(gpu, d, &param_buf, slot, &scalar_buf).await?);
        }
        let staging = self.staging_buffers(gpu);
        if opts.poison {
            self.poison(gpu, &bound, &encoded.arena);
        }
        Ok(Plan {
            gpu: gpu.clone(),
            bound,
            steps,
            scalars: [0; RUN_SCALARS],
            scalar_names: self.scalars.clone(),
            scalars_dirty: std::cell::Cell::new(true),
            scalar_buf,
            staging,
            staging_b: Default::default(),
            traffic: self.traffic(),
            arena_bytes: encoded.arena_bytes,
            unshared_bytes: encoded.unshared_bytes,
        })
    }

    /// Buffers that are not the arena's: inputs and outputs get their own, graph tensors bring
    /// theirs. Node values and aliases stay unbound here.
    fn bind_fixed(&self, gpu: &Gpu) -> Vec<Option<Bound>> {
        let own = |name: &str, shape: &[usize], dtype: DType| -> Bound {
            let buf = gpu.create_buffer(
                name,
                numel(shape) as u64 * 4,
                STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            Bound::single(shape, dtype, Arc::new(buf))
        };
        self.values
            .iter()
            .map(|v| match &v.source {
                Source::Input => Some(own(&v.name, &v.shape, v.dtype)),
                Source::Tensor(t) => Some(Bound {
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                    parts: t.parts.clone(),
                }),
                Source::Node if v.output => Some(own(&v.name, &v.shape, v.dtype)),
                Source::Node | Source::Alias(_) => None,
            })
            .collect()
    }

    /// A view takes its root's buffer(s) with its own shape; a buffer holding the whole value
    /// holds all of the view's rows (a gather from `[b * l, d]` reshaped from `[b, l, d]` reads
    /// rows past `b`).
    fn view(&self, bound: &[Option<Bound>], v: Value) -> Option<Bound> {
        let root = self.root(v);
        let shape = self.values[v.0].shape.clone();
        bound[root.0].clone().map(|mut b| {
            if let [part] = b.parts.as_mut_slice() {
                part.rows = shape.first().copied().unwrap_or(1);
            }
            Bound { shape, ..b }
        })
    }

    /// Encodes every node in order, binding each output to an arena buffer. Liveness: a buffer
    /// returns to the pool after its value's last reader is encoded; the output is allocated
    /// before the inputs are released, so no op reads and writes the same buffer.
    fn encode_nodes(&self, gpu: &Arc<Gpu>, bound: &mut [Option<Bound>]) -> Result<Encoded> {
        let mut last_use = vec![None::<usize>; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in n.inputs.iter().chain(&n.writes) {
                last_use[self.root(*v).0] = Some(i);
            }
        }
        let mut pool: Vec<Arc<wgpu::Buffer>> = Vec::new();
        let mut e = Encoded::default();
        let shared_scratch = crate::kernels::SharedScratch::default();
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(out) = node.out.filter(|o| bound[o.0].is_none()) {
                let info = &self.values[out.0];
                let size = (numel(&info.shape) as u64 * 4).max(4);
                e.unshared_bytes += size;
                let buf = take_pooled(&mut pool, size).unwrap_or_else(|| {
                    e.arena_bytes += size;
                    let b = Arc::new(gpu.create_buffer(&info.name, size, STORAGE));
                    e.arena.push(b.clone());
                    b
                });
                bound[out.0] = Some(Bound::single(&info.shape, info.dtype, buf));
            }
            let ins: Vec<Bound> = node
                .inputs
                .iter()
                .map(|v| {
                    self.view(bound, *v).ok_or_else(|| Error::Gpu {
                        context: "compile".into(),
                        msg: format!("value {} unbound", v.0),
                    })
                })
                .collect::<Result<_>>()?;
            let out = node.out.and_then(|o| bound[o.0].clone());
            let ctx = Ctx {
                gpu,
                shared: &shared_scratch,
            };
            e.dispatches
                .extend(node.op.kernel().encode(&ctx, &ins, out.as_ref())?);
            for v in node.inputs.iter().chain(node.out.iter()) {
                let v = &self.root(*v);
                let info = &self.values[v.0];
                let dead = last_use[v.0].is_none_or(|l| l <= i);
                if dead && matches!(info.source, Source::Node) && !info.output {
                    if let Some(b) = bound[v.0].as_ref() {
                        let buf = b.parts[0].buffer.clone();
                        if !pool.iter().any(|p| Arc::ptr_eq(p, &buf)) {
                            pool.push(buf);
                        }
                    }
                }
            }
        }
        Ok(e)
    }

    /// A mapped staging buffer for each output.
    fn staging_buffers(&self, gpu: &Gpu) -> HashMap<usize, wgpu::Buffer> {
        let mut staging = HashMap::new();
        for (i, v) in self.values.iter().enumerate() {
            if v.output {
                let b = gpu.create_buffer(
                    "staging",
                    numel(&v.shape) as u64 * 4,
                    wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
                );
                staging.insert(i, b);
            }
        }
        staging
    }

    /// Fills the outputs and the arena with NaN bits, so a kernel that leaves an element
    /// unwritten shows up in the tests.
    fn poison(&self, gpu: &Gpu, bound: &[Option<Bound>], arena: &[Arc<wgpu::Buffer>]) {
        for (i, v) in self.values.iter().enumerate() {
            if v.output {
                if let Some(b) = &bound[i] {
                    let n = numel(&v.shape);
                    gpu.write_buffer(
                        &b.parts[0].buffer,
                        0,
                        bytemuck::cast_slice(&vec![u32::MAX; n.max(1)]),
                    );
                }
            }
        }
        for b in arena {
            gpu.write_buffer(
                b,
                0,
                bytemuck::cast_slice(&vec![u32::MAX; (b.size() / 4) as usize]),
            );
        }
    }
}

/// What encoding the nodes gave: the dispatches and the arena they run in.
#[derive(Default)]
struct Encoded {
    dispatches: Vec<Dispatch>,
    arena: Vec<Arc<wgpu::Buffer>>,
    arena_bytes: u64,
    unshared_bytes: u64,
}

/// The smallest pooled buffer of at least `size` bytes and not more than twice that (small
/// values may take up to 1 KiB), removed from the pool.
fn take_pooled(pool: &mut Vec<Arc<wgpu::Buffer>>, size: u64) -> Option<Arc<wgpu::Buffer>> {
    let pos = pool
        .iter()
        .enumerate()
        .filter(|(_, b)| b.size() >= size && b.size() <= size.saturating_mul(2).max(1024))
        .min_by_key(|(_, b)| b.size())
        .map(|(j, _)| j)?;
    Some(pool.swap_remove(pos))
}

/// All dispatch parameters in one uniform buffer, each block in a whole aligned slot (so a
/// shader's Params struct may be larger than the words an encoder wrote: trailing fields read
/// as zero). Returns the buffer and each dispatch's (offset, size).
fn pack_params(gpu: &Gpu, dispatches: &[Dispatch]) -> (wgpu::Buffer, Vec<(u64, u64)>) {
    let align = gpu.limits.min_uniform_buffer_offset_alignment as usize;
    let mut param_words: Vec<u32> = Vec::new();
    let mut slots = Vec::with_capacity(dispatches.len());
    for d in dispatches {
        let start = (param_words.len() * 4).next_multiple_of(align);
        param_words.resize(start / 4, 0);
        let slot = (d.params.len() * 4).next_multiple_of(align).max(align);
        slots.push((start as u64, slot as u64));
        param_words.extend(&d.params);
        param_words.resize((start + slot) / 4, 0);
    }
    let param_buf = gpu.create_buffer(
        "params",
        (param_words.len() * 4) as u64,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    );
    gpu.write_buffer(&param_buf, 0, bytemuck::cast_slice(&param_words));
    (param_buf, slots)
}

/// One dispatch's pipeline and bind group: its parameter slot, the run scalars, then its
/// buffers. A bind group the device refuses is an error naming the kernel.
async fn step(
    gpu: &Gpu,
    d: &Dispatch,
    param_buf: &wgpu::Buffer,
    (offset, size): (u64, u64),
    scalar_buf: &wgpu::Buffer,
) -> Result<Step> {
    let access: Vec<bool> = d.bindings.iter().map(|b| b.writable).collect();
    let pipeline = gpu.pipeline(&d.key, &access).await?;
    let layout = gpu.bind_group_layout(&access);
    let mut entries = vec![
        wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: param_buf,
                offset,
                size: std::num::NonZeroU64::new(size),
            }),
        },
        wgpu::BindGroupEntry {
            binding: 1,
            resource: scalar_buf.as_entire_binding(),
        },
    ];
    for (i, b) in d.bindings.iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: 2 + i as u32,
            resource: b.buffer.as_entire_binding(),
        });
    }
    let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(d.key.entry),
        layout: &layout,
        entries: &entries,
    });
    if let Some(e) = scope.pop().await {
        return Err(Error::Gpu {
            context: format!("bind group for {} ({})", d.key.shader, d.key.entry),
            msg: e.to_string(),
        });
    }
    Counters::add(&gpu.counters.bind_groups_created, 1);
    Ok(Step {
        pipeline,
        bind_group,
        groups: d.groups,
        indirect: d.indirect.clone(),
        label: kernel_label(&d.key),
    })
}

impl Plan {
    /// Sets a run scalar for the next run.
    pub fn set(&mut self, s: Scalar, v: u32) {
        if self.scalars[s.0 as usize] != v {
            self.scalars[s.0 as usize] = v;
            self.scalars_dirty.set(true);
        }
    }

    /// The current value of every run scalar.
    pub fn scalars(&self) -> &[u32] {
        &self.scalars
    }

    /// The scalars a run uploads: the graph's, in whole blocks of 16 (the rest stay zero).
    fn used_scalars(&self) -> &[u32] {
        &self.scalars[..self
            .scalar_names
            .len()
            .next_multiple_of(16)
            .min(RUN_SCALARS)]
    }

    /// Names of the run scalars, by slot.
    pub fn scalar_names(&self) -> &[String] {
        &self.scalar_names
    }

    /// Number of dispatches per run.
    pub fn dispatch_count(&self) -> usize {
        self.steps.len()
    }

    fn value_buffer(&self, v: Value) -> Result<&TensorPart> {
        self.bound
            .get(v.0)
            .and_then(|b| b.as_ref())
            .and_then(|b| b.parts.first())
            .ok_or_else(|| Error::Data {
                name: format!("value {}", v.0),
                msg: "has no buffer (an intermediate that is not an output?)".into(),
            })
    }

    /// Writes raw words into a value's buffer (inputs, or state tensors).
    pub fn write_words(&self, v: Value, words: &[u32]) -> Result<()> {
        let b = self
            .bound
            .get(v.0)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| Error::Data {
                name: format!("value {}", v.0),
                msg: "unknown".into(),
            })?;
        let n = numel(&b.shape);
        if words.len() != n {
            return Err(Error::Data {
                name: format!("value {}", v.0),
                msg: format!(
                    "shape {:?} holds {n} elements, got {}",
                    b.shape,
                    words.len()
                ),
            });
        }
        self.gpu.write_buffer(
            &self.value_buffer(v)?.buffer,
            0,
            bytemuck::cast_slice(words),
        );
        Ok(())
    }

    /// Writes `words` into an input from word `at` on (the rest stays as it was).
    pub fn write_words_at(&self, v: Value, at: usize, words: &[u32]) -> Result<()> {
        let b = self.value_buffer(v)?;
        let n = self
            .bound
            .get(v.0)
            .and_then(|b| b.as_ref())
            .map_or(0, |b| numel(&b.shape));
        if at + words.len() > n {
            return Err(Error::Data {
                name: format!("value {}", v.0),
                msg: format!("{} words at {at} do not fit its {n}", words.len()),
            });
        }
        self.gpu
            .write_buffer(&b.buffer, 4 * at as u64, bytemuck::cast_slice(words));
        Ok(())
    }

    /// Writes f32 data into an input.
    pub fn write_f32(&self, v: Value, data: &[f32]) -> Result<()> {
        self.write_words(v, bytemuck::cast_slice(data))
    }

    /// Writes u32 data into an input.
    pub fn write_u32(&self, v: Value, data: &[u32]) -> Result<()> {
        self.write_words(v, data)
    }

    fn encode(&self, enc: &mut wgpu::CommandEncoder) {
        if self.scalars_dirty.replace(false) {
            self.gpu.write_buffer(
                &self.scalar_buf,
                0,
                bytemuck::cast_slice(self.used_scalars()),
            );
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("kiln"),
            timestamp_writes: None,
        });
        for s in &self.steps {
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, &s.bind_group, &[]);
            s.dispatch(&mut pass);
        }
        Counters::add(&self.gpu.counters.dispatches, self.steps.len() as u64);
    }

    /// Runs every dispatch in one compute pass and one submit.
    pub fn run(&self) -> Result<()> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        self.encode(&mut enc);
        self.gpu.submit([enc.finish()]);
        self.gpu.check("Plan::run")
    }

    /// Runs and reads the given outputs back, still in one submit.
    pub async fn run_read(&self, outs: &[Value]) -> Result<Vec<Vec<u8>>> {
        let all: Vec<(Value, u64)> = outs.iter().map(|&v| (v, u64::MAX)).collect();
        self.run_read_heads(&all).await
    }

    /// [`Plan::run_read`] that reads back only the first `bytes` of each output (rounded up to
    /// 4), e.g. the sampler's id and log-probability without its optional extras.
    pub async fn run_read_heads(&self, outs: &[(Value, u64)]) -> Result<Vec<Vec<u8>>> {
        let pending = self.submit_read_heads(outs, 0)?;
        self.finish_read(pending).await
    }

    /// The first half of [`Plan::run_read_heads`]: encodes and submits the run with copies of
    /// the outputs' heads into staging set `slot` (0 or 1), and returns without waiting. A
    /// loop can submit the next run (into the other set) before [`Plan::finish_read`] maps this
    /// one, so the GPU works while the host handles the result. The run scalars set before
    /// each submit are the ones its run sees (queued writes land between submissions).
    pub fn submit_read_heads(&self, outs: &[(Value, u64)], slot: usize) -> Result<PendingRead> {
        let t0 = crate::device::now_ms();
        let staging = match slot {
            0 => &self.staging,
            _ => self.second_staging(),
        };
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        self.encode(&mut enc);
        let mut reads = Vec::new();
        for &(v, head) in outs {
            let st = staging.get(&v.0).ok_or_else(|| Error::Data {
                name: format!("value {}", v.0),
                msg: "not marked as an output".into(),
            })?;
            let n = numel(
                &self.bound[v.0]
                    .as_ref()
                    .map(|b| b.shape.clone())
                    .unwrap_or_default(),
            ) as u64
                * 4;
            let size = st.size().min(head.div_ceil(4).saturating_mul(4)).max(4);
            enc.copy_buffer_to_buffer(&self.value_buffer(v)?.buffer, 0, st, 0, size);
            reads.push((v.0, size.min(n.max(4))));
        }
        let cmd = enc.finish();
        let t1 = crate::device::now_ms();
        let index = self.gpu.submit([cmd]);
        let t2 = crate::device::now_ms();
        self.gpu.check("Plan::run_read")?;
        Ok(PendingRead {
            slot,
            reads,
            index,
            encode_ms: t1 - t0,
            submit_ms: t2 - t1,
        })
    }

    /// Makes the second staging set now: a loop that will alternate sets calls this up front,
    /// so that none of its runs creates a buffer.
    pub fn prepare_pipelined(&self) {
        self.second_staging();
    }

    /// The second staging set, made on first use.
    fn second_staging(&self) -> &HashMap<usize, wgpu::Buffer> {
        self.staging_b.get_or_init(|| {
            let usage = wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ;
            let make = |b: &wgpu::Buffer| self.gpu.create_buffer("staging", b.size(), usage);
            self.staging.iter().map(|(&i, b)| (i, make(b))).collect()
        })
    }

    /// Waits for a run [`Plan::submit_read_heads`] submitted (only for it, not for runs
    /// submitted after it) and reads its outputs back.
    pub async fn finish_read(&self, pending: PendingRead) -> Result<Vec<Vec<u8>>> {
        let staging = match pending.slot {
            0 => &self.staging,
            _ => self.staging_b.get().unwrap_or(&self.staging),
        };
        let mut res = Vec::new();
        for (i, size) in pending.reads {
            res.push(
                self.gpu
                    .map_read_after(&staging[&i], size, pending.index.clone())
                    .await?,
            );
        }
        Ok(res)
    }

    /// Runs once with a timestamp query around every dispatch (each in its own compute pass)
    /// and returns the GPU time of each, in milliseconds, labelled by kernel, in dispatch
    /// order. Needs the adapter's timestamp queries; for finding bottlenecks, not for speed.
    pub async fn profile(&self) -> Result<Vec<(String, f64)>> {
        let gpu = &self.gpu;
        if !gpu.features.timestamps {
            return Err(Error::Unsupported(format!(
                "timestamp queries on '{}'",
                gpu.info.name
            )));
        }
        let n = self.steps.len() as u32;
        if n == 0 {
            return Ok(Vec::new());
        }
        if self.scalars_dirty.replace(false) {
            gpu.write_buffer(
                &self.scalar_buf,
                0,
                bytemuck::cast_slice(self.used_scalars()),
            );
        }
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n,
        });
        let bytes = 16 * n as u64;
        let resolved = gpu.create_buffer(
            "profile",
            bytes,
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        );
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for (i, s) in self.steps.iter().enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("profile"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &queries,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, &s.bind_group, &[]);
            s.dispatch(&mut pass);
        }
        enc.resolve_query_set(&queries, 0..2 * n, &resolved, 0);
        gpu.submit([enc.finish()]);
        gpu.check("Plan::profile")?;
        let raw = gpu.read_buffer(&resolved, 0, bytes).await?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let period = gpu.queue.get_timestamp_period() as f64;
        Ok(self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let dt = ticks[2 * i + 1].saturating_sub(ticks[2 * i]);
                (s.label.clone(), dt as f64 * period * 1e-6)
            })
            .collect())
    }

    /// Reads an output back (its own submit).
    pub async fn read_f32(&self, v: Value) -> Result<Vec<f32>> {
        let p = self.value_buffer(v)?;
        let n = numel(
            &self.bound[v.0]
                .as_ref()
                .map(|b| b.shape.clone())
                .unwrap_or_default(),
        );
        let bytes = self.gpu.read_buffer(&p.buffer, 0, n as u64 * 4).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads a u32 output back (its own submit).
    pub async fn read_u32(&self, v: Value) -> Result<Vec<u32>> {
        Ok(self
            .read_f32(v)
            .await?
            .iter()
            .map(|f| f.to_bits())
            .collect())
    }
}

/// A submitted run whose outputs [`Plan::finish_read`] reads back, and what its submission
/// cost the host.
pub struct PendingRead {
    slot: usize,
    /// (value index, bytes) of each output to read.
    reads: Vec<(usize, u64)>,
    index: wgpu::SubmissionIndex,
    /// Host milliseconds spent recording the commands, and in the submit call.
    pub encode_ms: f64,
    pub submit_ms: f64,
}
