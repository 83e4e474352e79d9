// 4-bit (NF4/FP4) quantize and dequantize, bit for bit as bitsandbytes.

#include "common.cuh"

// bitsandbytes' decode tables: NF4, and FP4 as its kernels decode it (code 8 is -0).
__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928f, -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f, -0.091050036f, 0.0f,
    0.0795803f, 0.1609302f, 0.2461123f, 0.33791524f, 0.44070983f, 0.562617f, 0.72295684f, 1.0f};
__constant__ float FP4_TABLE[16] = {
    0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 1.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f, 3.0f / 12.0f,
    -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -1.0f, -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};

// ---------------------------------------------------------------------------------------------
// Dequantize. A chunk is 4 packed bytes -> 8 values of one quantization block. A thread takes
// two chunks a block's width apart, so every load and every 16-byte store of a warp is
// contiguous, and issues both chunks' loads before the absmax chains. The block's absmax is
// plain f32, or double-quantized: code[q] * scale + offset, in that order. Block sizes are powers
// of two and come as shifts: a 64-bit division per chunk would cost more than the decode.

template <typename T, bool NESTED>
__device__ __forceinline__ float block_absmax(long long blk, const float *__restrict__ absmax,
                                              const uint8_t *__restrict__ codes,
                                              const float *__restrict__ scales,
                                              const float *__restrict__ code, float offset,
                                              int nested_shift) {
  if (NESTED) {
    float am = code[codes[blk]] * scales[blk >> nested_shift];
    return am + offset;
  }
  return absmax[blk];
}

template <typename T>
__device__ __forceinline__ void decode8(uint32_t q, float am, const float *table, T *dst) {
  T v[8];
#pragma unroll
  for (int b = 0; b < 4; b++) {
    uint32_t byte = (q >> (8 * b)) & 0xff;
    v[2 * b] = from_f32<T>(table[byte >> 4] * am);
    v[2 * b + 1] = from_f32<T>(table[byte & 0xf] * am);
  }
#pragma unroll
  for (int k = 0; k < (int)(8 * sizeof(T) / 16); k++)
    reinterpret_cast<uint4 *>(dst)[k] = reinterpret_cast<const uint4 *>(v)[k];
}

template <typename T, bool NESTED>
__device__ void dequant_4bit(const uint8_t *__restrict__ packed, const float *__restrict__ absmax,
                             const uint8_t *__restrict__ codes, const float *__restrict__ scales,
                             const float *__restrict__ code, float offset, int nested_shift,
                             int fp4, int block_shift, long long n, T *__restrict__ out) {
  // The table in shared memory: lanes index it freely, where constant memory would serialize.
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = fp4 ? FP4_TABLE[threadIdx.x] : NF4_TABLE[threadIdx.x];
  __syncthreads();
  const uint32_t *words = reinterpret_cast<const uint32_t *>(packed);
  long long chunks = n / 8;
  long long c0 = (long long)blockIdx.x * blockDim.x * 2 + threadIdx.x;
  long long c1 = c0 + blockDim.x;
  if (c1 < chunks) {
    uint32_t q0 = words[c0], q1 = words[c1];
    float a0 = block_absmax<T, NESTED>((c0 * 8) >> block_shift, absmax, codes, scales, code, offset,
                                       nested_shift);
    float a1 = block_absmax<T, NESTED>((c1 * 8) >> block_shift, absmax, codes, scales, code, offset,
                                       nested_shift);
    decode8<T>(q0, a0, table, out + c0 * 8);
    decode8<T>(q1, a1, table, out + c1 * 8);
  } else if (c0 < chunks) {
    float a0 = block_absmax<T, NESTED>((c0 * 8) >> block_shift, absmax, codes, scales, code, offset,
                                       nested_shift);
    decode8<T>(words[c0], a0, table, out + c0 * 8);
  }
  // The last n % 8 values, by the grid's first thread.
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (long long e = chunks * 8; e < n; e++) {
      float am = block_absmax<T, NESTED>(e >> block_shift, absmax, codes, scales, code, offset,
                                         nested_shift);
      uint8_t byte = packed[e / 2];
      uint8_t nib = (e % 2 == 0) ? (byte >> 4) : (byte & 0xf);
      out[e] = from_f32<T>(table[nib] * am);
    }
  }
}

#define DEQUANT(NAME, T, NESTED)                                                                 \
  extern "C" __global__ void NAME(const uint8_t *packed, const float *absmax,                    \
                                  const uint8_t *codes, const float *scales, const float *code,  \
                                  float offset, int nested_shift, int fp4, int block_shift,      \
                                  long long n, T *out) {                                         \
    dequant_4bit<T, NESTED>(packed, absmax, codes, scales, code, offset, nested_shift, fp4,      \
                            block_shift, n, out);                                                \
  }
DEQUANT(dequant_4bit_f32, float, false)
DEQUANT(dequant_4bit_bf16, bf16, false)
DEQUANT(dequant_4bit_f16, f16, false)
DEQUANT(dequant_4bit_nested_f32, float, true)
DEQUANT(dequant_4bit_nested_bf16, bf16, true)
DEQUANT(dequant_4bit_nested_f16, f16, true)

// ---------------------------------------------------------------------------------------------
// Quantize, one warp per block, exactly as the Rust CPU path (bitsandbytes' CPU kernel): max |x|
// on the bit patterns, scale by the reciprocal (divide in a ragged last block), clamp to [-1, 1],
// rank among the 15 midpoints (a value on a midpoint goes down), map rank to code. `tables` holds
// the 15 midpoints then the 16 codes of the ranks (as floats). A non-finite value records the
// lowest such index in `bad` and leaves its block unwritten.

#define MIN_ABSMAX 1e-38f

template <typename T>
__device__ void quantize_4bit(const T *__restrict__ x, long long n, int block_size,
                              const float *__restrict__ tables, uint8_t *__restrict__ packed,
                              float *__restrict__ absmax, unsigned long long *bad) {
  long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  long long blocks = (n + block_size - 1) / block_size;
  if (warp >= blocks) return;
  long long start = warp * block_size;
  int len = (int)min((long long)block_size, n - start);
  unsigned int m = 0;
  for (int j = lane; j < len; j += 32) {
    m = max(m, __float_as_uint(to_f32(x[start + j])) & 0x7fffffffu);
  }
  m = __reduce_max_sync(0xffffffffu, m);
  if (m >= 0x7f800000u) {
    for (int j = lane; j < len; j += 32) {
      if ((__float_as_uint(to_f32(x[start + j])) & 0x7fffffffu) >= 0x7f800000u) {
        atomicMin(bad, (unsigned long long)(start + j));
        break;
      }
    }
    return;
  }
  float am = __uint_as_float(m);
  float clamped = fmaxf(am, MIN_ABSMAX);
  bool ragged = len < block_size;
  float inv = 1.0f / clamped;
  int pairs = (len + 1) / 2;
  for (int p = lane; p < pairs; p += 32) {
    int r[2];
#pragma unroll
    for (int k = 0; k < 2; k++) {
      int j = 2 * p + k;
      float v;
      if (j < len) {
        float xv = to_f32(x[start + j]);
        v = ragged ? xv / clamped : xv * inv;
        v = fminf(fmaxf(v, -1.0f), 1.0f);
      } else {
        v = 0.0f;  // an odd element count pads with 0.0, unscaled
      }
      int c = 0;
#pragma unroll
      for (int b = 0; b < 15; b++) c += tables[b] < v;
      r[k] = (int)tables[15 + c];
    }
    packed[start / 2 + p] = (uint8_t)((r[0] << 4) | r[1]);
  }
  if (lane == 0) absmax[warp] = ragged ? clamped : am;
}

#define QUANT(NAME, T)                                                                           \
  extern "C" __global__ void NAME(const T *x, long long n, int block_size, const float *tables,  \
                                  uint8_t *packed, float *absmax, unsigned long long *bad) {     \
    quantize_4bit<T>(x, n, block_size, tables, packed, absmax, bad);                             \
  }
QUANT(quantize_4bit_f32, float)
QUANT(quantize_4bit_bf16, bf16)
QUANT(quantize_4bit_f16, f16)
