// Shared host utilities of the CPU kernels of fused_losses (registered for the CPU dispatch key
// at the end of csrc/cpu/common.cpp; one file per loss family, as csrc/cuda: csrc/DESIGN.md "Files").
//
// Layout. Softmax-family logits are viewed as (N, C, S) with S = prod(d...) (S = 1 for (N, C)):
// row r = n * S + s holds classes at offsets n*C*S + c*S + s. For S = 1 a row is contiguous
// and the loops vectorise over classes; for S > 1 (channel-second segmentation input, no
// permute copy) a tile of tile_width(C) consecutive spatial positions is processed together and the
// loops vectorise over the tile. Sigmoid-family logits are (M, C) rows, elementwise.
//
// Math runs in T = float for fp16/bf16/fp32 and T = double for fp64 (at::opmath_type), with
// the formulas of csrc/losses_math.h (shared with the CUDA kernels).
//
// Determinism: each row's value depends only on that row; every reduction over rows sums per
// fixed-size chunk (independent of the thread count) and then adds the chunk sums in order,
// so results are bitwise identical from run to run and for any number of threads.
#pragma once

// Only the ATen headers the kernels use (not <ATen/ATen.h>, all of whose ~2k operator headers
// each csrc/cpu file would parse again: a third of a small file's compile time).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/promote_types.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <mutex>
#include <vector>

#include "cpu/simd_kernels.h"
#include "losses_math.h"

namespace fused_losses {
// Internal to the _C extension: hidden from the dynamic symbol table (as the anonymous
// namespace of the single file kept it), one definition per name across the csrc/cpu files.
namespace cpu_impl __attribute__((visibility("hidden"))) {

using namespace fused_losses::math;

// ------------------------------------------------------------------------------------------
// Small host utilities
// ------------------------------------------------------------------------------------------
enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  TORCH_CHECK(false, "reduction: expected 'none', 'mean' or 'sum', got '", std::string(name), "'");
}

constexpr int64_t kTile = cpu::kMaxTile; // most spatial positions per tile (channel-second input)

// Tile width of channel-second input: as many consecutive positions as keep the tile's logits
// (and its exponential scratch) within ~64 KiB, in multiples of 64 between 64 and kTile. Long
// tiles read each class row in long contiguous runs (hardware prefetch follows one stream at a
// time instead of C short ones: 19 classes x 64 positions measured 4 ms of 12 on the 2-core
// EPYC), and the tile stays in L2 for its exponential and gradient passes.
inline int64_t tile_width(int64_t C) {
  const int64_t w = (int64_t(65536) / (4 * std::max<int64_t>(C, 1))) / 64 * 64;
  return std::min<int64_t>(kTile, std::max<int64_t>(64, w));
}
constexpr int64_t kSumChunk = 4096;   // values per chunk of the ordered sums
constexpr int64_t kWorkGrain = 32768; // elements of work per parallel_for grain
constexpr int64_t kChunksPerGrain = kWorkGrain / kSumChunk;

// Drop-in extras (csrc/op_schemas.h). weight: the tensor in the math dtype `math`, contiguous and
// flattened, with one of the `allowed` numbers of values; undefined when not given.
inline at::Tensor extra_weight(const c10::optional<at::Tensor>& weight, at::ScalarType math,
                        std::initializer_list<int64_t> allowed) {
  if (!weight.has_value()) return at::Tensor();
  const at::Tensor w = weight->to(math).contiguous().reshape({-1});
  bool ok = false;
  for (int64_t n : allowed) ok |= w.numel() == n;
  TORCH_CHECK(ok, "weight: expected ", std::vector<int64_t>(allowed), " values, got ", w.numel());
  return w;
}

template <typename T>
const T* weight_ptr(const at::Tensor& w) {
  return w.defined() ? w.data_ptr<T>() : nullptr;
}

inline void check_label_smoothing(double eps) {
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, "label_smoothing: expected a value in [0, 1], got ", eps);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// at::parallel_for's contract (fn(begin, end) over disjoint ranges covering [begin, end), each
// index's work independent of the range it comes in) with the ranges handed out one grain at a
// time from a shared counter instead of one fixed slice per thread. A thread that runs slower
// (a busy core, a VM's vCPU losing time to its host) takes fewer grains, where with fixed slices
// the others wait for it at the end. The ranges are a grain each (the last shorter), the same
// for every thread count, so nothing computed in them depends on the scheduling.
template <typename Fn>
void parallel_for_balanced(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  if (begin >= end) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t blocks = ceil_div(end - begin, grain);
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < blocks; ++b) fn(begin + b * grain, std::min(end, begin + (b + 1) * grain));
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next.fetch_add(1, std::memory_order_relaxed))
      fn(begin + b * grain, std::min(end, begin + (b + 1) * grain));
  });
}

// sum_i v[i] in double: chunks of kSumChunk summed in parallel, chunk sums added in order.
template <typename T>
double ordered_sum(const T* v, int64_t n) {
  const int64_t chunks = ceil_div(n, kSumChunk);
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      double s = 0.0;
      const int64_t hi = std::min(n, (ch + 1) * kSumChunk);
      for (int64_t i = ch * kSumChunk; i < hi; ++i) s += static_cast<double>(v[i]);
      partial[ch] = s;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

inline at::ScalarType reduced_dtype(const at::Tensor& logits) {
  return at::promote_types(logits.scalar_type(), at::kFloat);
}

// 'mean' / 'sum' result as a 0-dim tensor of promote_types(logits, float32).
inline at::Tensor reduced_loss(const at::Tensor& logits, double total, double count, Reduction reduction) {
  const double value = reduction == Reduction::Mean ? total / std::max(count, 1.0) : total;
  return at::scalar_tensor(value, logits.options().dtype(reduced_dtype(logits)));
}

// Per-row (or per-element) losses in T -> the op's loss output.
template <typename scalar_t, typename T>
at::Tensor finish_loss(const at::Tensor& logits, const std::vector<T>& row_loss, at::IntArrayRef none_shape,
                       double count, Reduction reduction) {
  if (reduction != Reduction::None) {
    return reduced_loss(logits, ordered_sum(row_loss.data(), static_cast<int64_t>(row_loss.size())), count, reduction);
  }
  at::Tensor out = at::empty(none_shape, logits.options());
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t n = static_cast<int64_t>(row_loss.size());
  at::parallel_for(0, n, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(row_loss[i]);
  });
  return out;
}

// at::empty for the big outputs (gradients, elementwise losses). A fresh multi-megabyte buffer
// costs more in first-touch page faults than the whole kernel (4 KiB pages: measured ~75 ms for
// 84 MB on the 2-core CI machine, against ~12 ms to write it). Buffers of 1 MiB and more come
// from OutputPool (already-mapped memory of an earlier step) or, when new, are advised to use
// transparent huge pages before the first write (Linux only; what torch's
// THP_MEM_ALLOC_ENABLE=1 does for every allocation). csrc/cpu/common.cpp (one pool per process).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// dtype of a forward op's logits gradient (csrc/ops.cpp; fused_losses/_ops.py saved_grad_dtype):
// the logits dtype for 'mean'/'sum' with bf16/fp32/fp64 logits (the backward scales it in place,
// scale_grad_), else the math dtype ('none', fp16: float32; the backward is scale_grad).
inline at::ScalarType saved_grad_dtype(at::ScalarType logits_dtype, Reduction reduction) {
  if (reduction != Reduction::None && logits_dtype != at::kHalf) return logits_dtype;
  return at::toOpMathType(logits_dtype);
}

// Gradient buffer of a forward op, in saved_grad_dtype. Empty (0,) when not needed.
inline at::Tensor grad_buffer(const at::Tensor& logits, bool compute_grad, Reduction reduction) {
  const at::TensorOptions options = logits.options().dtype(saved_grad_dtype(logits.scalar_type(), reduction));
  return compute_grad ? empty_output(logits.sizes(), options) : at::empty({0}, options);
}

// Calls body(G* grad) with the gradient typed as it was allocated: T (the math type) or, for
// bf16 logits with a reduced loss, scalar_t (each value computed in T and rounded once). The
// scalar_t variant is compiled for bf16 only (fp32/fp64: scalar_t == T; fp16: always T).
// body(nullptr as T*) when no gradient is wanted.
template <typename scalar_t, typename T, typename Body>
void with_grad_ptr(const at::Tensor& grad, bool compute_grad, Body&& body) {
  if (!compute_grad) {
    body(static_cast<T*>(nullptr));
    return;
  }
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value) {
    if (grad.scalar_type() == at::kBFloat16) {
      body(grad.data_ptr<scalar_t>());
      return;
    }
  }
  body(grad.data_ptr<T>());
}

// Rows with target != ignore_index (and weight != 0 when a weight is given: GHM-C's valid rows).
template <typename T = float>
int64_t count_valid(const int64_t* target, int64_t n, int64_t ignore_index, const T* weight = nullptr) {
  return at::parallel_reduce(
      0, n, kWorkGrain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t i = begin; i < end; ++i)
          acc += target[i] != ignore_index && (weight == nullptr || weight[i] != T(0));
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

inline void check_class(int64_t t, int64_t high, int64_t ignore_index) {
  TORCH_CHECK(t >= 0 && t < high, "target: value ", t, " is out of range [0, ", high - 1, "] (ignore_index=",
              ignore_index, ")");
}

inline at::Tensor index_target(const at::Tensor& target) { return target.to(at::kLong).contiguous(); }

// Histogram of bin_of(i) over i < n (a bin of [0, bins), or -1: none): per fixed chunk of kSumChunk
// entries in parallel, then the chunk histograms added in order (integers: exact, any thread count).
template <typename BinOf>
std::vector<int64_t> chunked_histogram(int64_t n, int64_t bins, BinOf&& bin_of) {
  const int64_t chunks = ceil_div(n, kSumChunk);
  std::vector<int64_t> per_chunk(chunks * bins, 0);
  parallel_for_balanced(0, chunks, kChunksPerGrain, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      int64_t* h = per_chunk.data() + ch * bins;
      const int64_t hi = std::min(n, (ch + 1) * kSumChunk);
      for (int64_t i = ch * kSumChunk; i < hi; ++i) {
        const int64_t b = bin_of(i);
        if (b >= 0) ++h[b];
      }
    }
  });
  std::vector<int64_t> counts(bins, 0);
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t b = 0; b < bins; ++b) counts[b] += per_chunk[ch * bins + b];
  return counts;
}

}  // namespace cpu_impl
}  // namespace fused_losses
