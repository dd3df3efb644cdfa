// The bf16 element type of the drivers' bf16 cases. The simulator's PTX parser knows no bf16 at
// all: it rejects the inline PTX of cuda_bf16.hpp's bf16 -> float conversion for compute_80
// (`mov.b32 %f, {0, %rs}`: "Syntax error") and cvt.rn.bf16.f32 / cvt.rn.bf16x2.f32. So the
// drivers instantiate the kernels with this 2-byte type instead of fl_bf16 (__nv_bfloat16): the
// same bits and the same values, found by the kernels' to_float / from_float<T> calls
// (argument-dependent lookup and an explicit specialisation). Include after the kernel headers.
//
// What a conversion costs in the simulator (it executes and counts PTX, not SASS), per value:
//   bf16 -> float: 1 instruction (`mov.b32 %f, {%zero, %bits}`, a zero register, not the
//     immediate the parser rejects) + half of the split of a loaded 32-bit word: 1.5, as the real
//     build's PTX (`mov.b32 %f, {0, %rs}`); sm_90 SASS: one PRMT/IMAD.U32 or none.
//   float -> bf16: 4 instructions for the rounding, a move to an integer register and half a
//     prmt packing two values for the store: 5.5, where the real build's PTX pays 1.5
//     (cvt.rn.bf16.f32 + half a pack) and sm_90 SASS half an F2FP.BF16.PACK_AB. (Taking the high
//     half in the asm (`mov.b32 {lo, hi}`) is one instruction less but made sm_90 ptxas use 48
//     registers instead of the real build's 40 in the sigmoid kernel, one block per SM less: the
//     drivers' grid follows the sm_90 registers.)
//     (The integer rounding used before 2026-12-07 cost 11: shifts, masks, a NaN test and
//     16-bit moves. The simulated bf16 cases before that date carry that cost.)
// The rounding: m = sign(v) 2^(E + 16) for v's exponent E, so v + m lies in m's binade, whose
// spacing is 2^(E - 7), bf16's spacing at v: the float addition rounds v to bf16 (to nearest
// even, like __float2bfloat16_rn) and subtracting m is exact. Exact for |v| in [2^-126, 2^112),
// zero, +-inf and NaN (NaN stays NaN; -0 gives +0, equal as a number). Outside that range the
// result is not bf16's rounding: subnormal v is rounded at 2^-134 and the low half dropped (up to
// one bf16 subnormal step off), |v| >= 2^112 overflows m. The drivers' gradients stay far inside.
#pragma once

#include <cstdint>

namespace simbf16 {

struct bf16 {
  uint16_t bits;
  bf16() = default;
  __host__ __device__ explicit bf16(float f) {  // round to nearest even (NaN: a quiet NaN)
    uint32_t u;
    memcpy(&u, &f, 4);
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

__device__ __forceinline__ float to_float(bf16 v) {
  float f;
  // The zero half is a register operand (materialised once by the compiler, not per value).
  asm("mov.b32 %0, {%1, %2};" : "=f"(f) : "h"(static_cast<unsigned short>(0)), "h"(v.bits));
  return f;
}

__device__ __forceinline__ bf16 round_to_bf16(float v) {
  float s;
  asm("{\n\t"
      ".reg .b32 m;\n\t"
      "and.b32 m, %1, 0xff800000;\n\t"  // sign and exponent of v
      "add.s32 m, m, 0x08000000;\n\t"   // times 2^16
      "add.rn.f32 %0, %1, m;\n\t"       // rounds v at bf16's spacing (to nearest even)
      "sub.rn.f32 %0, %0, m;\n\t"       // exact
      "}"
      : "=f"(s)
      : "f"(v));
  // The high half: the bf16 bits (the compiler packs two values with one prmt for the store).
  bf16 out;
  out.bits = static_cast<uint16_t>(__float_as_uint(s) >> 16);
  return out;
}

}  // namespace simbf16

namespace fused_losses {
namespace cuda {
template <>
__device__ __forceinline__ simbf16::bf16 from_float<simbf16::bf16>(float v) {
  return simbf16::round_to_bf16(v);
}
}  // namespace cuda
}  // namespace fused_losses
