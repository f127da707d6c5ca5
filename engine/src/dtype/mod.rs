//! Element types: `DType`, its block geometry in files and on the GPU, and by part:
//! - [`blocks`]: GGUF's block layouts read back to f32 (the CPU reference of every format);
//! - [`quantize`]: ggml's reference quantizers (the quantize-on-load path);
//! - [`pack`]: the GPU packing spec, file layout to the words the shaders read.

mod blocks;
mod pack;
mod quantize;

pub use blocks::{dequantize, IQ4_VALUES};
pub use pack::{encode_plain, pack_for_gpu};
pub use quantize::quantize;

use crate::error::{Error, Result};

/// Element type of a tensor (GGUF's names for the block formats).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

impl DType {
    /// All weight dtypes the matvec/matmul/gather kernels accept.
    pub const WEIGHTS: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_NL,
        DType::IQ4_XS,
    ];

    /// Elements per block (1 for plain types).
    pub fn block_elems(self) -> usize {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
                32
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                256
            }
            _ => 1,
        }
    }

    /// Bytes of one block in the file (GGUF / safetensors) layout.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_NL => 18,
            DType::IQ4_XS => 136,
        }
    }

    /// Words of one block on the GPU (quantized types only).
    pub fn gpu_block_words(self) -> usize {
        match self {
            DType::Q8_0 => 9,
            DType::Q4_0 | DType::IQ4_NL => 5,
            DType::Q4_1 | DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q2_K => 21,
            DType::Q3_K => 29,
            DType::Q4_K => 36,
            DType::Q5_K => 44,
            DType::Q6_K => 56,
            DType::IQ4_XS => 34,
            _ => 0,
        }
    }

    /// Byte offsets of the f16 scale fields (`d`, and the min where there is one) in one file
    /// block; empty for plain types.
    pub fn scale_offsets(self) -> &'static [usize] {
        match self {
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
            DType::Q2_K => &[80, 82],
            DType::Q3_K => &[108],
            DType::Q6_K => &[208],
            DType::F32 | DType::F16 | DType::BF16 | DType::U32 => &[],
        }
    }

    /// Is this a block-quantized type?
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Name used in shader variants and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q2_K => "q2_k",
            DType::Q3_K => "q3_k",
            DType::Q4_K => "q4_k",
            DType::Q5_K => "q5_k",
            DType::Q6_K => "q6_k",
            DType::IQ4_NL => "iq4_nl",
            DType::IQ4_XS => "iq4_xs",
        }
    }

    /// GPU words for one row of `k` elements.
    pub fn row_words(self, k: usize) -> usize {
        match self {
            DType::F32 | DType::U32 => k,
            DType::F16 | DType::BF16 => k.div_ceil(2),
            // Rows padded to whole 16-byte units, so that the software matvec reads them with
            // 16-byte loads (matvec.wgsl, ROWS_V4); at most 3 words a row.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 => {
                (k / 32 * self.gpu_block_words()).next_multiple_of(4)
            }
            q => k / q.block_elems() * q.gpu_block_words(),
        }
    }

    /// File bytes for `n` elements; errors when `n` is not a whole number of blocks.
    pub fn file_bytes(self, n: usize) -> Result<usize> {
        let b = self.block_elems();
        if !n.is_multiple_of(b) {
            return Err(Error::Data {
                name: self.name().into(),
                msg: format!("{n} elements is not a multiple of the block size {b}"),
            });
        }
        Ok(n / b * self.block_bytes())
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
