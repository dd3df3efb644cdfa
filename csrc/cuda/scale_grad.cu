// scale_grad and scale_grad_ of fused_losses: the backward of every forward op (a fresh scaled
// copy, or the in-place rescale of a reduced loss's saved gradient). Conventions: common.cuh.
#include "cuda/softmax.cuh"
#include "cuda/kernels/scale_grad_kernels.cuh"

namespace fused_losses {
namespace cuda {


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
          saved.data_ptr<float>(), data_of<scalar_t>(grad_output), mode, numel, C, S, data_of<out_t>(out));
      FL_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
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
          data_of<scalar_t>(grad), numel, packed, grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
      FL_KERNEL_LAUNCH_CHECK();
    });
  }
  FL_LAUNCH(1, 1, 0, stream, record_applied_scale_kernel<>)(grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
  FL_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fused_losses
