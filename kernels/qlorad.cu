// qlorad's CUDA kernels: 4-bit (NF4/FP4) quantize and dequantize bit for bit as bitsandbytes,
// hash dropout, masked softmax and cross-entropy with their backward passes, and AdamW.
//
// Every kernel has a CPU twin in Rust computing the same thing in the same order; the
// `qlorad bench kernels` command checks them against each other on a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) { return __float2half_rn(v); }

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

// ---------------------------------------------------------------------------------------------
// Inverted dropout from a counter hash: element i is dropped when the top 24 bits of
// splitmix64(seed + (i + 1) * golden) fall below `threshold` (p * 2^24). No mask is stored:
// backward applies the same op to the gradient.

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout(const T *__restrict__ x, T *__restrict__ y, long long n,
                        unsigned long long seed, unsigned int threshold, float keep_scale) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned long long h = splitmix64(seed + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ull);
  unsigned int u = (unsigned int)(h >> 40);
  y[i] = u < threshold ? from_f32<T>(0.0f) : from_f32<T>(to_f32(x[i]) * keep_scale);
}

#define DROPOUT(NAME, T)                                                                         \
  extern "C" __global__ void NAME(const T *x, T *y, long long n, unsigned long long seed,        \
                                  unsigned int threshold, float keep_scale) {                    \
    dropout<T>(x, y, n, seed, threshold, keep_scale);                                            \
  }
DROPOUT(dropout_f32, float)
DROPOUT(dropout_bf16, bf16)
DROPOUT(dropout_f16, f16)

// acc += dropout(x), in place: a dropout's backward accumulated into the gradient beside it.
// The dropped value is rounded to T before the add, as the two separate ops would.
template <typename T>
__device__ void dropout_add(T *acc, const T *__restrict__ x, long long n, unsigned long long seed,
                            unsigned int threshold, float keep_scale) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  unsigned long long h = splitmix64(seed + (unsigned long long)(i + 1) * 0x9e3779b97f4a7c15ull);
  unsigned int u = (unsigned int)(h >> 40);
  float d = u < threshold ? 0.0f : to_f32(from_f32<T>(to_f32(x[i]) * keep_scale));
  acc[i] = from_f32<T>(to_f32(acc[i]) + d);
}

#define DROPOUT_ADD(NAME, T)                                                                     \
  extern "C" __global__ void NAME(T *acc, const T *x, long long n, unsigned long long seed,      \
                                  unsigned int threshold, float keep_scale) {                    \
    dropout_add<T>(acc, x, n, seed, threshold, keep_scale);                                      \
  }
DROPOUT_ADD(dropout_add_f32, float)
DROPOUT_ADD(dropout_add_bf16, bf16)
DROPOUT_ADD(dropout_add_f16, f16)

// ---------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, at most 1024).

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ float block_max(float v, float *shared) {
  v = warp_max(v);
  int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[w] = v;
  __syncthreads();
  v = lane < nw ? shared[lane] : -INFINITY;
  return warp_max(v);
}
__device__ float block_sum(float v, float *shared) {
  v = warp_sum(v);
  int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[w] = v;
  __syncthreads();
  v = lane < nw ? shared[lane] : 0.0f;
  return warp_sum(v);
}

// ---------------------------------------------------------------------------------------------
// Attention softmax over the last dimension of scores [b, h, q, k], one block per row, in f32:
// v = scale * s where key j is visible (keep[b, j] and, when causal, j <= i + k - q), else -inf.
// A row with no visible key is uniform over all keys (its gradient is zero).

template <typename T>
__device__ void attn_softmax(const T *__restrict__ s, const uint8_t *__restrict__ keep, T *__restrict__ p,
                             int heads, int q, int k, float scale, int causal) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  int i = (int)(row % q);
  int b = (int)(row / q / heads);
  const T *sr = s + row * k;
  T *pr = p + row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= last; j += blockDim.x)
    if (kb[j]) m = fmaxf(m, to_f32(sr[j]) * scale);
  m = block_max(m, shared);
  if (m == -INFINITY) {
    for (int j = threadIdx.x; j < k; j += blockDim.x) pr[j] = from_f32<T>(1.0f / (float)k);
    return;
  }
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= last; j += blockDim.x)
    if (kb[j]) sum += expf(to_f32(sr[j]) * scale - m);
  sum = block_sum(sum, shared);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float e = (j <= last && kb[j]) ? expf(to_f32(sr[j]) * scale - m) / sum : 0.0f;
    pr[j] = from_f32<T>(e);
  }
}

// ds = scale * p * (dp - sum(p * dp)); zero for rows with no visible key.
template <typename T>
__device__ void attn_softmax_bwd(const T *__restrict__ p, const T *__restrict__ dp,
                                 const uint8_t *__restrict__ keep, T *__restrict__ ds, int heads,
                                 int q, int k, float scale, int causal) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  int i = (int)(row % q);
  int b = (int)(row / q / heads);
  const T *pr = p + row * k;
  const T *dr = dp + row * k;
  T *out = ds + row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  int any = 0;
  float dot = 0.0f;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) {
    any |= kb[j];
    dot += to_f32(pr[j]) * to_f32(dr[j]);
  }
  any = __syncthreads_or(any);
  dot = block_sum(dot, shared);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    float g = 0.0f;
    if (any && j <= last && kb[j]) {
      float pj = to_f32(pr[j]);
      g = scale * pj * (to_f32(dr[j]) - dot);
    }
    out[j] = from_f32<T>(g);
  }
}

// The same two kernels for rows of k % 8 == 0 and k <= 256 * 8 * 4: 256 threads, each loading
// its values once (16-byte loads) into registers. Same arithmetic, same results.
#define VEC_CHUNKS 4

template <typename T>
__device__ __forceinline__ void load8(const T *p, float *v) {
  uint4 raw[sizeof(T) / 2];
#pragma unroll
  for (int k = 0; k < (int)(sizeof(T) / 2); k++) raw[k] = reinterpret_cast<const uint4 *>(p)[k];
  const T *t = reinterpret_cast<const T *>(raw);
#pragma unroll
  for (int k = 0; k < 8; k++) v[k] = to_f32(t[k]);
}

template <typename T>
__device__ __forceinline__ void store8(T *p, const float *v) {
  T t[8];
#pragma unroll
  for (int k = 0; k < 8; k++) t[k] = from_f32<T>(v[k]);
#pragma unroll
  for (int k = 0; k < (int)(sizeof(T) / 2); k++)
    reinterpret_cast<uint4 *>(p)[k] = reinterpret_cast<const uint4 *>(t)[k];
}

template <typename T>
__device__ void attn_softmax_vec(const T *__restrict__ s, const uint8_t *__restrict__ keep,
                                 T *__restrict__ p, int heads, int q, int k, float scale,
                                 int causal) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  int i = (int)(row % q);
  int b = (int)(row / q / heads);
  const T *sr = s + row * k;
  T *pr = p + row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  float v[VEC_CHUNKS][8];
  float m = -INFINITY;
#pragma unroll
  for (int c = 0; c < VEC_CHUNKS; c++) {
    int j0 = (c * blockDim.x + threadIdx.x) * 8;
    if (j0 < k && j0 <= last) {
      load8(sr + j0, v[c]);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        int j = j0 + e;
        v[c][e] = (j <= last && kb[j]) ? v[c][e] * scale : -INFINITY;
        m = fmaxf(m, v[c][e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) v[c][e] = -INFINITY;
    }
  }
  m = block_max(m, shared);
  if (m == -INFINITY) {
    float u[8];
#pragma unroll
    for (int e = 0; e < 8; e++) u[e] = 1.0f / (float)k;
#pragma unroll
    for (int c = 0; c < VEC_CHUNKS; c++) {
      int j0 = (c * blockDim.x + threadIdx.x) * 8;
      if (j0 < k) store8(pr + j0, u);
    }
    return;
  }
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < VEC_CHUNKS; c++)
#pragma unroll
    for (int e = 0; e < 8; e++) {
      v[c][e] = v[c][e] == -INFINITY ? 0.0f : expf(v[c][e] - m);
      sum += v[c][e];
    }
  sum = block_sum(sum, shared);
#pragma unroll
  for (int c = 0; c < VEC_CHUNKS; c++) {
    int j0 = (c * blockDim.x + threadIdx.x) * 8;
    if (j0 < k) {
#pragma unroll
      for (int e = 0; e < 8; e++) v[c][e] = v[c][e] / sum;
      store8(pr + j0, v[c]);
    }
  }
}

template <typename T>
__device__ void attn_softmax_bwd_vec(const T *__restrict__ p, const T *__restrict__ dp,
                                     const uint8_t *__restrict__ keep, T *__restrict__ ds,
                                     int heads, int q, int k, float scale, int causal) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  int i = (int)(row % q);
  int b = (int)(row / q / heads);
  const T *pr = p + row * k;
  const T *dr = dp + row * k;
  T *out = ds + row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  float pv[VEC_CHUNKS][8], dv[VEC_CHUNKS][8];
  int any = 0;
  float dot = 0.0f;
#pragma unroll
  for (int c = 0; c < VEC_CHUNKS; c++) {
    int j0 = (c * blockDim.x + threadIdx.x) * 8;
    if (j0 < k && j0 <= last) {
      load8(pr + j0, pv[c]);
      load8(dr + j0, dv[c]);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        int j = j0 + e;
        bool vis = j <= last;
        any |= vis && kb[j];
        if (!vis) pv[c][e] = 0.0f;
        dot += pv[c][e] * dv[c][e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) pv[c][e] = dv[c][e] = 0.0f;
    }
  }
  any = __syncthreads_or(any);
  dot = block_sum(dot, shared);
#pragma unroll
  for (int c = 0; c < VEC_CHUNKS; c++) {
    int j0 = (c * blockDim.x + threadIdx.x) * 8;
    if (j0 < k) {
      float g[8];
#pragma unroll
      for (int e = 0; e < 8; e++) {
        int j = j0 + e;
        g[e] = (any && j <= last && kb[j]) ? scale * pv[c][e] * (dv[c][e] - dot) : 0.0f;
      }
      store8(out + j0, g);
    }
  }
}

#define SOFTMAX(NAME, BWD, T)                                                                    \
  extern "C" __global__ void NAME(const T *s, const uint8_t *keep, T *p, int heads, int q, int k, \
                                  float scale, int causal) {                                     \
    attn_softmax<T>(s, keep, p, heads, q, k, scale, causal);                                     \
  }                                                                                              \
  extern "C" __global__ void BWD(const T *p, const T *dp, const uint8_t *keep, T *ds, int heads, \
                                 int q, int k, float scale, int causal) {                        \
    attn_softmax_bwd<T>(p, dp, keep, ds, heads, q, k, scale, causal);                            \
  }                                                                                              \
  extern "C" __global__ void NAME##_vec(const T *s, const uint8_t *keep, T *p, int heads, int q, \
                                        int k, float scale, int causal) {                        \
    attn_softmax_vec<T>(s, keep, p, heads, q, k, scale, causal);                                 \
  }                                                                                              \
  extern "C" __global__ void BWD##_vec(const T *p, const T *dp, const uint8_t *keep, T *ds,      \
                                       int heads, int q, int k, float scale, int causal) {       \
    attn_softmax_bwd_vec<T>(p, dp, keep, ds, heads, q, k, scale, causal);                        \
  }
// The same two kernels for rows of k % 8 == 0 and k <= C * 256, one warp per row (8 rows to a
// block of 256): lane l holds chunks (c * 32 + l) * 8 in registers, reductions are warp
// shuffles, and no block-wide barrier is needed. Same arithmetic, same results.

__device__ __forceinline__ unsigned int keep_byte(uint2 w, int e) {
  return ((e < 4 ? w.x : w.y) >> (8 * (e & 3))) & 0xffu;
}

template <typename T, int C>
__device__ void attn_softmax_warp(const T *__restrict__ s, const uint8_t *__restrict__ keep,
                                  T *__restrict__ p, int heads, int q, int k, float scale,
                                  int causal, int rows) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  int i = row % q;
  int b = row / q / heads;
  const T *sr = s + (long long)row * k;
  T *pr = p + (long long)row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  float v[C][8];
  float m = -INFINITY;
#pragma unroll
  for (int c = 0; c < C; c++) {
    int j0 = (c * 32 + lane) * 8;
    if (j0 < k && j0 <= last) {
      load8(sr + j0, v[c]);
      uint2 kw = *reinterpret_cast<const uint2 *>(kb + j0);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        v[c][e] = (j0 + e <= last && keep_byte(kw, e)) ? v[c][e] * scale : -INFINITY;
        m = fmaxf(m, v[c][e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) v[c][e] = -INFINITY;
    }
  }
  m = warp_max(m);
  if (m == -INFINITY) {
    float u[8];
#pragma unroll
    for (int e = 0; e < 8; e++) u[e] = 1.0f / (float)k;
#pragma unroll
    for (int c = 0; c < C; c++) {
      int j0 = (c * 32 + lane) * 8;
      if (j0 < k) store8(pr + j0, u);
    }
    return;
  }
  // Chunks past the causal limit hold only zeros: no exp, no division.
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < C; c++)
    if ((c * 32 + lane) * 8 <= last) {
#pragma unroll
      for (int e = 0; e < 8; e++) {
        v[c][e] = v[c][e] == -INFINITY ? 0.0f : expf(v[c][e] - m);
        sum += v[c][e];
      }
    }
  sum = warp_sum(sum);
#pragma unroll
  for (int c = 0; c < C; c++) {
    int j0 = (c * 32 + lane) * 8;
    if (j0 < k) {
      if (j0 <= last) {
#pragma unroll
        for (int e = 0; e < 8; e++) v[c][e] = v[c][e] / sum;
      } else {
#pragma unroll
        for (int e = 0; e < 8; e++) v[c][e] = 0.0f;
      }
      store8(pr + j0, v[c]);
    }
  }
}

template <typename T, int C>
__device__ void attn_softmax_bwd_warp(const T *__restrict__ p, const T *__restrict__ dp,
                                      const uint8_t *__restrict__ keep, T *__restrict__ ds,
                                      int heads, int q, int k, float scale, int causal,
                                      int rows) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  int i = row % q;
  int b = row / q / heads;
  const T *pr = p + (long long)row * k;
  const T *dr = dp + (long long)row * k;
  T *out = ds + (long long)row * k;
  const uint8_t *kb = keep + (long long)b * k;
  int last = causal ? min(k - 1, i + k - q) : k - 1;
  float pv[C][8], dv[C][8];
  unsigned int kw_any = 0;
  float dot = 0.0f;
#pragma unroll
  for (int c = 0; c < C; c++) {
    int j0 = (c * 32 + lane) * 8;
    if (j0 < k && j0 <= last) {
      load8(pr + j0, pv[c]);
      load8(dr + j0, dv[c]);
      uint2 kw = *reinterpret_cast<const uint2 *>(kb + j0);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        bool vis = j0 + e <= last;
        kw_any |= vis && keep_byte(kw, e);
        if (!vis) pv[c][e] = 0.0f;
        dot += pv[c][e] * dv[c][e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) pv[c][e] = dv[c][e] = 0.0f;
    }
  }
  int any = __any_sync(0xffffffffu, kw_any);
  dot = warp_sum(dot);
#pragma unroll
  for (int c = 0; c < C; c++) {
    int j0 = (c * 32 + lane) * 8;
    if (j0 < k) {
      uint2 kw = j0 <= last ? *reinterpret_cast<const uint2 *>(kb + j0) : make_uint2(0, 0);
      float g[8];
#pragma unroll
      for (int e = 0; e < 8; e++)
        g[e] = (any && j0 + e <= last && keep_byte(kw, e)) ? scale * pv[c][e] * (dv[c][e] - dot)
                                                            : 0.0f;
      store8(out + j0, g);
    }
  }
}

#define SOFTMAX_WARP(NAME, BWD, T, C)                                                            \
  extern "C" __global__ void NAME##_warp##C(const T *s, const uint8_t *keep, T *p, int heads,    \
                                            int q, int k, float scale, int causal, int rows) {   \
    attn_softmax_warp<T, C>(s, keep, p, heads, q, k, scale, causal, rows);                       \
  }                                                                                              \
  extern "C" __global__ void BWD##_warp##C(const T *p, const T *dp, const uint8_t *keep, T *ds,  \
                                           int heads, int q, int k, float scale, int causal,     \
                                           int rows) {                                           \
    attn_softmax_bwd_warp<T, C>(p, dp, keep, ds, heads, q, k, scale, causal, rows);              \
  }
#define SOFTMAX_WARPS(NAME, BWD, T)                                                              \
  SOFTMAX_WARP(NAME, BWD, T, 1)                                                                  \
  SOFTMAX_WARP(NAME, BWD, T, 2)                                                                  \
  SOFTMAX_WARP(NAME, BWD, T, 4)                                                                  \
  SOFTMAX_WARP(NAME, BWD, T, 8)
SOFTMAX_WARPS(attn_softmax_f32, attn_softmax_bwd_f32, float)
SOFTMAX_WARPS(attn_softmax_bf16, attn_softmax_bwd_bf16, bf16)
SOFTMAX_WARPS(attn_softmax_f16, attn_softmax_bwd_f16, f16)

SOFTMAX(attn_softmax_f32, attn_softmax_bwd_f32, float)
SOFTMAX(attn_softmax_bf16, attn_softmax_bwd_bf16, bf16)
SOFTMAX(attn_softmax_f16, attn_softmax_bwd_f16, f16)

// ---------------------------------------------------------------------------------------------
// Cross-entropy of logits [n, v] against targets [n], one block per row, in f32:
// nll = logsumexp(x) - x[t]. Backward: dx = g * (softmax(x) - onehot(t)), recomputed.

template <typename T>
__device__ void row_lse(const T *xr, int v, float *shared, float *m_out, float *lse_out) {
  float m = -INFINITY;
  for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f32(xr[j]));
  m = block_max(m, shared);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < v; j += blockDim.x) sum += expf(to_f32(xr[j]) - m);
  sum = block_sum(sum, shared);
  *m_out = m;
  *lse_out = logf(sum);
}

template <typename T>
__device__ void cross_entropy(const T *__restrict__ x, const uint32_t *__restrict__ t,
                              float *__restrict__ nll, int v) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  const T *xr = x + row * v;
  float m, lse;
  row_lse(xr, v, shared, &m, &lse);
  if (threadIdx.x == 0) nll[row] = lse - (to_f32(xr[t[row]]) - m);
}

template <typename T>
__device__ void cross_entropy_bwd(const T *__restrict__ x, const uint32_t *__restrict__ t,
                                  const float *__restrict__ g, T *__restrict__ dx, int v) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  const T *xr = x + row * v;
  float m, lse;
  row_lse(xr, v, shared, &m, &lse);
  float gr = g[row];
  uint32_t tr = t[row];
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    float p = expf(to_f32(xr[j]) - m - lse);
    dx[row * v + j] = from_f32<T>(gr * (p - (j == (int)tr ? 1.0f : 0.0f)));
  }
}

#define XENT(NAME, BWD, T)                                                                       \
  extern "C" __global__ void NAME(const T *x, const uint32_t *t, float *nll, int v) {            \
    cross_entropy<T>(x, t, nll, v);                                                              \
  }                                                                                              \
  extern "C" __global__ void BWD(const T *x, const uint32_t *t, const float *g, T *dx, int v) {  \
    cross_entropy_bwd<T>(x, t, g, dx, v);                                                        \
  }
XENT(cross_entropy_f32, cross_entropy_bwd_f32, float)
XENT(cross_entropy_bf16, cross_entropy_bwd_bf16, bf16)
XENT(cross_entropy_f16, cross_entropy_bwd_f16, f16)

// ---------------------------------------------------------------------------------------------
// AdamW, torch's single-tensor arithmetic, on f32 parameters and moments in place. The gradient
// is multiplied by `grad_scale` (clipping) first.

extern "C" __global__ void adamw_f32(float *p, float *m, float *v, const float *g, long long n,
                                     float grad_scale, float decay, float w1, float b2, float w2,
                                     float step_size, float bc2_sqrt, float eps) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gi = g[i] * grad_scale;
  float pi = p[i] * decay;
  float mi = m[i] + w1 * (gi - m[i]);
  float vi = v[i] * b2 + w2 * gi * gi;
  float denom = sqrtf(vi) / bc2_sqrt + eps;
  p[i] = pi + -step_size * (mi / denom);
  m[i] = mi;
  v[i] = vi;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dimension as transformers' LlamaRMSNorm: n = x * (1 / sqrt(mean(x²) +
// eps)) in f32, rounded to T, times the weight (rounded to T). The weight is frozen; backward
// gives dx = r * (g - n * mean(g * n)) with g = dy * w, in f32.

template <typename T>
__device__ void rms_norm(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, int h,
                         float eps) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  const T *xr = x + row * h;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float v = to_f32(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, shared);
  float r = 1.0f / sqrtf(ss / (float)h + eps);
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float n = to_f32(from_f32<T>(to_f32(xr[j]) * r));
    y[row * h + j] = from_f32<T>(n * to_f32(w[j]));
  }
}

template <typename T>
__device__ void rms_norm_bwd(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ dy,
                             T *__restrict__ dx, int h, float eps) {
  __shared__ float shared[32];
  long long row = blockIdx.x;
  const T *xr = x + row * h;
  const T *dr = dy + row * h;
  float ss = 0.0f, gx = 0.0f;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float v = to_f32(xr[j]);
    ss += v * v;
    gx += to_f32(dr[j]) * to_f32(w[j]) * v;
  }
  ss = block_sum(ss, shared);
  gx = block_sum(gx, shared);
  float r = 1.0f / sqrtf(ss / (float)h + eps);
  // mean(g * n) = r * sum(g * x) / h
  float c = r * gx / (float)h;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    float g = to_f32(dr[j]) * to_f32(w[j]);
    float n = to_f32(xr[j]) * r;
    dx[row * h + j] = from_f32<T>(r * (g - n * c));
  }
}

#define RMSNORM(NAME, BWD, T)                                                                    \
  extern "C" __global__ void NAME(const T *x, const T *w, T *y, int h, float eps) {              \
    rms_norm<T>(x, w, y, h, eps);                                                                \
  }                                                                                              \
  extern "C" __global__ void BWD(const T *x, const T *w, const T *dy, T *dx, int h, float eps) { \
    rms_norm_bwd<T>(x, w, dy, dx, h, eps);                                                       \
  }
RMSNORM(rms_norm_f32, rms_norm_bwd_f32, float)
RMSNORM(rms_norm_bf16, rms_norm_bwd_bf16, bf16)
RMSNORM(rms_norm_f16, rms_norm_bwd_f16, f16)

// ---------------------------------------------------------------------------------------------
// Rotary embedding fused with the move to heads: x [b, s, n, d] -> y [b, n, s, d] with
// y = x * cos + rotate_half(x) * sin, each product and the sum rounded to T as transformers'
// bf16 arithmetic does. Backward maps dy [b, n, s, d] -> dx [b, s, n, d] through the transpose
// of the rotation. cos and sin are [s, d].

template <typename T>
__device__ void rope(const T *__restrict__ x, const T *__restrict__ cs, const T *__restrict__ sn,
                     T *__restrict__ y, int b, int s, int n, int d) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long total = (long long)b * s * n * d;
  if (i >= total) return;
  int j = (int)(i % d);
  long long t = i / d;
  int hh = (int)(t % n);
  t /= n;
  int p = (int)(t % s);
  int bb = (int)(t / s);
  int half = d / 2;
  float xv = to_f32(x[i]);
  float rh = j < half ? -to_f32(x[i + half]) : to_f32(x[i - half]);
  float a = to_f32(from_f32<T>(xv * to_f32(cs[p * d + j])));
  float c = to_f32(from_f32<T>(rh * to_f32(sn[p * d + j])));
  y[(((long long)bb * n + hh) * s + p) * d + j] = from_f32<T>(a + c);
}

template <typename T>
__device__ void rope_bwd(const T *__restrict__ dy, const T *__restrict__ cs, const T *__restrict__ sn,
                         T *__restrict__ dx, int b, int s, int n, int d) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // over dx [b, s, n, d]
  long long total = (long long)b * s * n * d;
  if (i >= total) return;
  int j = (int)(i % d);
  long long t = i / d;
  int hh = (int)(t % n);
  t /= n;
  int p = (int)(t % s);
  int bb = (int)(t / s);
  int half = d / 2;
  const T *row = dy + (((long long)bb * n + hh) * s + p) * d;
  float g = to_f32(row[j]) * to_f32(cs[p * d + j]);
  if (j < half) {
    g += to_f32(row[j + half]) * to_f32(sn[p * d + j + half]);
  } else {
    g -= to_f32(row[j - half]) * to_f32(sn[p * d + j - half]);
  }
  dx[i] = from_f32<T>(g);
}

#define ROPE(NAME, BWD, T)                                                                       \
  extern "C" __global__ void NAME(const T *x, const T *c, const T *s_, T *y, int b, int s, int n, \
                                  int d) {                                                       \
    rope<T>(x, c, s_, y, b, s, n, d);                                                            \
  }                                                                                              \
  extern "C" __global__ void BWD(const T *dy, const T *c, const T *s_, T *dx, int b, int s,      \
                                 int n, int d) {                                                 \
    rope_bwd<T>(dy, c, s_, dx, b, s, n, d);                                                      \
  }
ROPE(rope_f32, rope_bwd_f32, float)
ROPE(rope_bf16, rope_bwd_bf16, bf16)
ROPE(rope_f16, rope_bwd_f16, f16)

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(g) * u, silu rounded to T first as torch's act_fn(gate) * up. Backward
// writes dg then du into one buffer of 2n.

template <typename T>
__device__ void swiglu(const T *__restrict__ g, const T *__restrict__ u, T *__restrict__ y, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gv = to_f32(g[i]);
  float act = to_f32(from_f32<T>(gv / (1.0f + expf(-gv))));
  y[i] = from_f32<T>(act * to_f32(u[i]));
}

template <typename T>
__device__ void swiglu_bwd(const T *__restrict__ g, const T *__restrict__ u, const T *__restrict__ dy,
                           T *__restrict__ out, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float gv = to_f32(g[i]);
  float sig = 1.0f / (1.0f + expf(-gv));
  float act = gv * sig;
  float d = to_f32(dy[i]);
  out[i] = from_f32<T>(d * to_f32(u[i]) * sig * (1.0f + gv * (1.0f - sig)));
  out[n + i] = from_f32<T>(d * act);
}

#define SWIGLU(NAME, BWD, T)                                                                     \
  extern "C" __global__ void NAME(const T *g, const T *u, T *y, long long n) {                   \
    swiglu<T>(g, u, y, n);                                                                       \
  }                                                                                              \
  extern "C" __global__ void BWD(const T *g, const T *u, const T *dy, T *out, long long n) {     \
    swiglu_bwd<T>(g, u, dy, out, n);                                                             \
  }
SWIGLU(swiglu_f32, swiglu_bwd_f32, float)
SWIGLU(swiglu_bf16, swiglu_bwd_bf16, bf16)
SWIGLU(swiglu_f16, swiglu_bwd_f16, f16)
