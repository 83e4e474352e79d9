// Cross-entropy of logits [n, v] against targets [n], one block per row, in f32:
// nll = logsumexp(x) - x[t]. Backward: dx = g * (softmax(x) - onehot(t)), recomputed.

#include "common.cuh"

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
