// Shared host utilities of the CPU kernels (the out-of-line ones: the output pool), the build
// probe, target_range (the validation scan of integer targets) and the registration of every
// CPU kernel of csrc/cpu (one list, as csrc/cuda/common.cu registers the CUDA kernels; here
// rather than in a file of its own, which would cost one more parse of the torch headers).
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/ops_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_losses {

// y = 2 * x + 1 over a contiguous float32 tensor. Reads x once, writes y once.
at::Tensor build_probe_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "build_probe: x must be float32, got ", x.scalar_type());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* in = xc.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, xc.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = 2.0f * in[i] + 1.0f;
  });
  return y;
}

namespace cpu_impl __attribute__((visibility("hidden"))) {
namespace {

// at::empty for the big outputs (gradients, elementwise losses). A fresh multi-megabyte buffer
// costs more in first-touch page faults than the whole kernel (4 KiB pages: measured ~75 ms for
// 84 MB on the 2-core CI machine, against ~12 ms to write it); asking for transparent huge
// pages before the first write cuts the faults ~500x. Linux only, advisory (no effect where
// THP is off), the same thing torch's THP_MEM_ALLOC_ENABLE=1 does for every allocation.
void advise_huge_pages(const at::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // FUSED_LOSSES_HUGE_PAGES=0 turns the advice off (read once).
  static const bool enabled = [] {
    const char* flag = std::getenv("FUSED_LOSSES_HUGE_PAGES");
    return flag == nullptr || flag[0] != '0';
  }();
  if (!enabled) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t aligned_begin = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t aligned_end = end & ~(kHuge - 1);
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#endif
}

// A few recently returned big output storages, kept so that the next call of the same shape
// (the next training step) writes into memory that is already mapped instead of faulting in
// fresh pages. A storage is handed out again only when this pool holds its only reference
// (storage use_count 1: no tensor, view, autograd saved variable or Python object refers to
// it), so a reused buffer can never be observed by anyone else. Like a caching allocator it
// keeps up to kPoolSize buffers alive between steps; FUSED_LOSSES_OUTPUT_POOL=0 turns it off.
class OutputPool {
 public:
  static OutputPool& instance() {
    static OutputPool pool;
    return pool;
  }

  at::Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options, size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (c10::Storage& storage : free_) {
      if (storage.use_count() == 1 && storage.nbytes() == nbytes) {
        return at::empty({0}, options).set_(storage, 0, sizes);
      }
    }
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out);
    if (free_.size() >= kPoolSize) {
      // Replace a storage nobody uses any more, else keep the pool as it is.
      for (c10::Storage& storage : free_) {
        if (storage.use_count() == 1) {
          storage = out.storage();
          return out;
        }
      }
      return out;
    }
    free_.push_back(out.storage());
    return out;
  }

 private:
  static constexpr size_t kPoolSize = 4;
  std::mutex mutex_;
  std::vector<c10::Storage> free_;
};

}  // namespace

// at::empty for the big outputs (gradients, elementwise losses). A fresh multi-megabyte buffer
// costs more in first-touch page faults than the whole kernel (4 KiB pages: measured ~75 ms for
// 84 MB on the 2-core CI machine, against ~12 ms to write it). Buffers of 1 MiB and more come
// from OutputPool (already-mapped memory of an earlier step) or, when new, are advised to use
// transparent huge pages before the first write (Linux only; what torch's
// THP_MEM_ALLOC_ENABLE=1 does for every allocation).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool pool_enabled = [] {
    const char* flag = std::getenv("FUSED_LOSSES_OUTPUT_POOL");
    return flag == nullptr || flag[0] != '0';
  }();
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes < (size_t(1) << 20) || options.device().type() != at::kCPU) return at::empty(sizes, options);
  if (pool_enabled) return OutputPool::instance().take(sizes, options, nbytes);
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

// ------------------------------------------------------------------------------------------
// target_range: int64 [min, max, count] of the entries of an integer target that are not
// ignore_index, in one parallel pass (min/max meaningless when count is 0). What
// _validate._check_range reads for a CPU target: one pass instead of torch.where + aminmax.
// ------------------------------------------------------------------------------------------
at::Tensor target_range_cpu(const at::Tensor& target_in, int64_t ignore_index) {
  TORCH_CHECK(target_in.scalar_type() == at::kLong || target_in.scalar_type() == at::kInt,
              "target_range: int64 or int32 target, got ", target_in.scalar_type());
  // int64 as every loss reads it (index_target); an int32 target is widened first.
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t* t = target.data_ptr<int64_t>();
  using Range = cpu::IndexRange;
  auto merge = [](Range a, Range b) { return Range{std::min(a.lo, b.lo), std::max(a.hi, b.hi), a.count + b.count}; };
  const Range r = at::parallel_reduce(
      0, target.numel(), kWorkGrain, Range{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(), 0},
      [&](int64_t begin, int64_t end, Range acc) {
        return merge(acc, cpu::index_range(t + begin, end - begin, ignore_index));  // the SIMD scan
      },
      merge);
  at::Tensor out = at::empty({3}, target.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  o[0] = r.lo;
  o[1] = r.hi;
  o[2] = r.count;
  return out;
}

}  // namespace cpu_impl

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
