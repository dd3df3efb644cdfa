// The shared kernels of the fused_losses CUDA ops (loss partials, 'mean' counts, build probe)
// and the registration of every op's host function. Conventions: common.cuh.
#include "cuda/common.cuh"

namespace fused_losses {
namespace cuda {

void count_valid_into(int64_t* out, const CountSpec& spec, int64_t n) {
  if (n == 0) return;
  const bool plain = spec.target != nullptr && spec.per_target == 1 && spec.weight == nullptr && spec.mult == 1;
  const auto kernel = plain ? count_valid_kernel<false> : count_valid_kernel<true>;
  const int64_t blocks = grid_for(kernel, n, kThreads * 4);
  FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(spec, n, out);
  FL_KERNEL_LAUNCH_CHECK();
}

at::Tensor count_valid(const at::Tensor& target, int64_t ignore_index, int64_t upper, const float* weight) {
  at::Tensor count = at::zeros({1}, target.options().dtype(at::kLong));
  CountSpec spec;
  spec.target = target.numel() > 0 ? target.data_ptr<int64_t>() : nullptr;
  spec.ignore_index = ignore_index;
  spec.upper = upper;
  spec.weight = weight;
  count_valid_into(count.data_ptr<int64_t>(), spec, target.numel());
  return count;
}

// Loss output of a reduced ('mean'/'sum') call: sums the partials and writes the 0-dim float32.
void finish_loss(const at::Tensor& partials, const MeanCount& count, Reduction reduction, const at::Tensor& out) {
  FL_LAUNCH(1, kThreads, 0, current_stream(), finish_loss_kernel<>)(partials.data_ptr<double>(), partials.numel(), count,
                                                           reduction == Reduction::Mean, out.data_ptr<float>());
  FL_KERNEL_LAUNCH_CHECK();
}

at::Tensor build_probe_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "build_probe: x must be float32, got ", x.scalar_type());
  const DeviceGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  FL_LAUNCH(blocks, threads, 0, current_stream(), build_probe_kernel<>)(
      xc.data_ptr<float>(), y.data_ptr<float>(), n);
  FL_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace cuda
}  // namespace fused_losses

namespace fused_losses {
using namespace fused_losses::cuda;

// Registered for the CUDA dispatch key of the fused_losses ops (the emulated test build:
// the CPU key of fused_losses_emu; csrc/cuda/platform.cuh).
TORCH_LIBRARY_IMPL(FL_OPS_NAMESPACE, FL_KERNEL_DISPATCH_KEY, m) {
  m.impl("build_probe", &build_probe_cuda);
  m.impl("softmax_focal_forward", &softmax_focal_forward_cuda);
  m.impl("sigmoid_focal_forward", &sigmoid_focal_forward_cuda);
  m.impl("ohem_forward", &ohem_forward_cuda);
  m.impl("ghmc_bin_weights", &ghmc_bin_weights_cuda);
  m.impl("ghmc_bin_counts", &ghmc_bin_counts_cuda);
  m.impl("ghmc_forward", &ghmc_forward_cuda);
  m.impl("ib_forward", &ib_forward_cuda);
  m.impl("scale_grad", &scale_grad_cuda);
  m.impl("scale_grad_", &scale_grad_inplace_cuda);
}

}  // namespace fused_losses
