// The device layer of the fused_losses kernel headers (csrc/cuda/kernels/*.cuh): what the
// kernels need from the platform, and nothing from ATen, so that the same headers compile in
//   * the torch build (nvcc, csrc/cuda/*.cu: launchers with at::Tensor, streams, dispatch);
//   * the CUDA emulator of the tests (g++ with FUSED_LOSSES_CUDA_EMU, csrc/cuda_emu/cuda_emu.h);
//   * standalone drivers (nvcc without torch, e.g. benchmarks/gpusim/: include a kernels header,
//     launch with <<<>>> or FL_LAUNCH, grid from grid_size() of common_kernels.cuh).
// Provides: FL_LAUNCH / FL_SHARED (nvcc spellings; the emulator's come from cuda_emu.h),
// FL_DEVICE_ASSERT(cond, msg) (torch's CUDA_KERNEL_ASSERT_MSG when it is defined before this
// header, the emulator's recorded assert, else assert()), and the platform-neutral 16-bit
// float types fl_half / fl_bf16 with explicit conversions to_float() and from_float<T>()
// (nvcc: __half / __nv_bfloat16 and the _rn intrinsics, valid with torch's
// -D__CUDA_NO_HALF_CONVERSIONS__; emulator: c10::Half / c10::BFloat16, the same
// round-to-nearest-even). The torch launchers reinterpret at::Half / at::BFloat16 data pointers
// as these types (the same 2-byte layouts).
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef FUSED_LOSSES_CUDA_EMU
// c10's 16-bit types (header-only) before cuda_emu.h, which must come after every host header.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "cuda_emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifndef FL_LAUNCH
#define FL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef FL_SHARED
#define FL_SHARED(type, name, count) __shared__ type name[count]
#endif
#endif

#ifndef FL_DEVICE_ASSERT
#if defined(CUDA_KERNEL_ASSERT_MSG)
#define FL_DEVICE_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#else
#include <assert.h>
#define FL_DEVICE_ASSERT(cond, msg) assert((cond) && (msg))
#endif
#endif

namespace fused_losses {
namespace cuda {

#ifdef FUSED_LOSSES_CUDA_EMU
using fl_half = c10::Half;
using fl_bf16 = c10::BFloat16;
__device__ __forceinline__ float to_float(fl_half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(fl_bf16 v) { return static_cast<float>(v); }
#else
using fl_half = __half;
using fl_bf16 = __nv_bfloat16;
__device__ __forceinline__ float to_float(fl_half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(fl_bf16 v) { return __bfloat162float(v); }
#endif
__device__ __forceinline__ float to_float(float v) { return v; }

// float -> T, rounded to nearest even (T = float: the value itself).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
#ifdef FUSED_LOSSES_CUDA_EMU
template <>
__device__ __forceinline__ fl_half from_float<fl_half>(float v) {
  return fl_half(v);
}
template <>
__device__ __forceinline__ fl_bf16 from_float<fl_bf16>(float v) {
  return fl_bf16(v);
}
#else
template <>
__device__ __forceinline__ fl_half from_float<fl_half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ fl_bf16 from_float<fl_bf16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// e^d as 2^(d log2(e)): one FMUL and the hardware approximation ex2.approx.f32 (MUFU.EX2; the
// non-ftz form keeps subnormal results, which the softmax of a confident sample needs), instead
// of expf's range reduction. Error (relative, for a normal result): the rounding of d log2(e)
// (<= 2^-24 relative) becomes |d log2(e)| 2^-24 ln 2 = |d| 2^-24 in the result, plus ex2.approx's
// own <= 2 ulp (PTX ISA), so <= |d| 6e-8 + 2.4e-7: at most 6.5e-6 for the results that matter
// (|d| <= 104; below that e^d is 0 in float), and <= 3e-7 for the entries near the row max that
// dominate a softmax row. -inf gives +0, NaN gives NaN. The emulator computes exp2f of the same
// rounded product: it models the argument rounding, not ex2.approx's <= 2 ulp.
__device__ __forceinline__ float fast_exp(float d) {
  const float y = d * 1.44269504088896341f;
#ifdef FUSED_LOSSES_CUDA_EMU
  return exp2f(y);
#else
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
#endif
}

}  // namespace cuda
}  // namespace fused_losses
