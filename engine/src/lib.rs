//! Kiln: a GPU compute-shader engine for generative models on wgpu and WGSL.
//!
//! Data flow: file bytes → [`Tensor`]s (packed per [`dtype`]) → a [`Graph`] built by model
//! code → [`Graph::compile`] → a [`Plan`] replayed with one compute pass and one submit per
//! run. Every kernel has a CPU reference in [`reference`] that the tests compare against.

pub mod device;
pub mod diffusion;
pub mod dtype;
pub mod embed;
pub mod error;
pub mod formats;
pub mod graph;
pub mod kernels;
pub mod llm;
mod oneshot;
pub mod reference;
pub mod shaders;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use device::{CounterSnapshot, Gpu, GpuFeatures, GpuOptions};
pub use dtype::DType;
pub use error::{Error, Result};
pub use graph::{CompileOptions, Dyn, Graph, Plan, Scalar, Value};
pub use tensor::Tensor;
