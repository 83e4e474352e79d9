// Rotary embedding fused with the move to heads: x [b, s, n, d] -> y [b, n, s, d] with
// y = x * cos + rotate_half(x) * sin, each product and the sum rounded to T as transformers'
// bf16 arithmetic does. Backward maps dy [b, n, s, d] -> dx [b, s, n, d] through the transpose
// of the rotation. cos and sin are [s, d].

#include "common.cuh"

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
