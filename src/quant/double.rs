//! Double quantization: absmax values stored as 8-bit codes of the signed dynamic map, in blocks
//! of 256, around their mean (QLoRA §3; bitsandbytes' `compress_statistics`).

use rayon::prelude::*;

use super::codebook::{dynamic_signed, ByteLut};
use super::{QuantError, Result};

/// bitsandbytes always double-quantizes absmax in blocks of 256.
pub const NESTED_BLOCK_SIZE: usize = 256;

/// The 8-bit absmax of a 4-bit weight.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One dynamic-map code per 4-bit block (`weight.absmax`, u8).
    pub codes: Vec<u8>,
    /// One f32 scale per nested block (`weight.nested_absmax`).
    pub scales: Vec<f32>,
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// Codes per nested block (`nested_blocksize`).
    pub block_size: usize,
    /// The 8-bit code (`weight.nested_quant_map`).
    pub code: Box<[f32; 256]>,
}

impl NestedAbsmax {
    /// Compress f32 absmax values as bitsandbytes' `quantize_4bit(compress_statistics=True)`.
    pub fn compress(absmax: &[f32]) -> Self {
        let offset = torch_mean_f32(absmax);
        let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let code = Box::new(dynamic_signed());
        let (codes, scales) = quantize_8bit(&centered, &code, NESTED_BLOCK_SIZE);
        NestedAbsmax {
            codes,
            scales,
            offset,
            block_size: NESTED_BLOCK_SIZE,
            code,
        }
    }

    /// The f32 absmax the 4-bit dequantization uses: `code[q] * scale + offset`, rounded twice
    /// as bitsandbytes' `dequantize_blockwise(...) + offset` does.
    pub fn expand(&self) -> Result<Vec<f32>> {
        if self.block_size == 0 || self.scales.len() != self.codes.len().div_ceil(self.block_size) {
            return Err(QuantError::InvalidState(format!(
                "{} nested absmax values for {} codes in blocks of {}",
                self.scales.len(),
                self.codes.len(),
                self.block_size
            )));
        }
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(self.block_size)
            .zip(self.codes.par_chunks(self.block_size))
            .zip(self.scales.par_iter())
            .for_each(|((out, codes), &scale)| {
                for (o, &q) in out.iter_mut().zip(codes) {
                    *o = self.code[q as usize] * scale + self.offset;
                }
            });
        Ok(out)
    }
}

/// Blockwise 8-bit quantization as bitsandbytes' CPU `quantize_blockwise` (C++ kernel): the
/// block's absmax, a reciprocal, and a 65,536-bin lookup into `code`.
pub fn quantize_8bit(values: &[f32], code: &[f32; 256], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = ByteLut::new(code);
    let mut out = vec![0u8; values.len()];
    let mut absmax = vec![0f32; values.len().div_ceil(block_size)];
    out.par_chunks_mut(block_size)
        .zip(values.par_chunks(block_size))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, x), am)| {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            if m == 0.0 {
                return; // out is already zero
            }
            let inv = 1.0 / m;
            for (o, &v) in out.iter_mut().zip(x) {
                *o = lut.code_index(v * inv);
            }
        });
    (out, absmax)
}

/// `torch.Tensor.mean()` of a contiguous 1-D f32 CPU tensor, reproduced to the bit for inputs
/// below torch's parallel grain (32,768 values; beyond it torch splits the sum by thread, and its
/// own result depends on the thread count). torch sums with 8-lane AVX2 vectors, four
/// interleaved accumulators and a cascade of partial sums, then divides by n.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return f32::NAN;
    }
    torch_sum_f32(x) / x.len() as f32
}

const LANES: usize = 8;
type Lanes = [f32; LANES];

fn torch_sum_f32(x: &[f32]) -> f32 {
    if x.len() < LANES {
        return row_sum(x.len(), 0.0, |i| x[i], |a, b| a + b);
    }
    let vecs = x.len() / LANES;
    let load = |i: usize| -> Lanes { std::array::from_fn(|l| x[i * LANES + l]) };
    let add = |a: Lanes, b: Lanes| -> Lanes { std::array::from_fn(|l| a[l] + b[l]) };
    let acc = row_sum(vecs, [0.0; LANES], load, add);
    let mut total = 0f32;
    for &v in &x[vecs * LANES..] {
        total += v;
    }
    for v in acc {
        total += v;
    }
    total
}

/// ATen's `row_sum`: four interleaved accumulators over `multi_row_sum`, leftovers into the first.
fn row_sum<T: Copy>(n: usize, zero: T, load: impl Fn(usize) -> T, add: impl Fn(T, T) -> T) -> T {
    const ILP: usize = 4;
    let rows = n / ILP;
    let mut partial = multi_row_sum::<T, ILP>(rows, zero, |i, k| load(i * ILP + k), &add);
    for i in rows * ILP..n {
        partial[0] = add(partial[0], load(i));
    }
    let mut sum = partial[0];
    for p in &partial[1..] {
        sum = add(sum, *p);
    }
    sum
}

/// ATen's `multi_row_sum`: a cascade of four levels of accumulators, so only sums of similar
/// magnitude meet.
fn multi_row_sum<T: Copy, const N: usize>(
    size: usize,
    zero: T,
    load: impl Fn(usize, usize) -> T,
    add: impl Fn(T, T) -> T,
) -> [T; N] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        usize::BITS - (size - 1).leading_zeros()
    } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; N]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = add(*a, load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (a, b) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *a = add(*a, *b);
                *b = zero;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = add(*a, load(i, k));
        }
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest {
        for (a, b) in first[0].iter_mut().zip(level.iter()) {
            *a = add(*a, *b);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_is_close_to_the_exact_mean() {
        for n in [1usize, 5, 8, 31, 100, 1000, 5000, 70000] {
            let x: Vec<f32> = (0..n).map(|i| 0.01 + (i % 97) as f32 * 1e-3).collect();
            let exact = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let m = torch_mean_f32(&x) as f64;
            assert!(
                (m - exact).abs() <= 4.0 * f32::EPSILON as f64 * exact,
                "n={n}: {m} vs {exact}"
            );
        }
    }

    #[test]
    fn compress_then_expand_is_close() {
        let absmax: Vec<f32> = (0..700).map(|i| 0.5 + (i % 13) as f32 * 0.01).collect();
        let nested = NestedAbsmax::compress(&absmax);
        assert_eq!(nested.codes.len(), 700);
        assert_eq!(nested.scales.len(), 3);
        for (a, b) in absmax.iter().zip(nested.expand().unwrap()) {
            assert!((a - b).abs() < 0.01 * a, "{a} vs {b}");
        }
    }

    #[test]
    fn all_zero_block_keeps_zero_codes_and_zero_scale() {
        let (codes, scales) = quantize_8bit(&[0.0; 300], &dynamic_signed(), 256);
        assert!(codes.iter().all(|&c| c == 0));
        assert_eq!(scales, vec![0.0, 0.0]);
    }
}
