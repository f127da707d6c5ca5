//! Pipelines and the binding convention every shader follows:
//!
//! - `@binding(0)`: `var<uniform> p: Params`, the kernel's static parameters (a `#[repr(C)]`
//!   struct of u32/f32 fields on the Rust side, see [`crate::kernels::ShaderParams`]);
//! - `@binding(1)`: `var<uniform> rs: RunScalars`, per-run scalars (positions, step index,
//!   seed) written once per `Plan::run`;
//! - `@binding(2..)`: storage buffers, in the order of [`Dispatch::bindings`].
//!
//! A [`Dispatch`] is the unit the kernels hand to the graph executor: a pipeline key, the
//! uniform words, the storage bindings and the workgroup counts.

use super::{Counters, Gpu};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Workgroups per dimension the engine uses before folding into y (the WebGPU default limit).
pub const MAX_GROUPS_X: u32 = 65535;

/// Identifies a pipeline: shader file, entry point, preprocessor defines.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
}

impl KernelKey {
    /// A key with no defines.
    pub fn new(shader: &'static str, entry: &'static str) -> Self {
        KernelKey {
            shader,
            entry,
            defines: Vec::new(),
        }
    }
    /// Adds a define (`#define name value`).
    pub fn def(mut self, name: &str, value: impl ToString) -> Self {
        self.defines.push((name.to_string(), value.to_string()));
        self
    }
}

/// A storage binding: a buffer and whether the kernel writes it.
#[derive(Clone, Debug)]
pub struct Binding {
    pub buffer: Arc<wgpu::Buffer>,
    pub writable: bool,
}

impl Binding {
    /// A read-only binding.
    pub fn read(buffer: &Arc<wgpu::Buffer>) -> Self {
        Binding {
            buffer: buffer.clone(),
            writable: false,
        }
    }
    /// A read-write binding.
    pub fn write(buffer: &Arc<wgpu::Buffer>) -> Self {
        Binding {
            buffer: buffer.clone(),
            writable: true,
        }
    }
}

/// One compute dispatch, fully described.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub key: KernelKey,
    /// Uniform words: the bytes of the shader's `Params` struct.
    pub params: Vec<u32>,
    pub bindings: Vec<Binding>,
    pub groups: [u32; 3],
    /// Workgroup counts read on the GPU from this buffer at this byte offset (three u32s an
    /// earlier dispatch of the run wrote) instead of `groups`: passes whose work a run decides
    /// (the sampler's selection passes, zero groups when greedy).
    pub indirect: Option<(Arc<wgpu::Buffer>, u64)>,
}

/// Spreads `n` workgroups over x and y so no dimension exceeds the limit. Shaders rebuild the
/// linear index with `wg.x + wg.y * nwg.x` and skip indices past the end.
pub fn grid(n: u32) -> [u32; 3] {
    if n <= MAX_GROUPS_X {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(MAX_GROUPS_X);
        [n.div_ceil(y), y, 1]
    }
}

/// A pipeline is compiled per kernel key and storage access pattern.
type PipelineMap = HashMap<(KernelKey, Vec<bool>), Arc<wgpu::ComputePipeline>>;

/// Compiled pipelines and their layouts, created once per device.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<PipelineMap>,
    layouts: Mutex<HashMap<Vec<bool>, Arc<wgpu::BindGroupLayout>>>,
}

fn layout_entry(binding: u32, ty: wgpu::BindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty,
        count: None,
    }
}

impl Gpu {
    /// The bind group layout for a given storage access pattern (true = writable).
    pub fn bind_group_layout(&self, access: &[bool]) -> Arc<wgpu::BindGroupLayout> {
        let mut layouts = self
            .pipelines
            .layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        layouts
            .entry(access.to_vec())
            .or_insert_with(|| {
                let uniform = wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                };
                let mut entries = vec![layout_entry(0, uniform), layout_entry(1, uniform)];
                for (i, w) in access.iter().enumerate() {
                    entries.push(layout_entry(
                        2 + i as u32,
                        wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only: !w },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                    ));
                }
                Arc::new(
                    self.device
                        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                            label: Some("kiln"),
                            entries: &entries,
                        }),
                )
            })
            .clone()
    }

    /// Returns the pipeline for a dispatch, compiling it on first use. A WGSL error is an
    /// [`Error::Shader`] carrying the compiler's message.
    pub async fn pipeline(
        &self,
        key: &KernelKey,
        access: &[bool],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let ck = (key.clone(), access.to_vec());
        if let Some(p) = self
            .pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ck)
        {
            return Ok(p.clone());
        }
        let pipeline = match self.build(key, access).await {
            // The experimental cooperative matrices: where the driver refuses them, the same
            // kernel with f16 tiles (same bindings and grid) serves instead, once said.
            Err(e) if key.defines.iter().any(|(d, _)| d == "COOP") => {
                eprintln!("kiln: cooperative-matrix GEMM refused, using f16 tiles: {e}");
                let mut plain = key.clone();
                plain.defines.retain(|(d, _)| d != "COOP");
                self.build(&plain, access).await?
            }
            r => r?,
        };
        Counters::add(&self.counters.pipelines_created, 1);
        let p = Arc::new(pipeline);
        self.pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ck, p.clone());
        Ok(p)
    }

    /// Compiles the pipeline of `key`; a WGSL or validation error is an [`Error::Shader`].
    async fn build(&self, key: &KernelKey, access: &[bool]) -> Result<wgpu::ComputePipeline> {
        let src = crate::shaders::kernel_source(key.shader, &key.defines, self.features.subgroups)?;
        let bgl = self.bind_group_layout(access);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.shader_module(key.shader, src);
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(key.shader),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    // Every kernel writes its workgroup memory before reading it (each
                    // `var<workgroup>` is filled by the invocations that read it, behind a
                    // barrier), so the zeroing prologue wgpu adds by default is dead work.
                    // The browser's implementation zeroes on its own terms.
                    zero_initialize_workgroup_memory: false,
                    ..Default::default()
                },
                cache: None,
            });
        if let Some(e) = scope.pop().await {
            return Err(Error::Shader {
                name: format!("{} ({}, {:?})", key.shader, key.entry, key.defines),
                msg: e.to_string(),
            });
        }
        Ok(pipeline)
    }

    /// The run-time checks wgpu leaves out of a module on this backend, `None` for all kept.
    /// Where the backend bounds every buffer access itself (Vulkan, whose robustBufferAccess
    /// is a core feature wgpu enables on every device, and D3D12, whose descriptors bound
    /// reads and writes), neither naga's index clamps nor its loop-bound counter (wgpu issue
    /// 7698: up to 100x on loop-heavy shaders); Metal keeps the clamps (its buffers are
    /// unbounded) and drops only the counter; GL and the browser keep everything (the
    /// browser's Dawn guards what it is given itself). Integer division keeps its guard
    /// everywhere (WGSL defines x / 0).
    pub fn dropped_checks(&self) -> Option<&'static str> {
        match self.info.backend {
            wgpu::Backend::Vulkan | wgpu::Backend::Dx12 => Some("bounds, loop-bound"),
            wgpu::Backend::Metal => Some("loop-bound"),
            _ => None,
        }
    }

    /// Builds a WGSL module without the checks [`Gpu::dropped_checks`] names.
    #[allow(unsafe_code)]
    fn shader_module(&self, label: &str, src: String) -> wgpu::ShaderModule {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let Some(dropped) = self.dropped_checks() else {
            return self.device.create_shader_module(desc);
        };
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = false;
        checks.bounds_checks = !dropped.contains("bounds");
        // SAFETY: wgpu's contract for dropping a check is that the shader does not need it.
        // Bounds: on Vulkan (robustBufferAccess) and D3D12 an out-of-range index reads zero or
        // an in-range value and writes nothing out of range, which is all the kernels rely on
        // (matvec.wgsl's padded last block group). Loops: every kernel loop runs to a bound
        // computed from its uniforms, so none is infinite, the undefined behaviour the counter
        // guards against.
        unsafe { self.device.create_shader_module_trusted(desc, checks) }
    }
}
