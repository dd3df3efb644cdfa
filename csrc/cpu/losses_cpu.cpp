// CPU kernels of fused_losses (registered for the CPU dispatch key).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/simd_kernels.h"
#include "losses_math.h"

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

namespace {

using namespace fused_losses::math;

// ------------------------------------------------------------------------------------------
// Small host utilities
// ------------------------------------------------------------------------------------------
enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view name) {
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
at::Tensor extra_weight(const c10::optional<at::Tensor>& weight, at::ScalarType math,
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

void check_label_smoothing(double eps) {
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, "label_smoothing: expected a value in [0, 1], got ", eps);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

at::ScalarType reduced_dtype(const at::Tensor& logits) {
  return at::promote_types(logits.scalar_type(), at::kFloat);
}

// 'mean' / 'sum' result as a 0-dim tensor of promote_types(logits, float32).
at::Tensor reduced_loss(const at::Tensor& logits, double total, double count, Reduction reduction) {
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

// dtype of a forward op's logits gradient (csrc/ops.cpp; fused_losses/_ops.py saved_grad_dtype):
// the logits dtype for 'mean'/'sum' with bf16/fp32/fp64 logits (the backward scales it in place,
// scale_grad_), else the math dtype ('none', fp16: float32; the backward is scale_grad).
at::ScalarType saved_grad_dtype(at::ScalarType logits_dtype, Reduction reduction) {
  if (reduction != Reduction::None && logits_dtype != at::kHalf) return logits_dtype;
  return at::toOpMathType(logits_dtype);
}

// Gradient buffer of a forward op, in saved_grad_dtype. Empty (0,) when not needed.
at::Tensor grad_buffer(const at::Tensor& logits, bool compute_grad, Reduction reduction) {
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

// ------------------------------------------------------------------------------------------
// Softmax rows
// ------------------------------------------------------------------------------------------
struct SoftmaxShape {
  int64_t N, C, S;
  int64_t rows() const { return N * S; }
};

SoftmaxShape softmax_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 2, "logits: expected (N, C) or (N, C, d...), got ", logits.sizes());
  int64_t s = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) s *= logits.size(d);
  return {logits.size(0), logits.size(1), s};
}

at::Tensor index_target(const at::Tensor& target) { return target.to(at::kLong).contiguous(); }

// Max, exponentials e_c = exp(x_c - max) (kept in `e`, w values per class) and their sums for
// the w rows of one tile: rows j = 0..w-1 at x[c * class_stride + j], target t[j] (-1: none);
// row_sum over every class, sum_others without the target column (log_softmax_target_sums).
// Unit stride: w = 1. The generic loops (fp64, bf16, fp16); fp32 takes cpu::softmax_row/tile.
template <bool kUnitStride, typename scalar_t, typename T>
inline void tile_exp_sums(const scalar_t* x, int64_t C, int64_t class_stride, int64_t w, const int32_t* t, T* e,
                          T* row_max, T* row_sum, T* sum_others) {
  if (kUnitStride) {
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const T v = static_cast<T>(x[c]);
      m = v > m ? v : m;
    }
    T s = 0, so = 0;
    const int64_t tc = t[0];
#pragma omp simd reduction(+ : s, so)
    for (int64_t c = 0; c < C; ++c) {
      const T v = exp_vectorizable(static_cast<T>(x[c]) - m);
      e[c] = v;
      s += v;
      so += c == tc ? T(0) : v;
    }
    row_max[0] = m;
    row_sum[0] = s;
    sum_others[0] = so;
  } else {
    for (int64_t j = 0; j < w; ++j) {
      row_max[j] = -std::numeric_limits<T>::infinity();
      row_sum[j] = 0;
      sum_others[j] = 0;
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + c * class_stride;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const T v = static_cast<T>(xr[j]);
        row_max[j] = v > row_max[j] ? v : row_max[j];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + c * class_stride;
      T* er = e + c * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const T v = exp_vectorizable(static_cast<T>(xr[j]) - row_max[j]);
        er[j] = v;
        row_sum[j] += v;
        sum_others[j] += c == t[j] ? T(0) : v;
      }
    }
  }
}

// What a softmax row gives its row function: l = log p_t (exact at every margin:
// log_softmax_target_sums), p_t = e_t / s and 1 - p_t = sum_others / s (exact relative, no
// cancellation, no transcendental call), the row max m and s = sum_c e^{x_c - m}.
template <typename T>
struct SoftmaxRow {
  T log_pt, p_t, one_minus_pt, max, sum, inv_sum;  // inv_sum = 1 / sum
};

// Max, exponentials and sums of a tile (tile_exp_sums; fp32 through the SIMD kernels).
template <bool kUnitStride, typename scalar_t, typename T>
inline void tile_stats(const scalar_t* xt, int64_t C, int64_t class_stride, int64_t w, const int32_t* t, T* e,
                       T* row_max, T* row_sum, T* sum_others) {
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
    if (kUnitStride) {
      const cpu::SoftmaxRowStats st = cpu::softmax_row(xt, C, t[0], e);
      row_max[0] = st.max;
      row_sum[0] = st.sum;
      sum_others[0] = st.sum_others;
    } else {
      cpu::softmax_tile(xt, C, class_stride, w, t, e, row_max, row_sum, sum_others);
    }
  } else {
    tile_exp_sums<kUnitStride>(xt, C, class_stride, w, t, e, row_max, row_sum, sum_others);
  }
}

// The SoftmaxRow of row j of a tile with target t (>= 0) from tile_stats' values (float:
// log p_t from log_softmax_target_sums, or given: the tile's SIMD batch, cpu::log_softmax_target_rows).
template <typename T>
inline SoftmaxRow<T> softmax_row_values(T x_t, T e_t, T row_max, T row_sum, T sum_others, const T* log_pt = nullptr) {
  SoftmaxRow<T> row;
  if constexpr (std::is_same<T, double>::value) {
    // fp64 keeps the log-sum form of the float64 reference (tests/test_reference.py pins it to the
    // naive autograd form at 1e-6); its rounding (~1e-16 absolute in log p_t) is far below fp32's.
    row.inv_sum = T(1) / row_sum;
    row.log_pt = log_softmax_target(x_t, row_max, log_(row_sum));
    row.p_t = exp_(row.log_pt);
    row.one_minus_pt = one_minus_pt_from_log(row.log_pt);
  } else {
    row.log_pt = log_pt != nullptr ? *log_pt : log_softmax_target_sums(x_t, row_max, row_sum, sum_others);
    row.inv_sum = T(1) / row_sum;  // one division per row (p_t, 1 - p_t and the gradient's coefficient)
    row.p_t = e_t * row.inv_sum;
    row.one_minus_pt = sum_others * row.inv_sum;
  }
  row.max = row_max;
  row.sum = row_sum;
  return row;
}

// Whether row r takes part: target != ignore_index (checked to be a class), and, when given,
// active_rows[r] != 0 and weight[r] != 0 (a zero weight gives exactly 0 loss and gradient, so a
// NaN logit there does not leak).
template <typename T>
inline bool row_active(const int64_t* target, int64_t r, int64_t C, int64_t ignore_index, const uint8_t* active_rows,
                       const T* weight) {
  const int64_t tr = target[r];
  if (tr == ignore_index) return false;
  check_class(tr, C, ignore_index);
  return (active_rows == nullptr || active_rows[r] != 0) && (weight == nullptr || weight[r] != T(0));
}

// Tiles of a softmax pass over (N, C, S): unit stride (S = 1) one row per tile, else tile_width(C)
// consecutive spatial positions of one image; grain = tiles per parallel_for grain.
struct Tile {
  int64_t w;       // rows in this tile
  int64_t row0;    // first row (n * S + s0)
  int64_t offset;  // element offset of (n, class 0, s0)
};

struct TileGrid {
  int64_t width, class_stride, tiles_per_image, tiles, grain, S, C;
  TileGrid(SoftmaxShape sh, bool unit_stride)
      : width(unit_stride ? 1 : tile_width(sh.C)),
        class_stride(unit_stride ? 1 : sh.S),
        tiles_per_image(unit_stride ? 1 : ceil_div(sh.S, width)),
        tiles(sh.N * tiles_per_image),
        grain(std::max<int64_t>(1, kWorkGrain / (sh.C * width))),
        S(sh.S),
        C(sh.C) {}
  Tile tile(int64_t i) const {
    const int64_t n = i / tiles_per_image;
    const int64_t s0 = (i % tiles_per_image) * width;
    return {std::min(width, S - s0), n * S + s0, n * C * S + s0};
  }
};

// t[j] = the target of the tile's row j when row_active, else -1; returns whether any row is.
template <typename T>
inline bool tile_targets(const int64_t* target, const Tile& tl, int64_t C, int64_t ignore_index,
                         const uint8_t* active_rows, const T* weight, int32_t* t) {
  bool any_active = false;
  for (int64_t j = 0; j < tl.w; ++j) {
    const bool active = row_active<T>(target, tl.row0 + j, C, ignore_index, active_rows, weight);
    t[j] = active ? static_cast<int32_t>(target[tl.row0 + j]) : -1;
    any_active |= active;
  }
  return any_active;
}

// One pass over softmax rows: per row the SoftmaxRow, then
//   k = row_fn(row, t, SoftmaxRow) = dLoss/dlog p_t   (row_fn also records the row's loss)
// and, when grad != nullptr, grad_c = k * ([c == t] - p_c) (d log p_t / dx_c) with p_c =
// e^{x_c - m} / s, the target column as k * (1 - p_t).
// Rows with target == ignore_index, or weight[r] == 0 when a weight is given, get no row_fn call
// and a zero gradient row.
// Memory traffic: reads the logits once, writes the gradient once (if asked); the row or tile
// being worked on stays in L1/L2 (scratch of C x tile_width(C) values of T). fp32 runs the SIMD
// kernels of simd_kernels.cpp (AVX-512 / AVX2+FMA / baseline, picked at load).
template <typename scalar_t, typename T, bool kUnitStride, typename G, typename RowFn>
void softmax_rows_pass_impl(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                            const T* weight, G* grad, RowFn&& row_fn) {
  const TileGrid grid(sh, kUnitStride);
  const int64_t C = sh.C, class_stride = grid.class_stride;
  constexpr bool kFloat = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value;
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> e(C * grid.width);
    T row_max[kTile], row_sum[kTile], sum_others[kTile], coef[kTile], target_value[kTile], x_t[kTile], log_pt[kTile];
    int32_t t[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      const scalar_t* xt = x + offset;
      if (!tile_targets<T>(target, tl, C, ignore_index, nullptr, weight, t)) {
        if (grad != nullptr) {
          for (int64_t c = 0; c < C; ++c)
            for (int64_t j = 0; j < w; ++j) grad[offset + c * class_stride + j] = G(0);
        }
        continue;
      }
      tile_stats<kUnitStride>(xt, C, class_stride, w, t, e.data(), row_max, row_sum, sum_others);
      // Tiles of float rows: the w logs in one SIMD batch (a libm logf per row costs as much as
      // the row's 19 exponentials).
      T* lp = nullptr;
      if constexpr (kFloat && !kUnitStride) {
        for (int64_t j = 0; j < w; ++j) x_t[j] = t[j] >= 0 ? xt[t[j] * class_stride + j] : 0.0f;
        cpu::log_softmax_target_rows(x_t, row_max, row_sum, sum_others, w, log_pt);
        lp = log_pt;
      }
      for (int64_t j = 0; j < w; ++j) {
        coef[j] = 0;
        target_value[j] = 0;
        if (t[j] < 0) continue;
        const SoftmaxRow<T> row = softmax_row_values(static_cast<T>(xt[t[j] * class_stride + j]), e[t[j] * w + j],
                                                     row_max[j], row_sum[j], sum_others[j], lp != nullptr ? lp + j : nullptr);
        const T k = row_fn(row0 + j, static_cast<int64_t>(t[j]), row);
        coef[j] = -k * row.inv_sum;
        target_value[j] = k * row.one_minus_pt;
      }
      if (grad == nullptr) continue;
      G* gt = grad + offset;
      if (kUnitStride) {
        const T* er = e.data();
        if constexpr (kFloat && std::is_same<G, float>::value) {
          cpu::scale_to(gt, er, coef[0], C);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gt[c] = static_cast<G>(coef[0] * er[c]);
        }
        gt[t[0]] = static_cast<G>(target_value[0]);
      } else {
        if constexpr (kFloat && std::is_same<G, float>::value) {
          cpu::softmax_grad_tile(gt, C, class_stride, w, t, e.data(), coef, target_value);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            G* gr = gt + c * class_stride;
            const T* er = e.data() + c * w;
            for (int64_t j = 0; j < w; ++j)
              gr[j] = t[j] < 0 ? G(0) : static_cast<G>(c == t[j] ? target_value[j] : coef[j] * er[j]);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename T, typename G, typename RowFn>
void softmax_rows_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                       const T* weight, G* grad, RowFn&& row_fn) {
  if (sh.S == 1) {
    softmax_rows_pass_impl<scalar_t, T, true>(x, target, sh, ignore_index, weight, grad, row_fn);
  } else {
    softmax_rows_pass_impl<scalar_t, T, false>(x, target, sh, ignore_index, weight, grad, row_fn);
  }
}

// Label-smoothed softmax rows (label_smoothing eps > 0), q_c = (1 - eps) [c == t] + eps / C,
// a_c = alpha_per_class[c] or alpha_scalar:
//   value_r = sum_c q_c a_c F(l_c),  F(l) = (1 - e^l)^gamma (-l),  l_c = log p_c
//   (OHEM and GHM-C: gamma 0 and a_c = 1, the smoothed cross entropy), then
//   k = row_fn(r, t, SoftmaxRow, value_r) (row_fn records the row's loss) and
//   grad_j = k (h_j - p_j H),  h_c = q_c a_c F'(l_c),  H = sum_c h_c
// with the target column as k (h_t (1 - p_t) - p_t (H - h_t)) (1 - p_t exact from the sums; no
// cancellation for a confident row). l_t and 1 - p_t of the target are SoftmaxRow's (exact at
// every margin); for c != t, l_c = (x_c - m) - log s and 1 - p_c = 1 - e_c / s (p_c <= 1/2 unless c
// is the row max; then the target's own term dominates the row). Rows are active as in
// row_active (active_rows: OHEM's kept rows); the others get no row_fn call and a zero gradient.
// One pass per element with a transcendental call or two (pow for a gamma outside {0, 0.5, 1, 2,
// 3}): reads the logits once, writes the gradient once, no N x C intermediate (the per-class h of
// a tile stays in a scratch buffer next to the exponentials).
template <typename scalar_t, typename T, bool kUnitStride, typename G, typename RowFn>
void softmax_smooth_pass_impl(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                              const uint8_t* active_rows, const T* weight, T eps, T gamma,
                              const T* alpha_per_class, T alpha_scalar, G* grad, RowFn&& row_fn) {
  const TileGrid grid(sh, kUnitStride);
  const int64_t C = sh.C, class_stride = grid.class_stride;
  const T q_off = eps / static_cast<T>(C), q_on = (T(1) - eps) + eps / static_cast<T>(C);
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> e(C * grid.width), h(C * grid.width);
    T row_max[kTile], row_sum[kTile], sum_others[kTile], k[kTile], h_t[kTile], h_others[kTile], p_t[kTile],
        omp_t[kTile];
    int32_t t[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      const scalar_t* xt = x + offset;
      if (tile_targets<T>(target, tl, C, ignore_index, active_rows, weight, t)) tile_stats<kUnitStride>(xt, C, class_stride, w, t, e.data(), row_max, row_sum, sum_others);
      for (int64_t j = 0; j < w; ++j) {
        if (t[j] < 0) continue;
        const int64_t tc = t[j];
        const SoftmaxRow<T> row = softmax_row_values(static_cast<T>(xt[tc * class_stride + j]), e[tc * w + j],
                                                     row_max[j], row_sum[j], sum_others[j]);
        const T log_s = log_(row_sum[j]);
        T value = 0, ho = 0;
        for (int64_t c = 0; c < C; ++c) {
          const T a = alpha_per_class != nullptr ? alpha_per_class[c] : alpha_scalar;
          if (c == tc) {
            const FocalTerm<T> ft = focal_term_parts(row.log_pt, row.p_t, row.one_minus_pt, gamma);
            value += q_on * a * ft.value;
            h_t[j] = q_on * a * ft.dvalue_dlogpt;
          } else {
            const T p = e[c * w + j] / row_sum[j];
            const T l = (static_cast<T>(xt[c * class_stride + j]) - row_max[j]) - log_s;
            const FocalTerm<T> ft = focal_term_parts(l, p, T(1) - p, gamma);
            value += q_off * a * ft.value;
            const T hc = q_off * a * ft.dvalue_dlogpt;
            h[c * w + j] = hc;
            ho += hc;
          }
        }
        h_others[j] = ho;
        p_t[j] = row.p_t;
        omp_t[j] = row.one_minus_pt;
        k[j] = row_fn(row0 + j, tc, row, value);
      }
      if (grad == nullptr) continue;
      G* gt = grad + offset;
      for (int64_t c = 0; c < C; ++c) {
        G* gr = gt + c * class_stride;
        const T* er = e.data() + c * w;
        const T* hr = h.data() + c * w;
        for (int64_t j = 0; j < w; ++j) {
          T v = T(0);
          if (t[j] >= 0) {
            v = c == t[j] ? k[j] * (h_t[j] * omp_t[j] - p_t[j] * h_others[j])
                          : k[j] * (hr[j] - (er[j] / row_sum[j]) * (h_t[j] + h_others[j]));
          }
          gr[j] = static_cast<G>(v);
        }
      }
    }
  });
}

template <typename scalar_t, typename T, typename G, typename RowFn>
void softmax_smooth_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                         const uint8_t* active_rows, const T* weight, T eps, T gamma, const T* alpha_per_class,
                         T alpha_scalar, G* grad, RowFn&& row_fn) {
  if (sh.S == 1) {
    softmax_smooth_pass_impl<scalar_t, T, true>(x, target, sh, ignore_index, active_rows, weight, eps, gamma,
                                                alpha_per_class, alpha_scalar, grad, row_fn);
  } else {
    softmax_smooth_pass_impl<scalar_t, T, false>(x, target, sh, ignore_index, active_rows, weight, eps, gamma,
                                                 alpha_per_class, alpha_scalar, grad, row_fn);
  }
}

// Per-row statistics of a stats pass (two-pass losses): log p_t, the max m and s = sum_c
// e^{x_c - m}, so that the gradient pass computes p_c = e^{x_c - m} / s exactly (not
// exp(x_c - lse) with the log-sum-exp rounded to the math type: 1e-5 relative error at logits
// of +1000 in float32).
template <typename T>
struct RowStats {
  std::vector<T> log_pt, p_t, one_minus_pt, max, sum;
};

// Gradient pass of the two-pass losses (OHEM, GHM-C softmax fp64): from a stats pass's per-row
// max, sum and 1 - p_t, grad_c = k_r * ([c == t] - e^{x_c - m_r} / s_r) for active rows (active[r] != 0, or
// target != ignore_index when active == nullptr), 0 elsewhere.
// Memory traffic: reads the logits once, writes the gradient once.
template <typename scalar_t, typename T, typename G>
void softmax_grad_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                       const T* row_max, const T* row_sum, const T* one_minus_pt, const T* k,
                       const uint8_t* active_rows, G* grad) {
  const int64_t C = sh.C, S = sh.S;
  const bool unit = S == 1;
  const TileGrid grid(sh, unit);
  constexpr bool kFloat = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value &&
                          std::is_same<G, float>::value;
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    int32_t t[kTile];
    T coef[kTile], target_value[kTile], mx[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      for (int64_t j = 0; j < w; ++j) {
        const int64_t r = row0 + j;
        const bool active = active_rows != nullptr ? active_rows[r] != 0 : target[r] != ignore_index;
        t[j] = active ? static_cast<int32_t>(target[r]) : -1;
        coef[j] = active ? -k[r] / row_sum[r] : T(0);
        target_value[j] = active ? k[r] * one_minus_pt[r] : T(0);
        mx[j] = row_max[r];
      }
      const scalar_t* xt = x + offset;
      G* gt = grad + offset;
      if (unit) {
        if (t[0] < 0) {
          for (int64_t c = 0; c < C; ++c) gt[c] = G(0);
          continue;
        }
        if constexpr (kFloat) {
          cpu::scaled_exp_to(gt, xt, mx[0], coef[0], C);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gt[c] = static_cast<G>(coef[0] * exp_vectorizable(static_cast<T>(xt[c]) - mx[0]));
        }
        gt[t[0]] = static_cast<G>(target_value[0]);
      } else if constexpr (kFloat) {
        cpu::softmax_grad_tile_exp(gt, xt, C, S, w, t, mx, coef, target_value);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xr = xt + c * S;
          G* gr = gt + c * S;
          for (int64_t j = 0; j < w; ++j) {
            const T v = c == t[j] ? target_value[j] : coef[j] * exp_vectorizable(static_cast<T>(xr[j]) - mx[j]);
            gr[j] = t[j] < 0 ? G(0) : static_cast<G>(v);
          }
        }
      }
    }
  });
}

// Stats pass: per-row log p_t, max and exponential sum in math type T (0 for ignored rows).
// Reads the logits once.
template <typename scalar_t, typename T>
RowStats<T> softmax_stats_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index) {
  RowStats<T> st;
  st.log_pt.assign(sh.rows(), T(0));
  st.p_t.assign(sh.rows(), T(0));
  st.one_minus_pt.assign(sh.rows(), T(0));
  st.max.assign(sh.rows(), T(0));
  st.sum.assign(sh.rows(), T(1));
  softmax_rows_pass<scalar_t, T>(x, target, sh, ignore_index, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
                                 [&](int64_t r, int64_t, const SoftmaxRow<T>& row) {
                                   st.log_pt[r] = row.log_pt;
                                   st.p_t[r] = row.p_t;
                                   st.one_minus_pt[r] = row.one_minus_pt;
                                   st.max[r] = row.max;
                                   st.sum[r] = row.sum;
                                   return T(0);
                                 });
  return st;
}

// ------------------------------------------------------------------------------------------
// Softmax focal
//   loss_r = alpha_t * (1 - p_t)^gamma * (-log p_t),  grad_c = scale * alpha_t * dL/dl * ([c == t] - p_c)
// (from_logits=False: l = log x_t and the gradient is scale * alpha_t * dL/dl / x_t on the
// target column only). One pass: reads the logits once, writes loss rows and the gradient once.
// weight w_r: loss and k multiplied by it (w_r == 0: an inactive row, 0 loss and gradient; the
// 'mean' count is unchanged). label_smoothing > 0: softmax_smooth_pass (per-class terms).
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const c10::optional<at::Tensor>& alpha_per_class_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool from_logits,
                                                           bool compute_grad, const c10::optional<at::Tensor>& weight,
                                                           double label_smoothing) {
  const Reduction reduction = parse_reduction(reduction_name);
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(label_smoothing == 0.0 || from_logits, "label_smoothing: needs from_logits=True");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t n_valid = count_valid(tgt, sh.rows(), ignore_index);
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor alpha_vec;
    const T* alpha_ptr = nullptr;
    if (alpha_per_class_in.has_value()) {
      alpha_vec = alpha_per_class_in->to(c10::CppTypeToScalarType<T>::value).contiguous();
      TORCH_CHECK(alpha_vec.numel() == sh.C, "alpha: expected ", sh.C, " values, got ", alpha_vec.numel());
      alpha_ptr = alpha_vec.data_ptr<T>();
    }
    const T alpha_t_scalar = static_cast<T>(alpha), gamma_t = static_cast<T>(gamma);
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    const T* wp = weight_ptr<T>(weight_t);
    std::vector<T> row_loss(sh.rows(), T(0));
    const scalar_t* x = logits.data_ptr<scalar_t>();
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    using G = std::remove_pointer_t<decltype(g)>;
    if (from_logits && label_smoothing > 0.0) {
      softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, nullptr, wp, static_cast<T>(label_smoothing), gamma_t,
                                       alpha_ptr, alpha_t_scalar, g,
                                       [&](int64_t r, int64_t, const SoftmaxRow<T>&, T value) {
                                         const T wr = wp != nullptr ? wp[r] : T(1);
                                         row_loss[r] = wr * value;
                                         return scale * wr;
                                       });
    } else if (from_logits) {
      // wr == 1 without a weight: the products below are then exactly today's.
      softmax_rows_pass<scalar_t, T>(x, tgt, sh, ignore_index, wp, g, [&](int64_t r, int64_t t, const SoftmaxRow<T>& row) {
        const T a = class_alpha(alpha_ptr, alpha_t_scalar, t);
        const T wr = wp != nullptr ? wp[r] : T(1);
        const FocalTerm<T> ft = focal_term_parts(row.log_pt, row.p_t, row.one_minus_pt, gamma_t);
        row_loss[r] = wr * (a * ft.value);
        return (scale * wr) * a * ft.dvalue_dlogpt;
      });
    } else {
      // Probabilities: only x_t is read per row; the gradient row is zero but for x_t.
      const int64_t C = sh.C, S = sh.S;
      parallel_for_balanced(0, sh.rows(), std::max<int64_t>(1, kWorkGrain / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / S, s = r % S;
          const int64_t t = tgt[r];
          const int64_t base = n * C * S + s;
          if (g != nullptr)
            for (int64_t c = 0; c < C; ++c) g[base + c * S] = G(0);
          if (!row_active<T>(tgt, r, C, ignore_index, nullptr, wp)) continue;
          const T p_t = static_cast<T>(x[base + t * S]);
          const T a = class_alpha(alpha_ptr, alpha_t_scalar, t);
          const T wr = wp != nullptr ? wp[r] : T(1);
          const FocalTerm<T> ft = focal_term(log_(p_t), gamma_t);
          row_loss[r] = wr * (a * ft.value);
          if (g != nullptr) g[base + t * S] = static_cast<G>((scale * wr) * a * ft.dvalue_dlogpt / p_t);
        }
      });
    }
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// OHEM: stats pass (log p_t, max, sum per row) -> selection on the N-sized CE array (top-k by
// sort rank with ties to the lower index, or the mmseg probability threshold) -> gradient
// pass for kept rows, grad_c = scale * (p_c - [c == t]). Reads the logits twice.
// The selection is a radix select (11-bit digits, per-chunk histograms in parallel, merged in
// chunk order) of the k-th key instead of a sort: O(rows) work, exact, and independent of the
// thread count.
// ------------------------------------------------------------------------------------------
// Unsigned key with the order of the float (-0 and +0 get one key: they compare equal).
inline uint32_t order_key(float v) {
  v = v + 0.0f;
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double v) {
  v = v + 0.0;
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
template <typename K, typename T>
T from_order_key(K key) {
  constexpr K kSign = K(1) << (sizeof(K) * 8 - 1);
  const K u = (key & kSign) ? (key & ~kSign) : ~key;
  T v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

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

// The key of rank `rank` (0-based) in ascending order of keys[0..n): radix select, 11-bit digits
// from the top, one chunked histogram of the keys that match the digits chosen so far per digit.
template <typename K>
K kth_smallest_key(const std::vector<K>& keys, int64_t rank) {
  constexpr int kDigitBits = 11;
  const int64_t n = static_cast<int64_t>(keys.size());
  K prefix = 0, prefix_mask = 0;
  int shift = static_cast<int>(sizeof(K) * 8);
  while (shift > 0) {
    const int bits = std::min(kDigitBits, shift);
    shift -= bits;
    const int64_t bins = int64_t(1) << bits;
    const std::vector<int64_t> counts = chunked_histogram(n, bins, [&](int64_t i) {
      const K key = keys[i];
      return (key & prefix_mask) == prefix ? static_cast<int64_t>((key >> shift) & K(bins - 1)) : int64_t(-1);
    });
    int64_t digit = 0;
    for (; digit < bins && rank >= counts[digit]; ++digit) rank -= counts[digit];
    TORCH_INTERNAL_ASSERT(digit < bins, "kth_smallest_key: rank out of range");
    prefix |= K(digit) << shift;
    prefix_mask |= K(bins - 1) << shift;
  }
  return prefix;
}

template <typename T>
std::vector<uint8_t> ohem_select(const RowStats<T>& st, const int64_t* tgt, int64_t rows, int64_t ignore_index,
                                 double keep_fraction, int64_t keep_count, c10::optional<double> thresh,
                                 int64_t min_kept_total) {
  using K = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr K kMaxKey = ~K(0);
  std::vector<uint8_t> kept(rows, 0);
  const int64_t n_valid = count_valid(tgt, rows, ignore_index);
  if (n_valid == 0) return kept;
  std::vector<K> keys(rows);
  if (!thresh.has_value()) {
    const int64_t k = keep_count > 0 ? std::min(keep_count, n_valid)
                                     : std::max<int64_t>(1, static_cast<int64_t>(std::floor(keep_fraction * static_cast<double>(n_valid))));
    if (k >= n_valid) {
      for (int64_t r = 0; r < rows; ++r) kept[r] = tgt[r] != ignore_index;
      return kept;
    }
    // Descending CE = ascending log p_t; NaN ranks first (torch.sort puts NaN above +inf), key
    // 0; ignored rows rank last (kMaxKey: no valid key reaches it). Equal keys keep the lower
    // index first (stable sort): the kept rows are those below the k-th key and the first ones,
    // in index order, of those equal to it.
    at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T v = st.log_pt[r];
        keys[r] = tgt[r] == ignore_index ? kMaxKey : isnan_(v) ? K(0) : order_key(v);
      }
    });
    const K kth = kth_smallest_key(keys, k - 1);
    int64_t below = 0;
    for (int64_t r = 0; r < rows; ++r) below += keys[r] < kth;
    int64_t equal_wanted = k - below;
    for (int64_t r = 0; r < rows; ++r) {
      const K key = keys[r];
      if (key < kth || (key == kth && equal_wanted-- > 0)) kept[r] = 1;
    }
    return kept;
  }
  // mmseg: threshold = max(thresh, sorted_p[min(min_kept_total, n_valid - 1)]), p ascending
  // with NaN last (as ignored rows: kMaxKey; the rank is < n_valid, so a rank among the valid
  // rows or a NaN); keep p_t < threshold. p_t = e_t / s from the stats pass.
  const std::vector<T>& p = st.p_t;
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) keys[r] = tgt[r] == ignore_index || isnan_(p[r]) ? kMaxKey : order_key(p[r]);
  });
  const int64_t idx = std::max<int64_t>(0, std::min(n_valid - 1, min_kept_total));
  const K key = kth_smallest_key(keys, idx);
  const T at_idx = key == kMaxKey ? std::numeric_limits<T>::quiet_NaN() : from_order_key<K, T>(key);
  const T th = static_cast<T>(*thresh);
  const T threshold = isnan_(at_idx) ? at_idx : (at_idx > th ? at_idx : th);
  for (int64_t r = 0; r < rows; ++r) kept[r] = tgt[r] != ignore_index && p[r] < threshold;
  return kept;
}

std::tuple<at::Tensor, at::Tensor> ohem_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  double keep_fraction, int64_t keep_count,
                                                  c10::optional<double> thresh, int64_t min_kept_total,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const Reduction reduction = parse_reduction(reduction_name);
  check_label_smoothing(label_smoothing);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ohem_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const RowStats<T> st = softmax_stats_pass<scalar_t, T>(x, tgt, sh, ignore_index);
    const std::vector<uint8_t> kept =
        ohem_select(st, tgt, sh.rows(), ignore_index, keep_fraction, keep_count, thresh, min_kept_total);
    const int64_t n_kept = at::parallel_reduce(
        0, sh.rows(), kWorkGrain, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t acc) {
          for (int64_t r = begin; r < end; ++r) acc += kept[r];
          return acc;
        },
        [](int64_t a, int64_t b) { return a + b; });
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_kept, 1)) : T(1);
    const T* wp = weight_ptr<T>(weight_t);
    std::vector<T> row_loss(sh.rows(), T(0));
    if (label_smoothing > 0.0) {
      // Kept rows' loss w * smoothed CE, from a second pass over the kept rows (loss and gradient).
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, kept.data(), wp, static_cast<T>(label_smoothing),
                                         T(0), nullptr, T(1), g,
                                         [&](int64_t r, int64_t, const SoftmaxRow<T>&, T value) {
                                           const T wr = wp != nullptr ? wp[r] : T(1);
                                           row_loss[r] = wr * value;
                                           return scale * wr;
                                         });
      });
    } else {
      // Kept rows with a zero weight: 0 loss and gradient (inactive in the gradient pass).
      std::vector<uint8_t> active;
      if (wp != nullptr) active.assign(sh.rows(), 0);
      std::vector<T> k(sh.rows());
      parallel_for_balanced(0, sh.rows(), kWorkGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const bool on = kept[r] && (wp == nullptr || wp[r] != T(0));
          const T wr = wp != nullptr ? wp[r] : T(1);
          row_loss[r] = on ? wr * -st.log_pt[r] : T(0);
          k[r] = on ? -scale * wr : T(0);  // d(-log p_t)/dl = -1
          if (wp != nullptr) active[r] = on;
        }
      });
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        if (g != nullptr)
          softmax_grad_pass<scalar_t, T>(x, tgt, sh, ignore_index, st.max.data(), st.sum.data(), st.one_minus_pt.data(), k.data(), wp != nullptr ? active.data() : kept.data(), g);
      });
    }
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_kept), reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// Sigmoid family: elementwise over (M, C) rows with a float target (same shape) or integer
// labels (M,) (y_c = [label == c], label == C background, label == ignore_index: row ignored).
// elem_fn(x, y, exp(-|x|)) -> LossGrad<T>. Per chunk of whole rows (fixed size) the losses
// are summed in double; chunk sums are added in order. Reads logits (and a float target) once,
// writes the gradient (and 'none' losses) once.
// ------------------------------------------------------------------------------------------
struct SigmoidTarget {
  const void* float_target = nullptr;  // of target_t, (M, C)
  const int64_t* labels = nullptr;     // (M,)
};

// NoFastRow: the generic element loop only. A FastRow (fp32 logits and target) is
// (x, y or nullptr, label, C, loss or nullptr, grad or nullptr, element weights of the row or
// nullptr, row weight) -> row loss sum (the weights applied).
struct NoFastRow {};

// The weight of a sigmoid-family call: none (w == nullptr), one value per row or per element.
template <typename T>
struct SigmoidWeight {
  const T* w = nullptr;
  bool per_element = false;
};

template <typename T>
SigmoidWeight<T> sigmoid_weight(const at::Tensor& weight_t, int64_t M) {
  SigmoidWeight<T> sw;
  if (weight_t.defined()) {
    sw.w = weight_t.data_ptr<T>();
    sw.per_element = weight_t.numel() != M;
  }
  return sw;
}

// elem_fn(x, y, exp(-|x|), c) -> LossGrad<T>, then multiplied by the weight (a zero weight
// selects 0; a row whose row weight is 0 is written as zeros like an ignored row).
template <typename T, typename scalar_t, typename target_t, typename G, typename ElemFn, typename FastRow = NoFastRow>
double sigmoid_pass(const scalar_t* x, const target_t* y, const int64_t* labels, int64_t M, int64_t C,
                    int64_t ignore_index, scalar_t* loss_out, G* grad, SigmoidWeight<T> weight, ElemFn&& elem_fn,
                    FastRow fast_row = {}) {
  constexpr bool kFloatRow = !std::is_same<FastRow, NoFastRow>::value;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kSumChunk / C);
  const int64_t chunks = ceil_div(M, rows_per_chunk);
  std::vector<double> partial(chunks, 0.0);
  parallel_for_balanced(0, chunks, std::max<int64_t>(1, kWorkGrain / (rows_per_chunk * C)), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      double chunk_sum = 0.0;
      const int64_t r_end = std::min(M, (ch + 1) * rows_per_chunk);
      for (int64_t r = ch * rows_per_chunk; r < r_end; ++r) {
        const int64_t base = r * C;
        auto zero_row = [&] {
          for (int64_t c = 0; c < C; ++c) {
            if (loss_out != nullptr) loss_out[base + c] = scalar_t(0);
            if (grad != nullptr) grad[base + c] = G(0);
          }
        };
        int64_t label = -1;
        if (labels != nullptr) {
          label = labels[r];
          if (label == ignore_index) {
            zero_row();
            continue;
          }
          check_class(label, C + 1, ignore_index);
        }
        const T* row_w = weight.w != nullptr && weight.per_element ? weight.w + base : nullptr;
        const T wr = weight.w != nullptr && !weight.per_element ? weight.w[r] : T(1);
        if (wr == T(0)) {
          zero_row();
          continue;
        }
        T row_sum = 0;
        if constexpr (kFloatRow) {
          // fp32 logits and target: the multiversioned vectorised row of simd_kernels.cpp.
          chunk_sum += static_cast<double>(fast_row(x + base, labels != nullptr ? nullptr : y + base, label, C,
                                                    loss_out != nullptr ? loss_out + base : nullptr,
                                                    grad != nullptr ? grad + base : nullptr, row_w, wr));
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          const T xv = static_cast<T>(x[base + c]);
          const T yv = labels != nullptr ? T(label == c ? 1 : 0) : static_cast<T>(y[base + c]);
          LossGrad<T> lg = elem_fn(xv, yv, exp_vectorizable(-abs_(xv)), c);
          if (weight.w != nullptr) {
            const T wv = row_w != nullptr ? row_w[c] : wr;
            lg.loss = wv == T(0) ? T(0) : wv * lg.loss;
            lg.grad = wv == T(0) ? T(0) : wv * lg.grad;
          }
          row_sum += lg.loss;
          if (loss_out != nullptr) loss_out[base + c] = static_cast<scalar_t>(lg.loss);
          if (grad != nullptr) grad[base + c] = static_cast<G>(lg.grad);
        }
        chunk_sum += static_cast<double>(row_sum);
      }
      partial[ch] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

struct SigmoidInputs {
  at::Tensor logits;       // contiguous
  at::Tensor float_target; // contiguous, dtype == logits or math dtype; undefined for labels
  at::Tensor labels;       // int64 contiguous; undefined for float targets
  int64_t M = 0, C = 0;
  double count = 0;        // denominator of 'mean'
};

SigmoidInputs sigmoid_inputs(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index) {
  SigmoidInputs in;
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  in.logits = logits_in.contiguous();
  in.C = in.logits.size(-1);
  in.M = in.C == 0 ? 0 : in.logits.numel() / in.C;
  if (target_in.is_floating_point()) {
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "target: a float target must have the logits' shape");
    const at::ScalarType math = at::toOpMathType(in.logits.scalar_type());
    const at::ScalarType td = target_in.scalar_type();
    in.float_target = (td == in.logits.scalar_type() ? target_in : target_in.to(math)).contiguous();
    in.count = static_cast<double>(in.logits.numel());
  } else {
    TORCH_CHECK(target_in.numel() == in.M, "target: integer labels must have shape logits.shape[:-1]");
    in.labels = index_target(target_in);
    in.count = static_cast<double>(count_valid(in.labels.data_ptr<int64_t>(), in.M, ignore_index) * in.C);
  }
  return in;
}

// Entries (elements) that are not ignored and whose weight is not 0: GHM-C's n_valid.
template <typename T>
int64_t sigmoid_valid_count(const SigmoidInputs& in, SigmoidWeight<T> weight, int64_t ignore_index) {
  if (weight.w == nullptr) return static_cast<int64_t>(in.count);
  const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
  const int64_t C = in.C;
  return at::parallel_reduce(
      0, in.M, std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(C, 1)), int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t r = begin; r < end; ++r) {
          if (labels != nullptr && labels[r] == ignore_index) continue;
          if (!weight.per_element) {
            acc += weight.w[r] != T(0) ? C : 0;
            continue;
          }
          for (int64_t c = 0; c < C; ++c) acc += weight.w[r * C + c] != T(0);
        }
        return acc;
      },
      [](int64_t a, int64_t b) { return a + b; });
}

// Calls body(float_target_ptr_or_null) with the target pointer typed as scalar_t or T.
template <typename scalar_t, typename T, typename Body>
void with_sigmoid_target(const SigmoidInputs& in, Body&& body) {
  if (!in.float_target.defined()) {
    body(static_cast<const T*>(nullptr));
  } else if (in.float_target.scalar_type() == in.logits.scalar_type()) {
    body(in.float_target.data_ptr<scalar_t>());
  } else {
    body(in.float_target.data_ptr<T>());
  }
}

// Sigmoid focal: loss = alpha_t * BCE * (1 - p_t)^gamma elementwise (losses_math.h).
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool compute_grad,
                                                           const c10::optional<at::Tensor>& alpha_per_class,
                                                           const c10::optional<at::Tensor>& weight) {
  const Reduction reduction = parse_reduction(reduction_name);
  const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
  const at::ScalarType math = at::toOpMathType(in.logits.scalar_type());
  const at::Tensor weight_t = extra_weight(weight, math, {in.M, in.M * in.C});
  at::Tensor alpha_vec;
  if (alpha_per_class.has_value()) {
    alpha_vec = alpha_per_class->to(math).contiguous().reshape({-1});
    TORCH_CHECK(alpha_vec.numel() == in.C, "alpha: expected ", in.C, " per-class values, got ", alpha_vec.numel());
  }
  at::Tensor grad = grad_buffer(in.logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "sigmoid_focal_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const T a = static_cast<T>(alpha), gm = static_cast<T>(gamma);
    const T* apc = weight_ptr<T>(alpha_vec);
    const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
    // The SIMD row with extras takes alpha_t's two factors per class (a_c, 1 - a_c; both 1 when
    // the scalar alpha < 0 disables it), built once here.
    const bool extras = apc != nullptr || sw.w != nullptr;
    std::vector<float> a_pos, a_neg;  // used by the fp32 row only
    if (extras && std::is_same<T, float>::value) {
      a_pos.resize(in.C);
      a_neg.resize(in.C);
      for (int64_t c = 0; c < in.C; ++c) {
        const T ac = apc != nullptr ? apc[c] : a;
        const bool on = apc != nullptr || a >= T(0);
        a_pos[c] = static_cast<float>(on ? ac : T(1));
        a_neg[c] = static_cast<float>(on ? T(1) - ac : T(1));
      }
    }
    const scalar_t* x = in.logits.data_ptr<scalar_t>();
    at::Tensor loss_none = reduction == Reduction::None ? empty_output(logits_in.sizes(), in.logits.options()) : at::Tensor();
    scalar_t* lo = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
    const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max(in.count, 1.0)) : T(1);
    double total = 0.0;
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
      auto elem = [&](T xv, T yv, T e, int64_t c) {
        // Per-class alpha: a_c y + (1 - a_c)(1 - y) (sigmoid_focal_element with alpha = a_c >= 0).
        LossGrad<T> lg = sigmoid_focal_element(xv, yv, apc != nullptr ? apc[c] : a, gm, e);
        lg.grad *= scale;
        return lg;
      };
      using target_t = std::remove_const_t<std::remove_pointer_t<decltype(y)>>;
      if constexpr (std::is_same<scalar_t, float>::value && std::is_same<target_t, float>::value) {
        auto fast_row = [&](const float* xr, const float* yr, int64_t label, int64_t n, float* lr, float* gr,
                            const float* wrow, float wr) {
          if (!extras) return cpu::sigmoid_focal_row(xr, yr, label, n, a, gm, scale, lr, gr);
          return cpu::sigmoid_focal_row_ex(xr, yr, label, n, a_pos.data(), a_neg.data(), wrow, wr, gm, scale, lr, gr);
        };
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, elem, fast_row);
      } else {
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, elem);
      }
    });
    });
    loss = loss_none.defined() ? loss_none : reduced_loss(in.logits, total, in.count, reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// GHM-C
// ------------------------------------------------------------------------------------------
// Bin weights from the integer histogram (reference.ghmc): EMA update of `state` first (bins
// non-empty in this batch), divisor = state or counts, weight_b = n_valid / divisor_b /
// n_nonempty for non-empty bins, 0 otherwise; in the math dtype T.
template <typename T>
at::Tensor ghm_weights_from_counts(const std::vector<int64_t>& counts, int64_t n_valid,
                                   const c10::optional<at::Tensor>& state, double momentum,
                                   const at::TensorOptions& options) {
  const int64_t bins = static_cast<int64_t>(counts.size());
  std::vector<T> divisor(bins);
  int64_t nonempty = 0;
  for (int64_t b = 0; b < bins; ++b) nonempty += counts[b] > 0;
  if (state.has_value()) {
    TORCH_CHECK(state->scalar_type() == at::kFloat && state->numel() == bins && state->is_contiguous(),
                "state: expected a contiguous float32 tensor of shape (", bins, ",)");
    float* st = state->data_ptr<float>();
    const float m = static_cast<float>(momentum), one_minus = static_cast<float>(1.0 - momentum);
    for (int64_t b = 0; b < bins; ++b) {
      if (counts[b] > 0) st[b] = ghm_ema(st[b], static_cast<float>(counts[b]), m, one_minus);
      divisor[b] = static_cast<T>(st[b]);
    }
  } else {
    for (int64_t b = 0; b < bins; ++b) divisor[b] = static_cast<T>(static_cast<float>(counts[b]));
  }
  at::Tensor out = at::empty({bins}, options.dtype(c10::CppTypeToScalarType<T>::value));
  T* w = out.data_ptr<T>();
  const T nv = static_cast<T>(n_valid), ne = static_cast<T>(std::max<int64_t>(nonempty, 1));
  for (int64_t b = 0; b < bins; ++b) {
    const T d = divisor[b] > T(1e-12) ? divisor[b] : T(1e-12);
    w[b] = counts[b] > 0 ? (nv / d) / ne : T(0);
  }
  return out;
}

// Per-row g = 1 - p_t of a float32 softmax (0 for ignored rows): what GHM-C's softmax bins use,
// from the row's sums (sum_others / sum: exact relative, the same value ghmc_forward's float
// rows pass bins with). Reads the logits once.
template <typename scalar_t>
std::vector<float> ghm_softmax_g_float(const scalar_t* x, const int64_t* tgt, SoftmaxShape sh, int64_t ignore_index) {
  std::vector<float> g(sh.rows(), 0.0f);
  softmax_rows_pass<scalar_t, float>(x, tgt, sh, ignore_index, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
                                     [&](int64_t r, int64_t, const SoftmaxRow<float>& row) {
                                       g[r] = row.one_minus_pt;
                                       return 0.0f;
                                     });
  return g;
}

// Sigmoid-family bin of element i (row r = i / C, class c = i % C); -1 = no bin.
template <typename scalar_t, typename target_t>
inline int64_t ghm_sigmoid_bin(const scalar_t* x, const target_t* y, const int64_t* labels, int64_t i, int64_t C,
                               int64_t ignore_index, int64_t bins) {
  float yv;
  if (labels != nullptr) {
    const int64_t label = labels[i / C];
    if (label == ignore_index) return -1;
    check_class(label, C + 1, ignore_index);
    yv = label == i % C ? 1.0f : 0.0f;
  } else {
    yv = static_cast<float>(y[i]);
  }
  return ghm_bin(ghm_sigmoid_g(static_cast<float>(x[i]), yv), bins);
}

// The GHM-C histogram of one call (shared by ghmc_bin_weights and ghmc_bin_counts): counts[b] of
// the valid entries (not ignored, target in range, weight != 0) whose g falls in bin b (NaN g: no
// bin), and n_valid, the number of valid entries.
struct GhmHistogram {
  std::vector<int64_t> counts;
  int64_t n_valid = 0;
};

GhmHistogram ghmc_histogram(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins, bool use_sigmoid,
                            int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  GhmHistogram out;
  if (use_sigmoid) {
    const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(in.logits.scalar_type()), {in.M, in.M * in.C});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "ghmc_histogram", [&] {
      using T = at::opmath_type<scalar_t>;
      const scalar_t* x = in.logits.data_ptr<scalar_t>();
      const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
      const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
      with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
        out.counts = chunked_histogram(in.M * in.C, bins, [&](int64_t i) {
          if (sw.w != nullptr && sw.w[sw.per_element ? i : i / in.C] == T(0)) return int64_t(-1);
          return ghm_sigmoid_bin(x, y, labels, i, in.C, ignore_index, bins);
        });
      });
      out.n_valid = sigmoid_valid_count(in, sw, ignore_index);
    });
  } else {
    const at::Tensor logits = logits_in.contiguous();
    const at::Tensor target = index_target(target_in);
    const SoftmaxShape sh = softmax_shape(logits);
    TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
    const int64_t* tgt = target.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ghmc_histogram", [&] {
      using T = at::opmath_type<scalar_t>;
      const T* wp = weight_ptr<T>(weight_t);
      const std::vector<float> g = ghm_softmax_g_float(logits.data_ptr<scalar_t>(), tgt, sh, ignore_index);
      out.counts = chunked_histogram(sh.rows(), bins, [&](int64_t r) {
        const bool valid = tgt[r] != ignore_index && (wp == nullptr || wp[r] != T(0));
        return valid ? ghm_bin(g[r], bins) : int64_t(-1);
      });
      out.n_valid = count_valid(tgt, sh.rows(), ignore_index, wp);
    });
  }
  return out;
}

at::Tensor ghmc_bin_weights_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const GhmHistogram hist = ghmc_histogram(logits_in, target_in, bins, use_sigmoid, ignore_index, weight);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_in.scalar_type(), "ghmc_bin_weights", [&] {
    using T = at::opmath_type<scalar_t>;
    out = ghm_weights_from_counts<T>(hist.counts, hist.n_valid, state, momentum, logits_in.options());
  });
  return out;
}

// int64 (bins + 1,): the histogram of ghmc_bin_weights, then n_valid (for an all-reduce across
// ranks before the weights: fused_losses.distributed.global_bin_weights).
at::Tensor ghmc_bin_counts_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins,
                               bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const GhmHistogram hist = ghmc_histogram(logits_in, target_in, bins, use_sigmoid, ignore_index, weight);
  at::Tensor out = at::empty({bins + 1}, logits_in.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < bins; ++b) o[b] = hist.counts[b];
  o[bins] = hist.n_valid;
  return out;
}

// GHM-C loss: loss = w[bin(g)] * CE, 'mean' over n_valid. Sigmoid: one elementwise pass
// (grad = scale * w * (p - y)). Softmax, math type float: one rows pass (bin, loss and
// gradient grad_c = scale * w * (p_c - [c == t]) per row); fp64: a float32 stats pass for g, a
// double stats pass for the CE, then the gradient pass.
// weight: zero-weight entries are invalid (0 loss and gradient, not in n_valid); the others'
// loss and gradient are multiplied by it. label_smoothing (softmax): the smoothed CE through
// softmax_smooth_pass, binned by the unsmoothed g = 1 - p_t.
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const Reduction reduction = parse_reduction(reduction_name);
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(label_smoothing == 0.0 || !use_sigmoid, "label_smoothing: only with use_sigmoid=False");
  at::Tensor grad, loss;
  if (use_sigmoid) {
    const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(in.logits.scalar_type()), {in.M, in.M * in.C});
    grad = grad_buffer(in.logits, compute_grad, reduction);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "ghmc_forward", [&] {
      using T = at::opmath_type<scalar_t>;
      const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
      const double n_valid = static_cast<double>(sigmoid_valid_count(in, sw, ignore_index));
      const at::Tensor bw = bin_weights_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const T* w = bw.data_ptr<T>();
      const scalar_t* x = in.logits.data_ptr<scalar_t>();
      const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
      at::Tensor loss_none = reduction == Reduction::None ? empty_output(logits_in.sizes(), in.logits.options()) : at::Tensor();
      scalar_t* lo = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
      const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max(n_valid, 1.0)) : T(1);
      double total = 0.0;
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, [&](T xv, T yv, T e, int64_t) {
          const int64_t b = ghm_bin(ghm_sigmoid_g(static_cast<float>(xv), static_cast<float>(yv)), bins);
          const T wt = b >= 0 ? w[b] : T(0);
          const SigmoidParts<T> s = sigmoid_parts(xv, yv, e);
          LossGrad<T> lg;
          lg.loss = wt * s.bce;
          lg.grad = scale * wt * s.p_minus_y;
          return lg;
        });
      });
      });
      loss = loss_none.defined() ? loss_none : reduced_loss(in.logits, total, n_valid, reduction);
    });
    return {loss, grad};
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  grad = grad_buffer(logits, compute_grad, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ghmc_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor bw = bin_weights_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* w = bw.data_ptr<T>();
    const T* wp = weight_ptr<T>(weight_t);
    const int64_t n_valid = count_valid(tgt, sh.rows(), ignore_index, wp);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    std::vector<T> row_loss(sh.rows(), T(0));
    constexpr bool kFloatMath = std::is_same<T, float>::value;
    if (label_smoothing > 0.0) {
      // Bins from the float32 g = 1 - p_t: the smooth pass's own row for float math (the same
      // rows stats as ghmc_bin_weights), a float32 pass for fp64.
      std::vector<float> g_f;
      if (!kFloatMath) g_f = ghm_softmax_g_float(x, tgt, sh, ignore_index);
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, nullptr, wp, static_cast<T>(label_smoothing), T(0),
                                         nullptr, T(1), g,
                                         [&](int64_t r, int64_t, const SoftmaxRow<T>& row, T value) {
                                           const float gv = kFloatMath ? static_cast<float>(row.one_minus_pt) : g_f[r];
                                           const int64_t b = ghm_bin(gv, bins);
                                           const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
                                           row_loss[r] = wt * value;
                                           return scale * wt;
                                         });
      });
      loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
      return;
    }
    if constexpr (kFloatMath) {
      // fp32/bf16/fp16: the float32 log p_t that picks the bin is the one of the CE, so one
      // pass does it all (the same rows pass as ghmc_bin_weights' stats, hence the same bins):
      // reads the logits once, writes the gradient once.
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_rows_pass<scalar_t, T>(x, tgt, sh, ignore_index, wp, g, [&](int64_t r, int64_t, const SoftmaxRow<T>& row) {
          const T lp = row.log_pt;
          const int64_t b = ghm_bin(static_cast<float>(row.one_minus_pt), bins);
          const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
          row_loss[r] = wt * -lp;
          return -scale * wt;
        });
      });
      loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
      return;
    }
    // fp64: bins from a float32 stats pass (as in ghmc_bin_weights), the CE from a double one.
    const std::vector<float> g_f = ghm_softmax_g_float(x, tgt, sh, ignore_index);
    const RowStats<T> st = softmax_stats_pass<scalar_t, T>(x, tgt, sh, ignore_index);
    std::vector<T> k(sh.rows(), T(0));
    std::vector<uint8_t> active(sh.rows(), 0);
    for (int64_t r = 0; r < sh.rows(); ++r) {
      if (tgt[r] == ignore_index || (wp != nullptr && wp[r] == T(0))) continue;
      active[r] = 1;
      const int64_t b = ghm_bin(g_f[r], bins);
      const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
      row_loss[r] = wt * -st.log_pt[r];
      k[r] = -scale * wt;
    }
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      if (g != nullptr) softmax_grad_pass<scalar_t, T>(x, tgt, sh, ignore_index, st.max.data(), st.sum.data(), st.one_minus_pt.data(), k.data(), active.data(), g);
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// Influence-balanced loss on (N, C): one softmax pass, per row ib_row (losses_math.h) gives the
// loss, dloss/dlog p_t (-> grad_c = scale * dloss/dl * ([c == t] - p_c)) and dloss/df.
// 'mean' divides by N. Reads the logits once, writes the gradients once.
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          const at::Tensor& feature_norm_in,
                                                          const c10::optional<at::Tensor>& class_weight_in,
                                                          double alpha, double epsilon, double gamma,
                                                          bool detach_factor, c10::string_view reduction_name,
                                                          bool compute_grad) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() == 2, "logits: ib takes (N, C) logits, got ", logits_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.N && feature_norm_in.numel() == sh.N,
              "target, feature_norm: expected ", sh.N, " values each");
  const int64_t* tgt = target.data_ptr<int64_t>();
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor grad_feature, loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ib_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::ScalarType math = c10::CppTypeToScalarType<T>::value;
    const at::Tensor f = feature_norm_in.to(math).contiguous().reshape({-1});
    grad_feature = compute_grad ? at::empty({sh.N}, logits.options().dtype(math)) : at::empty({0}, logits.options().dtype(math));
    at::Tensor cw;
    const T* cw_ptr = nullptr;
    if (class_weight_in.has_value()) {
      cw = class_weight_in->to(math).contiguous();
      TORCH_CHECK(cw.numel() == sh.C, "weight: expected ", sh.C, " values, got ", cw.numel());
      cw_ptr = cw.data_ptr<T>();
    }
    const T* fp = f.data_ptr<T>();
    T* gf = compute_grad ? grad_feature.data_ptr<T>() : nullptr;
    const T a = static_cast<T>(alpha), eps = static_cast<T>(epsilon), gm = static_cast<T>(gamma);
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(sh.N, 1)) : T(1);
    std::vector<T> row_loss(sh.rows(), T(0));
    // No ignore_index in IB: a sentinel no class index can equal.
    const int64_t no_ignore = std::numeric_limits<int64_t>::min();
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      softmax_rows_pass<scalar_t, T>(logits.data_ptr<scalar_t>(), tgt, sh, no_ignore, static_cast<const T*>(nullptr), g,
                                     [&](int64_t r, int64_t t, const SoftmaxRow<T>& softmax_row) {
                                       const T log_pt = softmax_row.log_pt;
                                       const T w = cw_ptr != nullptr ? cw_ptr[t] : T(1);
                                       const IBRow<T> row = ib_row(log_pt, w, fp[r], a, eps, gm, detach_factor);
                                       row_loss[r] = row.loss;
                                       if (gf != nullptr) gf[r] = scale * row.dloss_dfeature;
                                       return scale * row.dloss_dlogpt;
                                     });
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(sh.N), reduction);
  });
  return {loss, grad, grad_feature};
}

// ------------------------------------------------------------------------------------------
// scale_grad: out = saved_grad * grad_output as a fresh tensor of `dtype` (the logits dtype),
// saved_grad being in the math dtype of `dtype` (float for fp16/bf16/fp32, double for fp64):
// the product is rounded once. grad_output: 0-dim, saved_grad's shape, or saved_grad's shape
// without dim 1 (broadcast over classes). Reads saved_grad and grad_output once, writes once.
// ------------------------------------------------------------------------------------------
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
template <typename scalar_t, typename T>
void multiply_in_place(scalar_t* g, int64_t n, T ratio) {
  at::parallel_for(0, n, kWorkGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) g[i] = static_cast<scalar_t>(static_cast<T>(g[i]) * ratio);
  });
}

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

// ------------------------------------------------------------------------------------------
// GHM-C softmax on float32 logits as two CPU-only ops (cpu_backend.ghmc's path without label
// smoothing, process_group or a transform; defined in this file's TORCH_LIBRARY_FRAGMENT, not
// in op_schemas.h: there is no CUDA or emulator kernel). The softmax does not depend on the
// bins, only each row's factor does, so the one softmax pass comes first:
//   ghmc_softmax_prepass: one rows pass that writes the cross-entropy gradient
//     unit_grad = p - onehot of every active row (target != ignore_index, weight != 0; 0
//     elsewhere) and row_stats (2, rows) float32 = log p_t and the row's bin code (the bin of
//     g = 1 - p_t; -1: valid without a bin (NaN g); -2: not valid), then ghmc_bin_weights'
//     histogram, EMA update of `state` and bin weights from those bins (the same rows pass as
//     ghmc_bin_weights', hence the same bins);
//   ghmc_softmax_scale: ghmc_forward's loss, and the gradient as a fresh tensor
//     (scale * w_bin * weight_r) * unit_grad: a pass like a copy, no exponential.
// One exponential per element instead of two (ghmc_bin_weights + ghmc_forward each run a
// softmax); one more logits-sized float32 buffer while the call runs. The losses are
// ghmc_forward's bit for bit; a gradient element is the product of the same two factors
// rounded in another order (within 2 ulp of ghmc_forward's; tests/test_cpu_kernels.py).
// ------------------------------------------------------------------------------------------
constexpr int64_t kGhmStats = 2;  // row_stats rows: log p_t, bin code
constexpr float kGhmInvalid = -2.0f, kGhmNoBin = -1.0f;

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghmc_softmax_prepass_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& state, int64_t bins,
    double momentum, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat, "ghmc_softmax_prepass: float32 logits only");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  const int64_t rows = sh.rows();
  TORCH_CHECK(target.numel() == rows, "target: expected ", rows, " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::kFloat, {rows});
  const float* wp = weight_ptr<float>(weight_t);
  const int64_t* tgt = target.data_ptr<int64_t>();
  TORCH_CHECK(bins < (int64_t(1) << 24), "bins: at most 2^24 - 1 here, got ", bins);
  at::Tensor stats = at::empty({kGhmStats, rows}, logits.options());
  at::Tensor unit_grad = empty_output(logits.sizes(), logits.options());
  float* lp = stats.data_ptr<float>();
  float* code = lp + rows;
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      lp[r] = 0.0f;
      code[r] = kGhmInvalid;
    }
  });
  // Active rows are the valid ones (row_active: target != ignore_index, weight != 0).
  softmax_rows_pass<float, float>(logits.data_ptr<float>(), tgt, sh, ignore_index, wp, unit_grad.data_ptr<float>(),
                                  [&](int64_t r, int64_t, const SoftmaxRow<float>& row) {
                                    lp[r] = row.log_pt;
                                    const int64_t b = ghm_bin(static_cast<float>(row.one_minus_pt), bins);
                                    code[r] = b >= 0 ? static_cast<float>(b) : kGhmNoBin;
                                    return -1.0f;  // k = dCE/dlog p_t: grad = p - onehot
                                  });
  const std::vector<int64_t> counts =
      chunked_histogram(rows, bins, [&](int64_t r) { return code[r] >= 0.0f ? static_cast<int64_t>(code[r]) : int64_t(-1); });
  const int64_t n_valid = count_valid(tgt, rows, ignore_index, wp);
  return {ghm_weights_from_counts<float>(counts, n_valid, state, momentum, logits.options()), stats, unit_grad};
}

std::tuple<at::Tensor, at::Tensor> ghmc_softmax_scale_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                        const at::Tensor& bin_weights_in, const at::Tensor& stats,
                                                        const at::Tensor& unit_grad, int64_t ignore_index,
                                                        c10::string_view reduction_name, bool compute_grad,
                                                        const c10::optional<at::Tensor>& weight) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat, "ghmc_softmax_scale: float32 logits only");
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits_in);
  const int64_t rows = sh.rows();
  TORCH_CHECK(target.numel() == rows, "target: expected ", rows, " class indices, got ", target.numel());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == kGhmStats && stats.size(1) == rows,
              "row_stats: expected the contiguous float32 (", kGhmStats, ", ", rows,
              ") tensor of ghmc_softmax_prepass for these logits, got ", stats.scalar_type(), " of shape ", stats.sizes());
  TORCH_CHECK(unit_grad.scalar_type() == at::kFloat && unit_grad.is_contiguous() && unit_grad.sizes() == logits_in.sizes(),
              "unit_grad: expected the contiguous float32 gradient of ghmc_softmax_prepass for these logits");
  const at::Tensor weight_t = extra_weight(weight, at::kFloat, {rows});
  const float* wp = weight_ptr<float>(weight_t);
  const at::Tensor bw = bin_weights_in.to(at::kFloat).contiguous();
  const float* w = bw.data_ptr<float>();
  const float* lp = stats.data_ptr<float>();
  const float* code = lp + rows;
  // The prepass checked the targets and binned the rows: valid rows have code >= -1.
  const int64_t n_valid = at::parallel_reduce(
      0, rows, kWorkGrain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t r = begin; r < end; ++r) {
          TORCH_CHECK(code[r] < static_cast<float>(bins), "row_stats: a bin beyond bin_weights' ", bins);
          acc += code[r] >= kGhmNoBin;
        }
        return acc;
      },
      std::plus<int64_t>());
  const float scale = reduction == Reduction::Mean ? 1.0f / static_cast<float>(std::max<int64_t>(n_valid, 1)) : 1.0f;
  std::vector<float> row_loss(rows), factor(rows);
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // ghmc_forward's row function on the same values: loss w * CE, dLoss/dCE = scale * w.
      const float c = code[r];
      const float wt = (c >= 0.0f ? w[static_cast<int64_t>(c)] : 0.0f) * (wp != nullptr ? wp[r] : 1.0f);
      row_loss[r] = c >= kGhmNoBin ? wt * -lp[r] : 0.0f;
      factor[r] = c >= kGhmNoBin ? scale * wt : 0.0f;
    }
  });
  at::Tensor grad = grad_buffer(logits_in, compute_grad, reduction);
  if (compute_grad) {
    const float* u = unit_grad.data_ptr<float>();
    float* out = grad.data_ptr<float>();
    const int64_t C = sh.C, S = sh.S;
    const float* f = factor.data();
    if (S == 1) {
      parallel_for_balanced(0, rows, std::max<int64_t>(1, kWorkGrain / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) cpu::scale_to(out + r * C, u + r * C, f[r], C);
      });
    } else {
      // (N, C, S): element (n, c, s) belongs to row n * S + s.
      parallel_for_balanced(0, sh.N * C, std::max<int64_t>(1, kWorkGrain / S), [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc)
          cpu::multiply_to(out + nc * S, u + nc * S, f + (nc / C) * S, S);
      });
    }
  }
  return {finish_loss<float>(logits_in, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction), grad};
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

}  // namespace

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
