// The backward ops on the CPU: scale_grad (out of place) and scale_grad_ (in place).

#include "cpu/ops_cpu.h"
#include "cpu/softmax.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

// scale_grad_cpu's loops (below): out = s * grad_output, grad_output as a scalar, elementwise or
// broadcast over classes.
template <typename scalar_t, typename T>
void scale_grad_kernel(const T* s, const at::Tensor& grad_output, const at::Tensor& saved, scalar_t* o) {
  const int64_t n = saved.numel();
  const at::ScalarType math = c10::CppTypeToScalarType<T>::value;
  if (grad_output.dim() == 0) {
    const T go = grad_output.to(math).item<T>();
    at::parallel_for(0, n, kWorkGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same<scalar_t, float>::value) {
        cpu::scale_to(o + begin, s + begin, go, end - begin);
      } else {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(s[i] * go);
      }
    });
    return;
  }
  const at::Tensor go_t = grad_output.to(math).contiguous();
  const T* go = go_t.data_ptr<T>();
  if (grad_output.sizes() == saved.sizes()) {
    at::parallel_for(0, n, kWorkGrain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same<scalar_t, float>::value) {
        cpu::multiply_to(o + begin, s + begin, go + begin, end - begin);
      } else {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(s[i] * go[i]);
      }
    });
    return;
  }
  TORCH_CHECK(saved.dim() >= 2 && grad_output.dim() == saved.dim() - 1 && grad_output.size(0) == saved.size(0) &&
                  grad_output.sizes().slice(1) == saved.sizes().slice(2),
              "scale_grad: grad_output of shape ", grad_output.sizes(), " does not fit saved_grad of shape ",
              saved.sizes());
  const SoftmaxShape sh = softmax_shape(saved);
  const int64_t C = sh.C, S = sh.S;
  // Rows of S contiguous values (n, c): out[n, c, :] = saved[n, c, :] * go[n, :].
  parallel_for_balanced(0, sh.N * C, std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(S, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t nc = begin; nc < end; ++nc) {
                       const T* gr = go + (nc / C) * S;
                       const T* sr = s + nc * S;
                       scalar_t* orow = o + nc * S;
#pragma omp simd
                       for (int64_t j = 0; j < S; ++j) orow[j] = static_cast<scalar_t>(sr[j] * gr[j]);
                     }
                   });
}

// scale_grad_inplace_cpu's pass (below): g *= ratio in the math type T.
template <typename scalar_t, typename T>
void multiply_in_place(scalar_t* g, int64_t n, T ratio) {
  at::parallel_for(0, n, kWorkGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) g[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * ratio);
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------
// scale_grad: out = saved_grad * grad_output as a fresh tensor of `dtype` (the logits dtype),
// saved_grad being in the math dtype of `dtype` (float for fp16/bf16/fp32, double for fp64):
// the product is rounded once. grad_output: 0-dim, saved_grad's shape, or saved_grad's shape
// without dim 1 (broadcast over classes). Reads saved_grad and grad_output once, writes once.
// ------------------------------------------------------------------------------------------
at::Tensor scale_grad_cpu(const at::Tensor& saved_in, const at::Tensor& grad_output, at::ScalarType dtype) {
  const at::Tensor saved = saved_in.contiguous();
  TORCH_CHECK(saved.scalar_type() == at::toOpMathType(dtype), "scale_grad: saved_grad must be in the math dtype ",
              at::toOpMathType(dtype), " of ", dtype, ", got ", saved.scalar_type());
  at::Tensor out = empty_output(saved.sizes(), saved.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "scale_grad", [&] {
    using T = at::opmath_type<scalar_t>;
    scale_grad_kernel<scalar_t, T>(saved.data_ptr<T>(), grad_output, saved, out.data_ptr<scalar_t>());
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// scale_grad_: in-place backward of a reduced loss whose gradient is saved in the logits dtype
// (csrc/ops.cpp). grad holds saved * applied_scale; afterwards saved * grad_output. Equal
// scalars (the common loss.backward(): both 1): nothing beyond the two scalars is touched.
// Otherwise one pass grad *= grad_output / applied_scale (computed in the math type T, one
// rounding per element), then applied_scale = grad_output.
// ------------------------------------------------------------------------------------------
void scale_grad_inplace_cpu(const at::Tensor& grad, const at::Tensor& grad_output, const at::Tensor& applied_scale) {
  const at::ScalarType math = at::toOpMathType(grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "scale_grad_: grad must be contiguous (the saved gradient of a forward op)");
  TORCH_CHECK(grad_output.numel() == 1, "scale_grad_: grad_output must hold one value (a reduced loss's gradient), got shape ",
              grad_output.sizes());
  TORCH_CHECK(applied_scale.numel() == 1 && applied_scale.scalar_type() == math && applied_scale.is_contiguous(),
              "scale_grad_: applied_scale must be one ", math, " value, got ", applied_scale.scalar_type(), " of shape ",
              applied_scale.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_", [&] {
    using T = at::opmath_type<scalar_t>;
    const T wanted = grad_output.to(math).item<T>();  // a CPU tensor: no device sync
    T* applied = applied_scale.data_ptr<T>();
    if (wanted == *applied) return;
    multiply_in_place(grad.data_ptr<scalar_t>(), grad.numel(), wanted / *applied);
    *applied = wanted;
  });
}

}  // namespace cpu_impl
}  // namespace fused_losses
