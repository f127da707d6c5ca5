//! Kernel families: each module turns an op into [`Dispatch`]es (pipeline key, uniform
//! parameters, bindings, workgroup counts). This module owns the pipeline cache and the
//! binding convention every shader follows:
//!
//! - `@binding(0)`: `var<uniform> p: Params` — the kernel's static parameters (u32/f32 fields);
//! - `@binding(1)`: `var<uniform> rs: RunScalars` — per-run scalars (positions, step index,
//!   seed) written once per `Plan::run`;
//! - `@binding(2..)`: storage buffers, in the order of [`Dispatch::bindings`].

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod scheduler;

use crate::device::{Counters, Gpu};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Workgroups per dimension the engine uses before folding into y (the WebGPU default limit).
pub const MAX_GROUPS_X: u32 = 65535;

/// Number of per-run scalar slots (`RunScalars` in `common.wgsl`).
pub const RUN_SCALARS: usize = 16;

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
    /// Uniform words (u32 or f32 bits), in the order of the shader's `Params` struct.
    pub params: Vec<u32>,
    pub bindings: Vec<Binding>,
    pub groups: [u32; 3],
}

/// Builds the uniform words of a `Params` struct.
#[derive(Default, Clone, Debug)]
pub struct Params(pub Vec<u32>);

impl Params {
    /// Appends a u32 field.
    pub fn u(mut self, v: impl TryInto<u32>) -> Self {
        self.0.push(v.try_into().unwrap_or(u32::MAX));
        self
    }
    /// Appends an f32 field.
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
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

/// Compiled pipelines and their layouts, created once per device.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<(KernelKey, Vec<bool>), Arc<wgpu::ComputePipeline>>>,
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
    pub(crate) fn bind_group_layout(&self, access: &[bool]) -> Arc<wgpu::BindGroupLayout> {
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
        let mut defines = key.defines.clone();
        if self.features.subgroups {
            defines.push(("HAS_SUBGROUPS".into(), String::new()));
        }
        let src = crate::shaders::dump(key.shader, &defines)?;
        let bgl = self.bind_group_layout(access);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key.shader),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
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
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = scope.pop().await {
            return Err(Error::Shader {
                name: format!("{} ({}, {:?})", key.shader, key.entry, key.defines),
                msg: e.to_string(),
            });
        }
        Counters::add(&self.counters.pipelines_created, 1);
        let p = Arc::new(pipeline);
        self.pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ck, p.clone());
        Ok(p)
    }
}

/// A value as a kernel sees it: shape, dtype and buffer(s) (several for a split weight).
#[derive(Clone, Debug)]
pub struct Bound {
    pub shape: Vec<usize>,
    pub dtype: crate::dtype::DType,
    pub parts: Vec<crate::tensor::TensorPart>,
}

impl Bound {
    /// A value held in one buffer.
    pub fn single(shape: &[usize], dtype: crate::dtype::DType, buffer: Arc<wgpu::Buffer>) -> Self {
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

/// What an op's encoder may use besides its inputs and output: the device, to create scratch
/// buffers (partial results, statistics). They are created once, at compile time.
pub struct Ctx<'a> {
    pub gpu: &'a Gpu,
}

impl Ctx<'_> {
    /// A storage buffer of `bytes` for intermediate results private to one op.
    pub fn scratch(&self, name: &str, bytes: u64) -> Arc<wgpu::Buffer> {
        Arc::new(self.gpu.create_buffer(name, bytes, crate::tensor::STORAGE))
    }
}
