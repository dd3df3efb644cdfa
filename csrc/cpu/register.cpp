// Registration of every CPU kernel of csrc/cpu (one place, as csrc/cuda/common.cu does for the
// CUDA kernels): the CPU-only op schemas and the CPU dispatch key's implementations.
#include <torch/library.h>

#include "cpu/ops_cpu.h"

namespace fused_losses {
using namespace fused_losses::cpu_impl;

// The CPU-only ops (no CUDA or emulator kernel; see ghmc_softmax_prepass_cpu and target_range_cpu).
TORCH_LIBRARY_FRAGMENT(fused_losses, m) {
  m.def(
      "ghmc_softmax_prepass(Tensor logits, Tensor target, Tensor(a!)? state, int bins, float momentum, "
      "int ignore_index, Tensor? weight=None) -> (Tensor bin_weights, Tensor row_stats, Tensor unit_grad)");
  m.def(
      "ghmc_softmax_scale(Tensor logits, Tensor target, Tensor bin_weights, Tensor row_stats, Tensor unit_grad, "
      "int ignore_index, str reduction, bool compute_grad, Tensor? weight=None) -> (Tensor loss, Tensor grad_logits)");
  m.def("target_range(Tensor target, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("build_probe", &build_probe_cpu);
  m.impl("softmax_focal_forward", &softmax_focal_forward_cpu);
  m.impl("sigmoid_focal_forward", &sigmoid_focal_forward_cpu);
  m.impl("ohem_forward", &ohem_forward_cpu);
  m.impl("ghmc_bin_weights", &ghmc_bin_weights_cpu);
  m.impl("ghmc_bin_counts", &ghmc_bin_counts_cpu);
  m.impl("ghmc_forward", &ghmc_forward_cpu);
  m.impl("ghmc_softmax_prepass", &ghmc_softmax_prepass_cpu);
  m.impl("ghmc_softmax_scale", &ghmc_softmax_scale_cpu);
  m.impl("target_range", &target_range_cpu);
  m.impl("ib_forward", &ib_forward_cpu);
  m.impl("scale_grad", &scale_grad_cpu);
  m.impl("scale_grad_", &scale_grad_inplace_cpu);
}

}  // namespace fused_losses
