// Attention softmax over the last dimension of scores [b, h, q, k], one block per row, in f32:
// v = scale * s where key j is visible (keep[b, j] and, when causal, j <= i + k - q), else -inf.
// A row with no visible key is uniform over all keys (its gradient is zero).

#include "common.cuh"

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
