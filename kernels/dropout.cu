// Inverted dropout from a counter hash: element i is dropped when the top 24 bits of
// splitmix64(seed + (i + 1) * golden) fall below `threshold` (p * 2^24). No mask is stored:
// backward applies the same op to the gradient.

#include "common.cuh"

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
