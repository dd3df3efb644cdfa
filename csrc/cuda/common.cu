// The shared kernels of the fused_losses CUDA ops (loss partials, 'mean' counts, build probe)
// and the registration of every op's host function. Conventions: common.cuh.
#include "cuda/common.cuh"

namespace fused_losses {
namespace cuda {

// y = 2 * x + 1; grid-stride loop with int64 indices.
__global__ void build_probe_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = 2.0f * in[i] + 1.0f;
  }
}

// Final reduction: loss = sum of the block partials, in block order (one block; thread i sums
// partials i, i + kThreads, ... then the fixed block tree), divided by max(count, 1) for
// 'mean'; written as float32 (the reduced loss dtype of fp16/bf16/fp32 inputs).
// Traffic: 8 bytes per block of the loss kernel.
__global__ void __launch_bounds__(kThreads) finish_loss_kernel(const double* __restrict__ partials, int64_t n,
                                                               MeanCount count, bool mean, float* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partials[i];
  const double total = block_sum(s);
  if (threadIdx.x == 0) {
    double value = total;
    if (mean) {
      const int64_t c = mean_count(count);
      value /= static_cast<double>(c > 1 ? c : int64_t(1));
    }
    out[0] = static_cast<float>(value);
  }
}

// count[0] += spec.mult x the number of valid entries i < n (CountSpec, common.cuh: target
// value target[i / per_target] != ignore_index and in [0, upper), weight[i] != 0 when given;
// count zeroed by the caller). Out-of-range targets are not counted: the loss kernels assert on
// them and treat the row as ignored, so the 'mean' denominator and GHM-C's n_valid must too.
// Per block an integer sum, then one integer atomic per block (exact). Traffic: 8 bytes per
// target value (+ 4 per weight).
// kGeneral: the instance for every CountSpec; the plain one (a target per entry, no weight, mult
// 1: the 'mean' count of the no-extras losses) keeps the registers it had before the extras.
template <bool kGeneral>
__global__ void __launch_bounds__(kThreads) count_valid_kernel(const CountSpec spec, int64_t n,
                                                               int64_t* __restrict__ count) {
  long long local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    if constexpr (kGeneral) {
      bool valid = true;
      if (spec.target != nullptr) {
        const int64_t t = spec.target[spec.per_target == 1 ? i : i / spec.per_target];
        valid = t != spec.ignore_index && t >= 0 && t < spec.upper;
      }
      if (spec.weight != nullptr) valid = valid && spec.weight[i] != 0.0f;
      local += valid;
    } else {
      const int64_t t = spec.target[i];
      local += t != spec.ignore_index && t >= 0 && t < spec.upper;
    }
  }
  const long long total = block_sum(local);
  if (threadIdx.x == 0 && total != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(total * spec.mult));
  }
}

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
  FL_LAUNCH(1, kThreads, 0, current_stream(), finish_loss_kernel)(partials.data_ptr<double>(), partials.numel(), count,
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
  FL_LAUNCH(blocks, threads, 0, current_stream(), build_probe_kernel)(
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
