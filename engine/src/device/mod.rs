//! Adapter and device selection, feature detection, limits and the engine's counters.
//!
//! Environment overrides (native only): `KILN_BACKEND` = `vulkan|metal|dx12|gl`, and
//! `KILN_ADAPTER` = a case-insensitive substring of the adapter name.

mod pipeline;

pub use pipeline::{grid, Binding, Dispatch, KernelKey, PipelineCache, MAX_GROUPS_X};

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How to pick and configure the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backends to consider; `None` = all compiled in (or `KILN_BACKEND`).
    pub backends: Option<wgpu::Backends>,
    /// Substring of the adapter name to require (or `KILN_ADAPTER`).
    pub adapter_name: Option<String>,
    /// Treat the storage-binding limit as this many bytes if smaller than the device's.
    /// Weights larger than the limit are split across bindings; tests force a small value.
    pub max_binding_size: Option<u64>,
    /// Request `shader-f16` / subgroups when the adapter has them (default true).
    pub disable_optional_features: bool,
    /// Use the kernel variants written for software adapters (see [`GpuFeatures::software`]);
    /// `None`: when the adapter is a CPU device, or as `KILN_SOFTWARE=0|1` says.
    pub software: Option<bool>,
    /// Keep every product's operands in f32 (no f16 GEMM tiles, see
    /// [`GpuFeatures::half_tiles`]): f32 math on dequantized weights, the contract of the
    /// parity tests. Also `KILN_F32_MATH=1`.
    pub f32_math: bool,
}

/// Optional adapter capabilities the engine can use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuFeatures {
    /// WGSL `enable f16;` is available.
    pub shader_f16: bool,
    /// Subgroup operations are available.
    pub subgroups: bool,
    /// Timestamp queries are available.
    pub timestamps: bool,
    /// The GPU GEMM core keeps its workgroup tiles in f16 (f32 accumulation): half the
    /// workgroup memory, so 128 x 128 tiles fit twice (double buffering) in WebGPU's 16 KiB.
    /// Activations and dequantized weights are rounded to f16 on the way (relative error
    /// ~5e-4 a product); shader-f16 present, GPU kernels, and not [`GpuOptions::f32_math`].
    pub half_tiles: bool,
    /// The GEMM core's 128 x 128 tiles multiply with cooperative matrices (16 x 16 x 16, f16
    /// operands, f32 accumulation; wgpu's experimental feature, Vulkan's
    /// VK_KHR_cooperative_matrix): requested where the adapter reports that shape, subgroups
    /// of a fixed 32 and 24 KiB of workgroup memory, with [`GpuFeatures::half_tiles`];
    /// `KILN_COOP=0` leaves it off. Native only (WebGPU has no such feature yet).
    pub coop_matrix: bool,
    /// A software adapter (lavapipe, SwiftShader): it runs invocations as SIMD lanes of CPU
    /// threads, where barriers and workgroup-memory reductions cost far more than on a GPU, so
    /// kernels that have one use their barrier-free variant (e.g. one invocation per matvec row).
    pub software: bool,
    /// Loop iterations one invocation may run in all before the driver cuts its loops short:
    /// Mesa's llvmpipe/lavapipe (gallivm) stops them after 65535. Kernels that loop long
    /// split their work to stay under it.
    pub loop_limit: Option<u32>,
}

/// Hardware-independent counters. Tests assert on them; benchmarks print them.
#[derive(Debug, Default)]
pub struct Counters {
    pub dispatches: AtomicU64,
    pub submits: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub bytes_read_back: AtomicU64,
    pub buffers_created: AtomicU64,
    pub bind_groups_created: AtomicU64,
    pub pipelines_created: AtomicU64,
}

/// A copy of the counters at one moment; subtract two to get what happened in between.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub dispatches: u64,
    pub submits: u64,
    pub bytes_uploaded: u64,
    pub bytes_read_back: u64,
    pub buffers_created: u64,
    pub bind_groups_created: u64,
    pub pipelines_created: u64,
}

impl CounterSnapshot {
    /// Objects (buffers, bind groups, pipelines) created.
    pub fn objects_created(&self) -> u64 {
        self.buffers_created + self.bind_groups_created + self.pipelines_created
    }
}

impl std::ops::Sub for CounterSnapshot {
    type Output = CounterSnapshot;
    fn sub(self, o: Self) -> Self {
        CounterSnapshot {
            dispatches: self.dispatches - o.dispatches,
            submits: self.submits - o.submits,
            bytes_uploaded: self.bytes_uploaded - o.bytes_uploaded,
            bytes_read_back: self.bytes_read_back - o.bytes_read_back,
            buffers_created: self.buffers_created - o.buffers_created,
            bind_groups_created: self.bind_groups_created - o.bind_groups_created,
            pipelines_created: self.pipelines_created - o.pipelines_created,
        }
    }
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Reads all counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            dispatches: g(&self.dispatches),
            submits: g(&self.submits),
            bytes_uploaded: g(&self.bytes_uploaded),
            bytes_read_back: g(&self.bytes_read_back),
            buffers_created: g(&self.buffers_created),
            bind_groups_created: g(&self.bind_groups_created),
            pipelines_created: g(&self.pipelines_created),
        }
    }
}

/// Workgroup-size and memory limits the kernels are written for (the WebGPU defaults).
const NEED_INVOCATIONS: u32 = 256;
const NEED_WG_STORAGE: u32 = 16384;
const NEED_STORAGE_BUFFERS: u32 = 8;

/// The device, its queue, what it can do, and the engine's per-device state.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: GpuFeatures,
    pub limits: wgpu::Limits,
    /// Largest byte size the engine binds as one storage buffer.
    pub binding_limit: u64,
    pub counters: Counters,
    /// Errors the API reported outside an error scope (validation at encode/submit time).
    uncaptured: Arc<std::sync::Mutex<Vec<String>>>,
    /// Why the device was lost (destroyed, a driver reset, a browser's GPU process crash).
    lost: Arc<std::sync::Mutex<Option<String>>>,
    /// The latest submission, which a [`Fence`] waits for.
    last_submit: std::sync::Mutex<Option<wgpu::SubmissionIndex>>,
    pub(crate) pipelines: PipelineCache,
}

/// The completion of the work submitted before it was made ([`Gpu::fence`], [`Gpu::wait`]):
/// lets a loop keep one step queued on the GPU while it reports the one before as done.
pub struct Fence {
    done: crate::oneshot::Receiver<()>,
    index: Option<wgpu::SubmissionIndex>,
}

fn backends_from_env() -> Option<wgpu::Backends> {
    let v = std::env::var("KILN_BACKEND").ok()?;
    Some(match v.to_ascii_lowercase().as_str() {
        "vulkan" => wgpu::Backends::VULKAN,
        "metal" => wgpu::Backends::METAL,
        "dx12" => wgpu::Backends::DX12,
        "gl" => wgpu::Backends::GL,
        _ => wgpu::Backends::all(),
    })
}

/// Lists the adapters the instance sees (for `kiln info`).
pub async fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let backends = backends_from_env().unwrap_or(wgpu::Backends::all());
    instance
        .enumerate_adapters(backends)
        .await
        .iter()
        .map(|a| a.get_info())
        .collect()
}

impl Gpu {
    /// Picks an adapter and creates the device (async; use `pollster::block_on` natively).
    pub async fn new(opts: GpuOptions) -> Result<Arc<Gpu>> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        let backends = opts.backends.or_else(backends_from_env);
        if let Some(b) = backends {
            desc.backends = b;
        }
        let instance = wgpu::Instance::new(desc);
        let want_name = opts
            .adapter_name
            .clone()
            .or_else(|| std::env::var("KILN_ADAPTER").ok())
            .map(|s| s.to_lowercase());
        let adapter = match &want_name {
            Some(name) => {
                let all = instance
                    .enumerate_adapters(backends.unwrap_or(wgpu::Backends::all()))
                    .await;
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(name))
                    .ok_or_else(|| {
                        Error::NoAdapter(format!(" matching '{name}' (found: {names:?})"))
                    })?
            }
            None => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::NoAdapter(format!(" ({e})")))?,
        };
        Self::from_adapter(adapter, &opts).await
    }

    /// The device of `adapter`: its limits checked and requested, the optional features
    /// requested where offered, errors captured instead of wgpu's panicking default.
    async fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let req = required_limits(&adapter)?;
        let af = adapter.features();
        let software_env = std::env::var("KILN_SOFTWARE").ok().map(|v| v != "0");
        let software = opts
            .software
            .or(software_env)
            .unwrap_or(info.device_type == wgpu::DeviceType::Cpu);
        let f32_math = opts.f32_math || std::env::var("KILN_F32_MATH").is_ok_and(|v| v != "0");
        let mut want = wgpu::Features::empty();
        if !opts.disable_optional_features {
            for f in [
                wgpu::Features::SHADER_F16,
                wgpu::Features::SUBGROUP,
                wgpu::Features::TIMESTAMP_QUERY,
            ] {
                if af.contains(f) {
                    want |= f;
                }
            }
        }
        let coop = !opts.disable_optional_features
            && !software
            && !f32_math
            && coop_matrix_offered(&adapter, &req);
        if coop {
            want |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kiln"),
                required_features: want,
                required_limits: req,
                experimental_features: if coop {
                    experimental_features()
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice {
                adapter: info.name.clone(),
                msg: e.to_string(),
            })?;
        let limits = device.limits();
        let mut binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(cap) = opts.max_binding_size {
            binding_limit = binding_limit.min(cap);
        }
        // Keep bindings 16-byte aligned in size so vec4 loads never straddle the end.
        binding_limit &= !15;
        let (uncaptured, lost) = capture_errors(&device);
        let shader_f16 = device.features().contains(wgpu::Features::SHADER_F16);
        let features = GpuFeatures {
            shader_f16,
            subgroups: device.features().contains(wgpu::Features::SUBGROUP),
            timestamps: device.features().contains(wgpu::Features::TIMESTAMP_QUERY),
            half_tiles: shader_f16 && !software && !f32_math,
            coop_matrix: device
                .features()
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            software,
            loop_limit: info.name.contains("llvmpipe").then_some(65535),
        };
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            features,
            limits,
            binding_limit,
            counters: Counters::default(),
            uncaptured,
            lost,
            last_submit: Default::default(),
            pipelines: Default::default(),
        }))
    }

    /// A one-line description: adapter, backend, features.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}) shader-f16={} f16-tiles={} coop-matrix={} subgroups={} timestamps={} software-kernels={} max-binding={} MiB unchecked={}",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.features.shader_f16,
            self.features.half_tiles,
            self.features.coop_matrix,
            self.features.subgroups,
            self.features.timestamps,
            self.features.software,
            self.binding_limit >> 20,
            self.dropped_checks().unwrap_or("none"),
        )
    }

    /// Creates a buffer, counting it.
    pub fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        Counters::add(&self.counters.buffers_created, 1);
        // wgpu rejects zero-sized bindings; a 4-byte minimum keeps empty tensors legal.
        let size = size.max(4).next_multiple_of(4);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Writes bytes into a buffer through the queue, counting them.
    pub fn write_buffer(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        Counters::add(&self.counters.bytes_uploaded, data.len() as u64);
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buf, offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            self.queue.write_buffer(buf, offset, &padded);
        }
    }

    /// Submits command buffers, counting the submit.
    pub fn submit(
        &self,
        cmds: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> wgpu::SubmissionIndex {
        Counters::add(&self.counters.submits, 1);
        // The lock spans the submit and the index it returns, and `fence` takes it too, so a
        // fence's callback and the index it polls for belong to the same submission even when
        // threads share the device. (Without it, a fence could register its callback on a
        // submission whose index was not stored yet, poll only up to the older one, and wait
        // forever: parallel tests did.)
        let mut last = self.last_submit.lock().unwrap_or_else(|p| p.into_inner());
        let index = self.queue.submit(cmds);
        *last = Some(index.clone());
        index
    }

    /// Errors when one buffer of `bytes` (for `what`) is more than the adapter binds at once:
    /// checked before anything is allocated, so the message names what was too big.
    pub fn fits(&self, what: &str, bytes: u64) -> Result<()> {
        // The adapter's own limit: `binding_limit` may be set lower to split weights (tests).
        let limit = (self.limits.max_storage_buffer_binding_size).min(self.limits.max_buffer_size);
        if bytes > limit {
            return Err(Error::TooLarge {
                what: what.into(),
                bytes,
                limit,
            });
        }
        Ok(())
    }

    /// A fence on the work submitted so far.
    pub fn fence(&self) -> Fence {
        let last = self.last_submit.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, rx) = crate::oneshot::channel();
        self.queue.on_submitted_work_done(move || tx.send(()));
        Fence {
            done: rx,
            index: last.clone(),
        }
    }

    /// Waits until the work before `fence` has finished (natively by polling for its
    /// submission; in the browser the event loop completes it). A lost device is an error.
    pub async fn wait(&self, fence: Fence) -> Result<()> {
        let poll = |kind: wgpu::PollType| {
            self.device.poll(kind).map_err(|e| {
                self.lost_or(Error::Gpu {
                    context: "waiting for a step".into(),
                    msg: e.to_string(),
                })
            })
        };
        poll(wgpu::PollType::Wait {
            submission_index: fence.index,
            timeout: None,
        })?;
        // With threads sharing the device, the callback can belong to a later submission than
        // the index (parallel tests hung here): then wait for everything submitted so far,
        // which fires it. A single thread never gets here, so the next step stays queued.
        if !fence.done.is_ready() {
            poll(wgpu::PollType::wait_indefinitely())?;
        }
        if fence.done.await.is_none() {
            return Err(self
                .settled_lost_or(Error::Gpu {
                    context: "waiting for a step".into(),
                    msg: "the completion callback was dropped".into(),
                })
                .await);
        }
        self.check("Gpu::wait")
    }

    /// [`Gpu::lost_or`] after letting the browser deliver a device loss: a failed map or wait
    /// can settle before the `device.lost` promise does, by several tasks on a busy machine
    /// (seen with two other processes on the CPU). A map fails for little else, so waiting up
    /// to half a second for the loss costs nothing in the common case.
    async fn settled_lost_or(&self, e: Error) -> Error {
        #[cfg(target_arch = "wasm32")]
        {
            let start = js_sys::Date::now();
            while js_sys::Date::now() - start < 500.0 {
                if self
                    .lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some()
                {
                    break;
                }
                next_task().await;
            }
        }
        self.lost_or(e)
    }

    /// [`Error::DeviceLost`] when the device is gone, else `e`.
    fn lost_or(&self, e: Error) -> Error {
        match self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(why) => Error::DeviceLost(why),
            None => e,
        }
    }

    /// Queues a copy of the first `size` bytes of `src` into `dst` (e.g. a staging buffer to
    /// map later with [`Gpu::map_read`]).
    pub fn copy_buffer(&self, src: &wgpu::Buffer, dst: &wgpu::Buffer, size: u64) {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, dst, 0, size.next_multiple_of(4));
        self.submit([enc.finish()]);
    }

    /// Queues copies of byte regions between buffers: (src, src offset, dst, dst offset, bytes),
    /// in one submit (a sequence's recurrent states saved or restored).
    pub fn copy_regions(&self, regions: &[(&wgpu::Buffer, u64, &wgpu::Buffer, u64, u64)]) {
        let mut enc = self.device.create_command_encoder(&Default::default());
        for &(src, so, dst, d, size) in regions {
            enc.copy_buffer_to_buffer(src, so, dst, d, size);
        }
        self.submit([enc.finish()]);
    }

    /// Queues zeroing of byte regions (buffer, offset, bytes; multiples of 4), in one submit.
    pub fn clear_regions(&self, regions: &[(&wgpu::Buffer, u64, u64)]) {
        let mut enc = self.device.create_command_encoder(&Default::default());
        for &(buf, off, size) in regions {
            enc.clear_buffer(buf, off, Some(size));
        }
        self.submit([enc.finish()]);
    }

    /// Copies `size` bytes at `offset` of `src` back to the CPU (async).
    pub async fn read_buffer(&self, src: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.create_buffer(
            "readback",
            size,
            wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        );
        self.read_buffer_via(src, offset, size, &staging).await
    }

    /// Like [`Gpu::read_buffer`] through a staging buffer the caller keeps (for repeated reads,
    /// e.g. previews, without creating a buffer each time).
    pub async fn read_buffer_via(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        size: u64,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u8>> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, offset, staging, 0, size.next_multiple_of(4));
        self.submit([enc.finish()]);
        self.map_read(staging, size).await
    }

    /// Maps a MAP_READ buffer, copies out `size` bytes, unmaps.
    pub async fn map_read(&self, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        self.map_read_at(staging, size, None).await
    }

    /// [`Gpu::map_read`] of a buffer whose last writer is submission `index`: natively it
    /// polls only until that submission is done, so work submitted after it keeps running.
    pub async fn map_read_after(
        &self,
        staging: &wgpu::Buffer,
        size: u64,
        index: wgpu::SubmissionIndex,
    ) -> Result<Vec<u8>> {
        self.map_read_at(staging, size, Some(index)).await
    }

    async fn map_read_at(
        &self,
        staging: &wgpu::Buffer,
        size: u64,
        index: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        let (tx, rx) = crate::oneshot::channel();
        let slice = staging.slice(..size.next_multiple_of(4));
        slice.map_async(wgpu::MapMode::Read, move |r| tx.send(r));
        let poll = |kind| {
            self.device
                .poll(kind)
                .map_err(|e| self.lost_or(Error::Readback(e.to_string())))
        };
        if let Some(index) = index {
            poll(wgpu::PollType::Wait {
                submission_index: Some(index),
                timeout: None,
            })?;
        }
        // Without an index, or when the callback did not fire by then (threads sharing the
        // device, as in `Gpu::wait`): everything submitted so far.
        if !rx.is_ready() {
            poll(wgpu::PollType::wait_indefinitely())?;
        }
        let mapped = match rx.await {
            None => Err("map callback dropped".to_string()),
            Some(r) => r.map_err(|e| e.to_string()),
        };
        if let Err(e) = mapped {
            return Err(self.settled_lost_or(Error::Readback(e)).await);
        }
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Readback(e.to_string()))?;
            view[..size as usize].to_vec()
        };
        staging.unmap();
        Counters::add(&self.counters.bytes_read_back, size);
        Ok(out)
    }

    /// Waits for all submitted work (native; a no-op in the browser).
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                context: "poll".into(),
                msg: e.to_string(),
            })?;
        Ok(())
    }

    /// Returns the first error the API reported since the last check (native validation is
    /// synchronous, so a bad dispatch shows up right after its submit).
    pub fn check(&self, context: &str) -> Result<()> {
        if let Some(why) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::DeviceLost(why));
        }
        let mut errs = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        if errs.is_empty() {
            return Ok(());
        }
        let msg = errs.join("; ");
        errs.clear();
        Err(Error::Gpu {
            context: context.into(),
            msg,
        })
    }

    /// Counters so far.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }
}

/// Resolves on the browser's next task (`setTimeout(0)`), after pending promise callbacks.
#[cfg(target_arch = "wasm32")]
async fn next_task() {
    use wasm_bindgen::JsCast;
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let g = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&g, &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        match set_timeout {
            Some(f) => drop(f.call2(&g, &resolve, &0.into())),
            None => drop(resolve.call0(&g)),
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(p).await;
}

/// The limits to request: the kernels' minimums checked (an error naming the first the
/// adapter lacks), what the adapter offers where size matters (big weights, big workgroup
/// memory), the WebGPU defaults elsewhere.
fn required_limits(adapter: &wgpu::Adapter) -> Result<wgpu::Limits> {
    let have = adapter.limits();
    for (limit, need, got) in [
        (
            "maxComputeInvocationsPerWorkgroup",
            NEED_INVOCATIONS,
            have.max_compute_invocations_per_workgroup,
        ),
        (
            "maxComputeWorkgroupStorageSize",
            NEED_WG_STORAGE,
            have.max_compute_workgroup_storage_size,
        ),
        (
            "maxStorageBuffersPerShaderStage",
            NEED_STORAGE_BUFFERS,
            have.max_storage_buffers_per_shader_stage,
        ),
        (
            "maxComputeWorkgroupSizeX",
            NEED_INVOCATIONS,
            have.max_compute_workgroup_size_x,
        ),
    ] {
        if got < need {
            return Err(Error::MissingLimit {
                adapter: adapter.get_info().name,
                limit,
                need: need as u64,
                have: got as u64,
            });
        }
    }
    let mut req = wgpu::Limits::default().using_resolution(have.clone());
    req.max_storage_buffer_binding_size = have.max_storage_buffer_binding_size;
    req.max_buffer_size = have.max_buffer_size;
    req.max_compute_workgroup_storage_size = have.max_compute_workgroup_storage_size;
    req.max_storage_buffers_per_shader_stage = have.max_storage_buffers_per_shader_stage;
    req.max_compute_workgroups_per_dimension = have.max_compute_workgroups_per_dimension;
    req.max_uniform_buffer_binding_size = have.max_uniform_buffer_binding_size;
    Ok(req)
}

/// Validation errors and device loss, kept for the engine to report as errors (wgpu's default
/// handler panics).
#[allow(clippy::type_complexity)]
fn capture_errors(
    device: &wgpu::Device,
) -> (
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<std::sync::Mutex<Option<String>>>,
) {
    let uncaptured: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let sink = uncaptured.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        sink.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e.to_string());
    }));
    let lost: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let on_lost = lost.clone();
    device.set_device_lost_callback(move |reason, msg| {
        let why = match msg.is_empty() {
            true => format!("{reason:?}"),
            false => format!("{reason:?}: {msg}"),
        };
        *on_lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    });
    (uncaptured, lost)
}

/// Milliseconds from an arbitrary origin (`Date.now()` in the browser).
pub fn now_ms() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<std::time::Instant> = OnceLock::new();
        T0.get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1e3
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now()
    }
}

/// Whether `adapter` offers what the GEMM core's cooperative-matrix variant (gemm.wgsl's COOP)
/// needs: the feature with 16 x 16 x 16 f16 x f16 -> f32 products, shader-f16, subgroups of a
/// fixed 32 invocations (the shader's eight subgroups of a workgroup of 256) and 24 KiB of
/// workgroup memory (`req`, the limits to be requested). `KILN_COOP=0` says no.
fn coop_matrix_offered(adapter: &wgpu::Adapter, req: &wgpu::Limits) -> bool {
    let need = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP;
    let info = adapter.get_info();
    std::env::var("KILN_COOP").map_or(true, |v| v != "0")
        && adapter.features().contains(need)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && req.max_compute_workgroup_storage_size >= COOP_SHARED_BYTES
        && adapter.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
}

/// Workgroup memory of the cooperative-matrix GEMM: the double-buffered f16 tiles (16 KiB) and
/// a 16 x 16 f32 staging block per subgroup for the epilogue (8 KiB).
pub const COOP_SHARED_BYTES: u32 = 24 << 10;

/// wgpu's experimental features switched on, for the cooperative matrices.
#[allow(unsafe_code)]
fn experimental_features() -> wgpu::ExperimentalFeatures {
    // SAFETY: wgpu asks callers to accept that experimental features may be incomplete. Only
    // the cooperative-matrix feature is requested, only where the adapter reports the one
    // shape and types gemm.wgsl's COOP variant uses (coop_matrix_offered), and that variant
    // is tested against the CPU reference on such adapters (tests/tests/linear.rs), and
    // compiled and validated by naga everywhere.
    unsafe { wgpu::ExperimentalFeatures::enabled() }
}
