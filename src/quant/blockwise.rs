//! Blockwise 4-bit quantization and dequantization on the CPU, parallel over blocks.
//!
//! Mirrors bitsandbytes 0.50's CPU path bit for bit: `quantize_4bit` (its torch reference
//! kernel) scales full blocks by `x * (1 / max(absmax, 1e-38))` but the ragged last block by
//! `x / max(absmax, 1e-38)`, stores the clamped absmax only for that last block, pads an odd
//! element count with a quantized 0.0, and packs element 2j into the high nibble.

use rayon::prelude::*;

use super::codebook::Bucketizer;
use super::{check_block_size, FloatSlice, OutFloat, QuantError, QuantType, Result};

/// torch's `clamp(min=1e-38)` on an f32 absmax.
const MIN_ABSMAX: f32 = 1e-38;

/// Elements per parallel task: big enough to amortize scheduling, small enough to balance.
const ELEMS_PER_TASK: usize = 1 << 16;

fn blocks_per_task(block_size: usize) -> usize {
    (ELEMS_PER_TASK / block_size).max(1)
}

/// Number of absmax blocks for `n` elements.
pub fn num_blocks(n: usize, block_size: usize) -> usize {
    n.div_ceil(block_size)
}

/// Quantize `input` to packed 4-bit codes (`ceil(n / 2)` bytes) and one f32 absmax per block.
pub fn quantize_4bit(
    input: FloatSlice<'_>,
    quant_type: QuantType,
    block_size: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_block_size(block_size)?;
    let n = input.len();
    let blocks = num_blocks(n, block_size);
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; blocks];
    let bucketizer = Bucketizer::new(quant_type);
    let per_task = blocks_per_task(block_size);
    let half_block = block_size / 2;

    packed
        .par_chunks_mut(per_task * half_block)
        .zip(absmax.par_chunks_mut(per_task))
        .enumerate()
        .try_for_each(|(task, (packed, absmax))| {
            let mut buf = vec![0f32; block_size];
            for (i, (out, am)) in packed
                .chunks_mut(half_block)
                .zip(absmax.iter_mut())
                .enumerate()
            {
                let start = (task * per_task + i) * block_size;
                let len = block_size.min(n - start);
                let x = &mut buf[..len];
                input.read_f32(start, x);
                *am = quantize_block(x, len < block_size, &bucketizer, out).map_err(|j| {
                    QuantError::NonFinite {
                        index: start + j,
                        value: x[j],
                    }
                })?;
            }
            Ok::<(), QuantError>(())
        })?;
    Ok((packed, absmax))
}

/// Quantize one block in place (`x` is overwritten with the scaled values). Returns the absmax
/// bitsandbytes stores, or the index of the first non-finite element.
#[inline]
fn quantize_block(
    x: &mut [f32],
    ragged: bool,
    bucketizer: &Bucketizer,
    out: &mut [u8],
) -> std::result::Result<f32, usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { quantize_block_avx2(x, ragged, bucketizer, out) };
    }
    quantize_block_impl(x, ragged, bucketizer, out)
}

/// The same code compiled for AVX2: the passes below vectorize eight lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(
    x: &mut [f32],
    ragged: bool,
    bucketizer: &Bucketizer,
    out: &mut [u8],
) -> std::result::Result<f32, usize> {
    quantize_block_impl(x, ragged, bucketizer, out)
}

/// Written as separate straight passes so each one vectorizes.
#[inline(always)]
fn quantize_block_impl(
    x: &mut [f32],
    ragged: bool,
    bucketizer: &Bucketizer,
    out: &mut [u8],
) -> std::result::Result<f32, usize> {
    // max |x| on the bit patterns: for finite floats the order of |x| is the order of their
    // sign-cleared bits, and NaN or infinity shows as bits >= 0x7f80_0000.
    let mut max_bits = 0u32;
    for &v in x.iter() {
        max_bits = max_bits.max(v.to_bits() & 0x7fff_ffff);
    }
    if max_bits >= 0x7f80_0000 {
        return Err(x.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    let absmax = f32::from_bits(max_bits);
    let clamped = absmax.max(MIN_ABSMAX);
    if ragged {
        for v in x.iter_mut() {
            *v = (*v / clamped).clamp(-1.0, 1.0);
        }
    } else {
        let inv = 1.0 / clamped;
        for v in x.iter_mut() {
            *v = (*v * inv).clamp(-1.0, 1.0);
        }
    }
    // Rank of each value among the midpoints (torch.bucketize) as a branch-free count, written
    // over the scaled value's slot, two ranks per u16 so packing stays vectorizable.
    let ranks: &mut [u32] = bytemuck::cast_slice_mut(x);
    let bounds = bucketizer.bounds;
    for r in ranks.iter_mut() {
        let v = f32::from_bits(*r);
        let mut n = 0u32;
        for &b in &bounds {
            n += (b < v) as u32;
        }
        *r = n;
    }
    let mut pairs = ranks.chunks_exact(2);
    for (o, p) in out.iter_mut().zip(&mut pairs) {
        *o = ((p[0] << 4) | p[1]) as u8;
    }
    if let [last] = pairs.remainder() {
        // An odd element count: torch pads with 0.0 before bucketizing.
        out[ranks.len() / 2] = ((*last << 4) | bucketizer.rank(0.0)) as u8;
    }
    if let Some(remap) = bucketizer.pair_remap() {
        for o in out.iter_mut() {
            *o = remap[*o as usize];
        }
    }
    Ok(if ragged { clamped } else { absmax })
}

/// Dequantize `n` elements from packed codes and per-block f32 absmax into `out`.
pub fn dequantize_4bit<T: OutFloat>(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    block_size: usize,
    out: &mut [T],
) -> Result<()> {
    check_block_size(block_size)?;
    let n = out.len();
    if packed.len() != n.div_ceil(2) {
        return Err(QuantError::InvalidState(format!(
            "{} packed bytes cannot hold {n} elements (expected {})",
            packed.len(),
            n.div_ceil(2)
        )));
    }
    if absmax.len() != num_blocks(n, block_size) {
        return Err(QuantError::InvalidState(format!(
            "{} absmax values for {n} elements in blocks of {block_size} (expected {})",
            absmax.len(),
            num_blocks(n, block_size)
        )));
    }
    let decode = quant_type.decode_table();
    let per_task = blocks_per_task(block_size);
    let half_block = block_size / 2;
    out.par_chunks_mut(per_task * block_size)
        .zip(packed.par_chunks(per_task * half_block))
        .zip(absmax.par_chunks(per_task))
        .for_each(|((out, packed), absmax)| {
            for ((out, packed), &scale) in out
                .chunks_mut(block_size)
                .zip(packed.chunks(half_block))
                .zip(absmax)
            {
                dequantize_block(out, packed, decode, scale);
            }
        });
    Ok(())
}

#[inline]
fn dequantize_block<T: OutFloat>(out: &mut [T], packed: &[u8], decode: &[f32; 16], scale: f32) {
    T::dequantize_block(out, packed, decode, scale)
}

/// Scalar nibble lookup: element 2j from the high nibble of byte j.
#[inline(always)]
pub(crate) fn lookup<T: Copy>(out: &mut [T], packed: &[u8], table: &[T; 16]) {
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &b) in (&mut pairs).zip(packed) {
        o[0] = table[(b >> 4) as usize];
        o[1] = table[(b & 15) as usize];
    }
    if let [last] = pairs.into_remainder() {
        *last = table[(packed[packed.len() - 1] >> 4) as usize];
    }
}

/// Nibble lookup into a table of 16-bit values (f16 or bf16 bits).
#[inline]
pub(crate) fn lookup16(out: &mut [u16], packed: &[u8], table: &[u16; 16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        let mut lo = [0u8; 16];
        let mut hi = [0u8; 16];
        for i in 0..16 {
            lo[i] = table[i] as u8;
            hi[i] = (table[i] >> 8) as u8;
        }
        // SAFETY: the CPU has SSSE3 (checked above).
        unsafe { lookup16_ssse3(out, packed, &lo, &hi) };
        return;
    }
    lookup(out, packed, table)
}

/// 16-bit outputs through byte shuffles: the table's low and high bytes are two 16-entry byte
/// tables, so `pshufb` looks up 16 nibbles at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn lookup16_ssse3(out: &mut [u16], packed: &[u8], lo: &[u8; 16], hi: &[u8; 16]) {
    use std::arch::x86_64::*;
    let lo_t = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
    let hi_t = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
    let mask = _mm_set1_epi8(0x0f);
    let full = (out.len() / 32).min(packed.len() / 16);
    for i in 0..full {
        let bytes = _mm_loadu_si128(packed.as_ptr().add(i * 16) as *const __m128i);
        let hi_n = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
        let lo_n = _mm_and_si128(bytes, mask);
        // Element order: high nibble of byte j, then its low nibble.
        let idx_a = _mm_unpacklo_epi8(hi_n, lo_n);
        let idx_b = _mm_unpackhi_epi8(hi_n, lo_n);
        let (la, ha) = (_mm_shuffle_epi8(lo_t, idx_a), _mm_shuffle_epi8(hi_t, idx_a));
        let (lb, hb) = (_mm_shuffle_epi8(lo_t, idx_b), _mm_shuffle_epi8(hi_t, idx_b));
        let dst = out.as_mut_ptr().add(i * 32) as *mut __m128i;
        _mm_storeu_si128(dst, _mm_unpacklo_epi8(la, ha));
        _mm_storeu_si128(dst.add(1), _mm_unpackhi_epi8(la, ha));
        _mm_storeu_si128(dst.add(2), _mm_unpacklo_epi8(lb, hb));
        _mm_storeu_si128(dst.add(3), _mm_unpackhi_epi8(lb, hb));
    }
    let (out, packed) = (&mut out[full * 32..], &packed[full * 16..]);
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &b) in (&mut pairs).zip(packed) {
        o[0] = u16::from(hi[(b >> 4) as usize]) << 8 | u16::from(lo[(b >> 4) as usize]);
        o[1] = u16::from(hi[(b & 15) as usize]) << 8 | u16::from(lo[(b & 15) as usize]);
    }
    if let [last] = pairs.into_remainder() {
        let b = packed[packed.len() - 1] >> 4;
        *last = u16::from(hi[b as usize]) << 8 | u16::from(lo[b as usize]);
    }
}

/// `y = x · Wᵀ` for a few rows of x `[m, k]` (f32) and a 4-bit W `[n, k]` whose blocks do not
/// straddle rows (`k` a multiple of `block_size`): each block of codes is decoded to the very
/// values `dequantize_4bit` gives (a scaled 16-entry table) and dotted at once, so W is never
/// dense. The rows of W are split across threads. Returns y `[m, n]`. For generation, where the
/// dequantization of every weight at every step costs more than the product itself.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows_4bit(
    packed: &[u8],
    absmax: &[f32],
    quant_type: QuantType,
    block_size: usize,
    x: &[f32],
    (m, k, n): (usize, usize, usize),
    y: &mut [f32],
) -> Result<()> {
    check_block_size(block_size)?;
    if k % block_size != 0 || packed.len() < n * k / 2 || absmax.len() < n * k / block_size {
        return Err(QuantError::InvalidState(format!(
            "a [{n}, {k}] weight in blocks of {block_size} does not fit {} bytes and {} scales",
            packed.len(),
            absmax.len()
        )));
    }
    if x.len() != m * k || y.len() != m * n {
        return Err(QuantError::InvalidState(format!(
            "x of {} and y of {} values for m {m}, k {k}, n {n}",
            x.len(),
            y.len()
        )));
    }
    let decode = quant_type.decode_table();
    let blocks = k / block_size;
    // y transposed, [n, m]: each output row of W writes its m values in one place.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = (1 << 16) / k.max(1) + 1;
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            let mut w = vec![0f32; block_size];
            for (jj, acc) in out.chunks_mut(m).enumerate() {
                let j = t * rows_per_task + jj;
                let codes = &packed[j * k / 2..(j + 1) * k / 2];
                let scales = &absmax[j * blocks..(j + 1) * blocks];
                for (b, (c, &s)) in codes.chunks(block_size / 2).zip(scales).enumerate() {
                    let table: [f32; 16] = std::array::from_fn(|i| decode[i] * s);
                    lookup(&mut w, c, &table);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xr = &x[r * k + b * block_size..r * k + (b + 1) * block_size];
                        *a += dot(&w, xr);
                    }
                }
            }
        });
    for (j, row) in yt.chunks(m).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    Ok(())
}

/// A dot product in eight lanes, which the compiler keeps in vector registers.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_error_is_bounded_by_half_the_largest_gap() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (packed, absmax) = quantize_4bit(FloatSlice::F32(&x), QuantType::Nf4, 64).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, 64, &mut y).unwrap();
        for (b, (xs, ys)) in x.chunks(64).zip(y.chunks(64)).enumerate() {
            for (a, c) in xs.iter().zip(ys) {
                // the widest NF4 gap is -1 .. -0.6962, so the error is at most ~0.152 * absmax
                assert!((a - c).abs() <= 0.152 * absmax[b], "{a} vs {c}");
            }
        }
    }

    #[test]
    fn high_nibble_holds_the_even_element() {
        let x = [1.0f32, -1.0];
        let (packed, _) = quantize_4bit(FloatSlice::F32(&x), QuantType::Nf4, 64).unwrap();
        assert_eq!(packed, vec![0xF0]);
    }

    #[test]
    fn nan_is_reported_with_its_index() {
        let mut x = vec![0.5f32; 200];
        x[130] = f32::NAN;
        let err = quantize_4bit(FloatSlice::F32(&x), QuantType::Nf4, 64).unwrap_err();
        assert!(
            matches!(err, QuantError::NonFinite { index: 130, .. }),
            "{err}"
        );
        x[130] = f32::NEG_INFINITY;
        let err = quantize_4bit(FloatSlice::F32(&x), QuantType::Fp4, 64).unwrap_err();
        assert!(
            matches!(err, QuantError::NonFinite { index: 130, .. }),
            "{err}"
        );
    }

    #[test]
    fn unsupported_block_size_is_an_error() {
        let x = [0.0f32; 8];
        for bs in [0, 16, 48, 8192] {
            let err = quantize_4bit(FloatSlice::F32(&x), QuantType::Nf4, bs).unwrap_err();
            assert!(matches!(err, QuantError::UnsupportedBlockSize(b) if b == bs));
        }
    }

    #[test]
    fn inconsistent_lengths_are_errors_not_panics() {
        let mut out = vec![0f32; 100];
        let err = dequantize_4bit(&[0u8; 49], &[1.0, 1.0], QuantType::Nf4, 64, &mut out);
        assert!(matches!(err, Err(QuantError::InvalidState(_))));
        let err = dequantize_4bit(&[0u8; 50], &[1.0], QuantType::Nf4, 64, &mut out);
        assert!(matches!(err, Err(QuantError::InvalidState(_))));
    }
}
