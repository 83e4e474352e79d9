// RMSNorm over the last dimension as transformers' LlamaRMSNorm: n = x * (1 / sqrt(mean(x²) +
// eps)) in f32, rounded to T, times the weight (rounded to T). The weight is frozen; backward
// gives dx = r * (g - n * mean(g * n)) with g = dy * w, in f32.

#include "common.cuh"

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
