// AdamW, torch's single-tensor arithmetic, on f32 parameters and moments in place. The gradient
// is multiplied by `grad_scale` (clipping) first.

#include "common.cuh"

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
