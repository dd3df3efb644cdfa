// scale_grad and scale_grad_ of fused_losses: the backward of every forward op (a fresh scaled
// copy, or the in-place rescale of a reduced loss's saved gradient). Conventions: common.cuh.
#include "cuda/softmax.cuh"

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
      out[i] = static_cast<out_t>(saved[i] * static_cast<float>(grad_output[n * S + s]));
    }
    return;
  }
  const float go_scalar = mode == ScaleMode::Scalar ? static_cast<float>(grad_output[0]) : 0.0f;
  const int64_t packs = numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const Pack<float, VEC> in = load_pack<VEC>(saved + p * VEC);
    Pack<out_t, VEC> res;
    if (mode == ScaleMode::Scalar) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) res.v[e] = static_cast<out_t>(in.v[e] * go_scalar);
    } else {
      const Pack<go_t, VEC> go = load_pack<VEC>(grad_output + p * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) res.v[e] = static_cast<out_t>(in.v[e] * static_cast<float>(go.v[e]));
    }
    store_pack<VEC>(out + p * VEC, res);
  }
  for (int64_t i = packs * VEC + first; i < numel; i += stride) {
    const float go = mode == ScaleMode::Scalar ? go_scalar : static_cast<float>(grad_output[i]);
    out[i] = static_cast<out_t>(saved[i] * go);
  }
}

at::Tensor scale_grad_cuda(const at::Tensor& saved_in, const at::Tensor& grad_output_in, at::ScalarType dtype) {
  const DeviceGuard guard(saved_in.device());
  check_same_device(grad_output_in, saved_in, "grad_output");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "scale_grad: the CUDA kernel makes float32, float16 or bfloat16 gradients, got ", dtype);
  TORCH_CHECK(saved_in.scalar_type() == at::kFloat, "scale_grad: saved_grad must be in the math dtype float32 of ",
              dtype, ", got ", saved_in.scalar_type());
  const at::ScalarType go_dtype = grad_output_in.scalar_type();
  TORCH_CHECK(go_dtype == at::kFloat || go_dtype == at::kHalf || go_dtype == at::kBFloat16,
              "scale_grad: grad_output must be float32, float16 or bfloat16 on CUDA, got ", go_dtype);
  const at::Tensor saved = aligned_contiguous(saved_in, 16);
  at::Tensor out = at::empty(saved.sizes(), saved.options().dtype(dtype));
  const int64_t numel = saved.numel();
  ScaleMode mode;
  int64_t C = 1, S = 1;
  if (grad_output_in.dim() == 0) {
    mode = ScaleMode::Scalar;
  } else if (grad_output_in.sizes() == saved.sizes()) {
    mode = ScaleMode::Elementwise;
  } else {
    TORCH_CHECK(saved.dim() >= 2 && grad_output_in.dim() == saved.dim() - 1 &&
                    grad_output_in.size(0) == saved.size(0) &&
                    grad_output_in.sizes().slice(1) == saved.sizes().slice(2),
                "scale_grad: grad_output of shape ", grad_output_in.sizes(), " does not fit saved_grad of shape ",
                saved.sizes());
    mode = ScaleMode::PerRow;
    const SoftmaxShape sh = softmax_shape(saved);
    C = sh.C;
    S = sh.S;
  }
  if (numel == 0) return out;
  const at::Tensor grad_output = aligned_contiguous(grad_output_in, 4 * at::elementSize(go_dtype));
  FL_DISPATCH_CUDA_FLOATING_TYPES(dtype, "scale_grad_cuda", [&] {
    using out_t = scalar_t;
    FL_DISPATCH_CUDA_FLOATING_TYPES(go_dtype, "scale_grad_cuda", [&] {
      const int64_t blocks = grid_for(scale_grad_kernel<out_t, scalar_t>, numel, kThreads * 8);
      FL_LAUNCH(blocks, kThreads, 0, current_stream(), scale_grad_kernel<out_t, scalar_t>)(
          saved.data_ptr<float>(), grad_output.data_ptr<scalar_t>(), mode, numel, C, S, out.data_ptr<out_t>());
      FL_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
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
      for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<grad_t>(static_cast<float>(v.v[e]) * ratio);
      store_pack<VEC>(grad + p * VEC, v);
    }
    tail = packs * VEC;
  }
  for (int64_t i = tail + first; i < numel; i += stride) {
    grad[i] = static_cast<grad_t>(static_cast<float>(grad[i]) * ratio);
  }
}

// applied_scale = grad_output; launched after rescale_grad_inplace_kernel on the same stream.
__global__ void record_applied_scale_kernel(const float* __restrict__ grad_output, float* __restrict__ applied_scale) {
  applied_scale[0] = grad_output[0];
}

// The C++ signature must be the one of every other backend's kernel of this op (the dispatcher
// rejects a second kernel with another signature when the library loads): the CPU kernel
// (csrc/cpu/losses_cpu.cpp, scale_grad_inplace_cpu) takes three const references, so this one
// does too; the tensors' data are written through data_ptr, which const does not restrict.
void scale_grad_inplace_cuda(const at::Tensor& grad, const at::Tensor& grad_output, const at::Tensor& applied_scale) {
  TORCH_CHECK(on_kernel_device(grad), "scale_grad_: grad must be a ", kKernelDeviceName, " tensor, got ", grad.device());
  const DeviceGuard guard(grad.device());
  check_same_device(grad_output, grad, "scale_grad_: grad_output");
  check_same_device(applied_scale, grad, "scale_grad_: applied_scale");
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "scale_grad_: grad must be float32, bfloat16 or float16 on CUDA (the saved gradient of a reduced "
              "loss), got ", dtype);
  TORCH_CHECK(grad.is_contiguous(), "scale_grad_: grad must be contiguous (the saved gradient of a forward op), got "
              "shape ", grad.sizes(), " with strides ", grad.strides());
  TORCH_CHECK(grad_output.numel() == 1 && grad_output.scalar_type() == at::kFloat,
              "scale_grad_: grad_output must be a 0-dim float32 tensor (the gradient of a reduced loss), got ",
              grad_output.scalar_type(), " of shape ", grad_output.sizes());
  TORCH_CHECK(applied_scale.numel() == 1 && applied_scale.scalar_type() == at::kFloat,
              "scale_grad_: applied_scale must be a 0-dim float32 tensor (the scale grad carries), got ",
              applied_scale.scalar_type(), " of shape ", applied_scale.sizes());
  const cudaStream_t stream = current_stream();
  const int64_t numel = grad.numel();
  if (numel > 0) {
    const bool packed = aligned_to(grad.data_ptr(), 16);
    FL_DISPATCH_CUDA_FLOATING_TYPES(dtype, "scale_grad_inplace_cuda", [&] {
      const int64_t blocks = grid_for(rescale_grad_inplace_kernel<scalar_t>, numel, kThreads * 8);
      FL_LAUNCH(blocks, kThreads, 0, stream, rescale_grad_inplace_kernel<scalar_t>)(
          grad.data_ptr<scalar_t>(), numel, packed, grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
      FL_KERNEL_LAUNCH_CHECK();
    });
  }
  FL_LAUNCH(1, 1, 0, stream, record_applied_scale_kernel)(grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
  FL_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fused_losses
