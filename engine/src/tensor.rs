//! GPU tensors: a shape, a dtype and one or more buffers. A weight larger than the
//! storage-binding limit is split by rows (its first dimension) into parts, each its own
//! buffer; the matvec, matmul and gather kernels dispatch once per part.

use crate::device::Gpu;
use crate::dtype::{pack_for_gpu, DType};
use crate::error::{Error, Result};
use std::sync::Arc;

/// A contiguous run of rows stored in one buffer.
#[derive(Clone, Debug)]
pub struct TensorPart {
    pub buffer: Arc<wgpu::Buffer>,
    pub row_start: usize,
    pub rows: usize,
}

/// A tensor on the GPU, packed as described in [`crate::dtype`].
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub parts: Vec<TensorPart>,
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Storage usages of every engine buffer.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl Tensor {
    /// Rows: the first dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        numel(&self.shape) / self.rows().max(1)
    }

    /// Uploads `bytes` in file layout (GGUF blocks, little-endian f32/f16/bf16), packing and
    /// splitting as needed. The byte count is checked against shape and dtype before anything
    /// is allocated.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Tensor> {
        Self::upload_with(gpu, name, shape, dtype, bytes, false, false)
    }

    /// Like [`Tensor::upload`] for weights: a NaN or infinity (in block formats, in a scale)
    /// is an [`Error::NonFinite`] naming the row, found while each row is packed (no second
    /// pass over the bytes).
    pub fn upload_weight(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Tensor> {
        Self::upload_with(gpu, name, shape, dtype, bytes, true, false)
    }

    /// Like [`Tensor::upload_weight`] for a mixture-of-experts layer's expert matrices
    /// `[experts, n, k]`: each expert packed as `n` rows of `k` (as a matrix `[n, k]` is), the
    /// parts split between whole experts, so that an expert-indexed product
    /// (`kernels::moe::MoeLinear`) finds expert `e`'s row `r` at word `(e - first) n row_words
    /// + r row_words` of the part holding it.
    pub fn upload_experts(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Tensor> {
        if shape.len() != 3 {
            return Err(Error::Data {
                name: name.into(),
                msg: format!("expert matrices {shape:?}: expected [experts, n, k]"),
            });
        }
        Self::upload_with(gpu, name, shape, dtype, bytes, true, true)
    }

    /// `matrices`: each row (first index) is packed as matrix rows of the last dimension.
    fn upload_with(
        gpu: &Gpu,
        name: &str,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
        check_finite: bool,
        matrices: bool,
    ) -> Result<Tensor> {
        let rows = shape.first().copied().unwrap_or(1);
        let row_len = if rows == 0 { 0 } else { numel(shape) / rows };
        // Each row is `sub` packed rows of `k`.
        let (sub, k) = match shape.last() {
            Some(&k) if matrices && k > 0 => (row_len / k, k),
            _ => (1, row_len),
        };
        let bad = |msg: String| Error::Data {
            name: name.into(),
            msg,
        };
        if dtype.is_quantized() && k % dtype.block_elems() != 0 {
            return Err(bad(format!(
                "row length {k} of a {dtype} tensor is not a multiple of {}",
                dtype.block_elems()
            )));
        }
        let need = dtype
            .file_bytes(numel(shape))
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() != need {
            return Err(bad(format!(
                "shape {shape:?} as {dtype} needs {need} bytes, found {}",
                bytes.len()
            )));
        }
        let row_bytes = (sub * dtype.row_words(k) * 4) as u64;
        if row_bytes > gpu.binding_limit {
            return Err(bad(format!(
                "one row ({row_bytes} bytes) exceeds the binding limit {}",
                gpu.binding_limit
            )));
        }
        let rows_per_part = if row_bytes == 0 {
            rows.max(1)
        } else {
            (gpu.binding_limit / row_bytes) as usize
        };
        let file_row = if rows == 0 { 0 } else { need / rows };
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows.max(1) {
            let n = rows_per_part.min(rows.max(1) - start);
            let n_rows = if rows == 0 { 0 } else { n };
            let words = pack_for_gpu(
                dtype,
                &bytes[start * file_row..(start + n_rows) * file_row],
                n_rows * sub,
                k,
                check_finite,
            )
            .map_err(|e| match e {
                Error::NonFinite { row, .. } => Error::NonFinite {
                    what: format!("'{name}'"),
                    row: start * sub + row,
                },
                e => e,
            })?;
            let buf = gpu.create_buffer(name, (words.len() * 4) as u64, STORAGE);
            gpu.write_buffer(&buf, 0, bytemuck::cast_slice(&words));
            parts.push(TensorPart {
                buffer: Arc::new(buf),
                row_start: start,
                rows: n_rows,
            });
            start += n;
        }
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            parts,
        })
    }

    /// Uploads f32 values.
    pub fn from_f32(gpu: &Gpu, name: &str, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Self::upload(gpu, name, shape, DType::F32, bytemuck::cast_slice(data))
    }

    /// Uploads u32 values (token ids).
    pub fn from_u32(gpu: &Gpu, name: &str, shape: &[usize], data: &[u32]) -> Result<Tensor> {
        Self::upload(gpu, name, shape, DType::U32, bytemuck::cast_slice(data))
    }

    /// A zero-filled f32/u32 tensor in one buffer (state such as a KV cache).
    pub fn zeros(gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = match dtype {
            DType::F32 | DType::U32 => numel(shape) as u64 * 4,
            // Two to a word in order (an f16 KV cache): rows of even length, so that this is
            // also the layout `upload` gives them.
            DType::F16 if shape.last().is_some_and(|d| d % 2 == 0) => numel(shape) as u64 * 2,
            _ => {
                return Err(Error::DType {
                    op: "Tensor::zeros".into(),
                    expected: "f32, u32 or f16 (rows of even length)".into(),
                    found: dtype.to_string(),
                })
            }
        };
        gpu.fits(name, bytes)?;
        let buf = gpu.create_buffer(name, bytes, STORAGE);
        Ok(Tensor {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            parts: vec![TensorPart {
                buffer: Arc::new(buf),
                row_start: 0,
                rows: shape.first().copied().unwrap_or(1),
            }],
        })
    }

    /// The single buffer of an unsplit tensor.
    pub fn buffer(&self) -> Result<&Arc<wgpu::Buffer>> {
        match self.parts.as_slice() {
            [p] => Ok(&p.buffer),
            _ => Err(Error::Data {
                name: self.name.clone(),
                msg: format!(
                    "expected one buffer, tensor is split in {}",
                    self.parts.len()
                ),
            }),
        }
    }

    /// Reads an f32 (or f16) tensor back (async).
    pub async fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let n = numel(&self.shape);
        match self.dtype {
            DType::F32 => {
                let bytes = gpu.read_buffer(self.buffer()?, 0, n as u64 * 4).await?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
            // Two to a word in order (rows of even length: an f16 KV cache from `zeros`).
            DType::F16 => {
                let bytes = gpu
                    .read_buffer(self.buffer()?, 0, n.div_ceil(2) as u64 * 4)
                    .await?;
                Ok(bytes[..2 * n]
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect())
            }
            other => Err(Error::DType {
                op: "to_f32".into(),
                expected: "f32 or f16".into(),
                found: other.to_string(),
            }),
        }
    }

    /// Reads a u32 tensor back (async).
    pub async fn to_u32(&self, gpu: &Gpu) -> Result<Vec<u32>> {
        let bytes = gpu
            .read_buffer(self.buffer()?, 0, numel(&self.shape) as u64 * 4)
            .await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
