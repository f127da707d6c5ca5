//! The engine's error type. Every message says what was expected and what was found.

use thiserror::Error;

/// Errors returned by the engine.
#[derive(Debug, Error)]
pub enum Error {
    /// No adapter matched the request (or none exists).
    #[error("no GPU adapter found{0}. On Linux without a GPU install the software Vulkan driver: `sudo apt-get install mesa-vulkan-drivers`")]
    NoAdapter(String),
    /// The adapter offers less than the engine needs.
    #[error("adapter '{adapter}' offers {limit} = {have}, the engine needs at least {need}")]
    MissingLimit {
        adapter: String,
        limit: &'static str,
        need: u64,
        have: u64,
    },
    /// Device creation failed.
    #[error("could not create a device on '{adapter}': {msg}")]
    RequestDevice { adapter: String, msg: String },
    /// A WGSL shader failed to preprocess or compile.
    #[error("shader '{name}': {msg}")]
    Shader { name: String, msg: String },
    /// A validation or out-of-memory error reported by the GPU API.
    #[error("GPU error in {context}: {msg}")]
    Gpu { context: String, msg: String },
    /// Shapes that do not fit an operation.
    #[error("shape error in {op}: {msg}")]
    Shape { op: String, msg: String },
    /// A dtype that an operation does not accept.
    #[error("dtype error in {op}: expected {expected}, found {found}")]
    DType {
        op: String,
        expected: String,
        found: String,
    },
    /// Raw data that does not match the declared shape and dtype.
    #[error("data error for '{name}': {msg}")]
    Data { name: String, msg: String },
    /// Mapping a buffer for readback failed.
    #[error("readback failed: {0}")]
    Readback(String),
    /// A configuration value that is not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor whose values include NaN or infinity (found while it was uploaded): a damaged
    /// checkpoint, or a conversion that overflowed.
    #[error("{what} holds NaN or infinity (row {row}): the file is damaged or its values overflowed when it was converted")]
    NonFinite { what: String, row: usize },
    /// Values that became NaN or infinite while running (finite weights, overflowing
    /// activations): the generation stops with this instead of producing garbage.
    #[error("{what} became NaN or infinite {when}")]
    Overflow { what: String, when: String },
    /// A buffer larger than the adapter can bind (e.g. the activations of a very large image).
    #[error("'{what}' needs {bytes} bytes, more than this adapter binds in one buffer ({limit} bytes): use a smaller size")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    /// The GPU device is gone (destroyed, a driver reset, the browser's GPU process lost):
    /// nothing more runs on it; make a new `Gpu` (or `Kiln`) to go on.
    #[error("the GPU device was lost ({0}); create a new one to go on")]
    DeviceLost(String),
    /// The caller stopped the work (e.g. the step callback of the denoising loop).
    #[error("cancelled")]
    Cancelled,
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &str, msg: impl Into<String>) -> Error {
    Error::Shape {
        op: op.to_string(),
        msg: msg.into(),
    }
}
