// SwiGLU: y = silu(g) * u, silu rounded to T first as torch's act_fn(gate) * up. Backward
// writes dg then du into one buffer of 2n.

#include "common.cuh"

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
