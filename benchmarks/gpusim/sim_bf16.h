// The bf16 element type of the drivers' bf16 cases. The simulator's PTX parser rejects the
// inline PTX of cuda_bf16.hpp's bf16 -> float conversion for compute_80 (`mov.b32 %f, {0, %rs}`:
// "Syntax error"), so the drivers instantiate the kernels with this 2-byte type instead of
// fl_bf16 (__nv_bfloat16): the same bits and the same values (bf16 -> float: the bits shifted
// up; float -> bf16: round to nearest even, as __float2bfloat16_rn, in integer operations: the
// parser rejects cvt.rn.bf16.f32 too, so a bf16 store costs a few instructions more than the
// one cvt of the real build),
// found by the kernels' to_float / from_float<T> calls (argument-dependent lookup and an
// explicit specialisation). Include after the kernel headers.
#pragma once

#include <cstdint>

namespace simbf16 {

struct bf16 {
  uint16_t bits;
  bf16() = default;
  __host__ __device__ explicit bf16(float f) {  // round to nearest even (NaN: a quiet NaN)
    uint32_t u;
    memcpy(&u, &f, 4);
    // Branch-free (a select, not a branch per value as the comparison on the bits compiled to):
    // the stand-in costs 5 instructions per value where the real build pays half an F2FP.
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    bits = static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  }
  __host__ __device__ explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
};

__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(static_cast<uint32_t>(v.bits) << 16); }

}  // namespace simbf16

namespace fused_losses {
namespace cuda {
template <>
__device__ __forceinline__ simbf16::bf16 from_float<simbf16::bf16>(float v) {
  return simbf16::bf16(v);  // integer round to nearest even (the simulator rejects cvt.rn.bf16.f32 too)
}
}  // namespace cuda
}  // namespace fused_losses
