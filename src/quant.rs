//! 4-bit NF4/FP4 quantization exactly as bitsandbytes does it: codebooks, blockwise absmax,
//! double quantization, packing, and the safetensors layout `*-bnb-4bit` checkpoints use.
//!
//! The golden tests in `tests/quant_golden.rs` compare every byte with fixtures bitsandbytes made.

pub mod blockwise;
pub mod bnb;
pub mod codebook;
pub mod double;
pub mod linear;
pub mod tensor;

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

pub use blockwise::{dequantize_4bit, quantize_4bit};
pub use double::NestedAbsmax;
pub use tensor::{Absmax, Quant4Tensor};

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Errors of the codec layer. Callers that know a tensor's name wrap these with it.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("element {index} is {value} (NaN and infinities cannot be quantized)")]
    NonFinite { index: usize, value: f32 },
    #[error("unsupported block size {0}: bitsandbytes accepts 32, 64, 128, 256, 512, 1024, 2048 or 4096")]
    UnsupportedBlockSize(usize),
    #[error("unsupported quantization type {0:?}: expected nf4 or fp4")]
    UnsupportedQuantType(String),
    #[error("unsupported dtype {0}: 4-bit quantization reads and writes f32, f16 or bf16")]
    UnsupportedDType(String),
    #[error("invalid quant state: {0}")]
    InvalidState(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    Nf4,
    Fp4,
}

impl QuantType {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(QuantError::UnsupportedQuantType(other.to_string())),
        }
    }
}

/// How to quantize a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    pub quant_type: QuantType,
    /// Elements per absmax block (bitsandbytes' `blocksize`).
    pub block_size: usize,
    /// Quantize absmax itself to 8 bits (bitsandbytes' `compress_statistics`, QLoRA's "double quantization").
    pub double_quant: bool,
}

impl Default for QuantConfig {
    /// QLoRA's recipe: NF4, blocks of 64, double quantization.
    fn default() -> Self {
        QuantConfig {
            quant_type: QuantType::Nf4,
            block_size: 64,
            double_quant: true,
        }
    }
}

impl QuantConfig {
    pub fn validate(&self) -> Result<()> {
        check_block_size(self.block_size)
    }
}

pub(crate) fn check_block_size(block_size: usize) -> Result<()> {
    if BLOCK_SIZES.contains(&block_size) {
        Ok(())
    } else {
        Err(QuantError::UnsupportedBlockSize(block_size))
    }
}

/// The float types a weight may come in or be dequantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatDType {
    F32,
    F16,
    BF16,
}

impl FloatDType {
    /// The name torch and bitsandbytes use (`quant_state.dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDType::F32 => "float32",
            FloatDType::F16 => "float16",
            FloatDType::BF16 => "bfloat16",
        }
    }

    pub fn from_torch_name(name: &str) -> Result<Self> {
        match name {
            "float32" => Ok(FloatDType::F32),
            "float16" => Ok(FloatDType::F16),
            "bfloat16" => Ok(FloatDType::BF16),
            other => Err(QuantError::UnsupportedDType(other.to_string())),
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            FloatDType::F32 => 4,
            FloatDType::F16 | FloatDType::BF16 => 2,
        }
    }

    pub fn to_candle(self) -> candle_core::DType {
        match self {
            FloatDType::F32 => candle_core::DType::F32,
            FloatDType::F16 => candle_core::DType::F16,
            FloatDType::BF16 => candle_core::DType::BF16,
        }
    }

    pub fn from_candle(dtype: candle_core::DType) -> Result<Self> {
        match dtype {
            candle_core::DType::F32 => Ok(FloatDType::F32),
            candle_core::DType::F16 => Ok(FloatDType::F16),
            candle_core::DType::BF16 => Ok(FloatDType::BF16),
            other => Err(QuantError::UnsupportedDType(format!("{other:?}"))),
        }
    }
}

/// A borrowed run of floats in one of the supported types.
#[derive(Debug, Clone, Copy)]
pub enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl FloatSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(s) => s.len(),
            FloatSlice::F16(s) => s.len(),
            FloatSlice::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> FloatDType {
        match self {
            FloatSlice::F32(_) => FloatDType::F32,
            FloatSlice::F16(_) => FloatDType::F16,
            FloatSlice::BF16(_) => FloatDType::BF16,
        }
    }

    /// Widen `[start, start + out.len())` to f32.
    #[inline]
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            FloatSlice::F32(s) => out.copy_from_slice(&s[start..end]),
            FloatSlice::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..end]) {
                    *o = v.to_f32();
                }
            }
            FloatSlice::BF16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..end]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
        }
    }
}

/// An output element of dequantization; conversions round to nearest even, as bitsandbytes.
pub trait OutFloat: Copy + Default + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;

    /// Decode one block: `decode[code] * scale`, rounded to `Self`.
    #[inline]
    fn dequantize_block(out: &mut [Self], packed: &[u8], decode: &[f32; 16], scale: f32) {
        let table: [Self; 16] = std::array::from_fn(|i| Self::from_f32(decode[i] * scale));
        blockwise::lookup(out, packed, &table);
    }
}

impl OutFloat for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// 16-bit outputs share one byte-shuffle kernel over their bit patterns.
macro_rules! half_out_float {
    ($t:ty) => {
        impl OutFloat for $t {
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }

            #[inline]
            fn dequantize_block(out: &mut [Self], packed: &[u8], decode: &[f32; 16], scale: f32) {
                let mut bits = [0u16; 16];
                for (b, d) in bits.iter_mut().zip(decode) {
                    *b = <$t>::from_f32(d * scale).to_bits();
                }
                blockwise::lookup16(bytemuck::cast_slice_mut(out), packed, &bits);
            }
        }
    };
}

half_out_float!(f16);
half_out_float!(bf16);
