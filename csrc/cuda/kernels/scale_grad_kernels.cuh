// Backward kernels of fused_losses (no ATen; csrc/cuda/kernels/device.cuh): scale_grad (a fresh
// scaled copy) and scale_grad_ (the in-place rescale of a reduced loss's saved gradient).
// Launchers: csrc/cuda/scale_grad.cu.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

// ==========================================================================================
// scale_grad: out = dtype(saved_grad * grad_output), a fresh tensor; saved_grad is the float32
// (math dtype) gradient of a forward op, so the product is rounded once, into `dtype`. The
// backward of 'none' losses, of fp16 logits (every reduction) and of IB's feature gradient;
// reduced bf16/fp32 losses use the in-place scale_grad_ below.
// grad_output is a 0-dim tensor read on the device (no host read), or has saved_grad's shape
// (elementwise), or saved_grad's shape without dim 1 (softmax 'none': one value per row (n, s),
// broadcast over the classes). Traffic per element: 4 bytes read, sizeof(dtype) written
// (+ one grad_output read when elementwise).
// ==========================================================================================
enum class ScaleMode : int { Scalar, Elementwise, PerRow };

template <typename out_t, typename go_t>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(const float* __restrict__ saved,
                                                              const go_t* __restrict__ grad_output, ScaleMode mode,
                                                              int64_t numel, int64_t C, int64_t S,
                                                              out_t* __restrict__ out) {
  constexpr int VEC = 4;  // 16 bytes of float32 per load
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (mode == ScaleMode::PerRow) {
    // Element (n, c, s) at i = (n * C + c) * S + s scales by grad_output[n * S + s].
    for (int64_t i = first; i < numel; i += stride) {
      const int64_t ns = i / S;
      const int64_t s = i - ns * S;
      const int64_t n = ns / C;
      out[i] = from_float<out_t>(saved[i] * to_float(grad_output[n * S + s]));
    }
    return;
  }
  const float go_scalar = mode == ScaleMode::Scalar ? to_float(grad_output[0]) : 0.0f;
  const int64_t packs = numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<float, VEC> in = load_pack<VEC>(saved + p * VEC);
    Pack<out_t, VEC> res;
    if (mode == ScaleMode::Scalar) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) res.v[e] = from_float<out_t>(in.v[e] * go_scalar);
    } else {
      const Pack<go_t, VEC> go = load_pack<VEC>(grad_output + p * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) res.v[e] = from_float<out_t>(in.v[e] * to_float(go.v[e]));
    }
    store_pack<VEC>(out + p * VEC, res);
  }
  for (int64_t i = packs * VEC + first; i < numel; i += stride) {
    const float go = mode == ScaleMode::Scalar ? go_scalar : to_float(grad_output[i]);
    out[i] = from_float<out_t>(saved[i] * go);
  }
}

// ==========================================================================================
// scale_grad_: in-place backward of a reduced loss whose gradient is saved in the logits dtype
// (csrc/ops.cpp; bf16 or fp32 'mean'/'sum' forwards; fp16 accepted for generality):
//   scale_grad_(Tensor(a!) grad, Tensor grad_output, Tensor(b!) applied_scale) -> ()
// grad holds saved * applied_scale; after the call it holds saved * grad_output, and
// applied_scale == grad_output. Both scalars are float32 on the device and are read by the
// kernels (no host read, no sync). rescale_grad_inplace_kernel reads both in every block: when
// they are equal (the common loss.backward(): both 1.0) every block returns at once, and no
// element of grad is read or written. Otherwise one pass
//   grad[i] = grad_t(float(grad[i]) * (grad_output / applied_scale))
// (the ratio in float32, one rounding per element; a retained graph's second backward rescales
// from what the first one applied, so nothing is scaled twice). Then a one-thread launch, after
// the rescale kernel in stream order (so after every block has read applied_scale), records
// applied_scale = grad_output. A first backward with grad_output = 0 loses the gradient: a later
// one with another value gives inf/NaN (loud, not silently wrong). Version counters are not
// bumped (the schema's contract: grad is a saved tensor mutated only by this op).
// Traffic: the two scalars per block when equal; else one read + one write of sizeof(grad_t)
// per element, in 16-byte packs when grad is 16-byte aligned (a fresh gradient always is),
// single values otherwise (an offset view is valid input, so alignment is not required).
// ==========================================================================================
template <typename grad_t>
__global__ void __launch_bounds__(kThreads) rescale_grad_inplace_kernel(grad_t* __restrict__ grad, int64_t numel,
                                                                        bool packed,
                                                                        const float* __restrict__ grad_output,
                                                                        const float* __restrict__ applied_scale) {
  const float wanted = grad_output[0];
  const float applied = applied_scale[0];
  if (wanted == applied) return;  // the same decision in every block: nothing is touched
  const float ratio = wanted / applied;
  constexpr int VEC = 16 / sizeof(grad_t);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t tail = 0;  // first element of the single-value loop
  if (packed) {      // grad is 16-byte aligned: packs p cover elements [p * VEC, p * VEC + VEC)
    const int64_t packs = numel / VEC;
    for (int64_t p = first; p < packs; p += stride) {
      Pack<grad_t, VEC> v = load_pack<VEC>(grad + p * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = from_float<grad_t>(to_float(v.v[e]) * ratio);
      store_pack<VEC>(grad + p * VEC, v);
    }
    tail = packs * VEC;
  }
  for (int64_t i = tail + first; i < numel; i += stride) {
    grad[i] = from_float<grad_t>(to_float(grad[i]) * ratio);
  }
}

// applied_scale = grad_output; launched after rescale_grad_inplace_kernel on the same stream.
// A template (instantiated as record_applied_scale_kernel<>) so that the header can be included by every file.
template <typename = void>
__global__ void record_applied_scale_kernel(const float* __restrict__ grad_output, float* __restrict__ applied_scale) {
  applied_scale[0] = grad_output[0];
}

}  // namespace cuda
}  // namespace fused_losses
