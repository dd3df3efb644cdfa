// Small device utilities of the fused_losses CUDA kernels: packed (16-byte) loads and stores,
// warp-group and block reductions with a fixed combination order, and the launch geometry.
//
// Determinism: every reduction here combines values in an order fixed by the launch geometry
// alone (shuffle butterflies, then warps in index order, then blocks in index order), and the
// geometry depends only on the problem size and the device's multiprocessor count. No float
// atomics anywhere; the only atomics are integer additions (exact, order-free).
#pragma once

#include "cuda/kernels/device.cuh"
#include <stdint.h>

namespace fused_losses {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel of this library
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// N consecutive values of T moved as one access: N * sizeof(T) == 16 is one 128-bit load or
// store (LDG.128 / STG.128); 32 bytes (8 floats) become two. The pointer must be aligned to
// N * sizeof(T) bytes; the host code checks that before choosing a packed kernel.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& value) {
  *reinterpret_cast<Pack<T, N>*>(p) = value;
}

// Maximum over the G consecutive lanes of an aligned lane group (G a power of two <= 32).
// `other > v ? other : v` never selects a NaN, like the CPU kernels' running max. Every lane of
// the warp must call it (full-mask shuffles); all lanes of a group get the same value.
template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Sum over the lanes of a group by a butterfly: each step adds the same two values on both
// lanes (float addition is commutative), so every lane of the group gets bitwise the same sum.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The same two reductions over K partials of one lane (K a power of two), by a tree: dependency
// chains of log2 K operations; the result is also left in p[0].
template <int K>
__device__ __forceinline__ float parts_max(float (&p)[K]) {
#pragma unroll
  for (int w = K / 2; w > 0; w /= 2) {
#pragma unroll
    for (int k = 0; k < w; ++k) p[k] = p[k + w] > p[k] ? p[k + w] : p[k];
  }
  return p[0];
}

template <int K>
__device__ __forceinline__ float parts_sum(float (&p)[K]) {
#pragma unroll
  for (int w = K / 2; w > 0; w /= 2) {
#pragma unroll
    for (int k = 0; k < w; ++k) p[k] += p[k + w];
  }
  return p[0];
}

// Sum of one value per thread of the block (blockDim.x == kThreads), valid in thread 0. Every
// thread of the block must call it. Fixed order: shuffle tree per warp, then warps in order.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  FL_SHARED(T, warp_sums, kWarps);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  }
  return total;
}

}  // namespace cuda
}  // namespace fused_losses
