// CUDA kernels of fused_losses (registered for the CUDA dispatch key): the schemas of
// csrc/ops.cpp, the formulas of csrc/losses_math.h (the same functions the CPU kernels run, so
// the CPU tests exercise the math the GPU runs), semantics of fused_losses/reference.py.
//
// Layout. Softmax-family logits are viewed as (N, C, S), S = prod(d...) (S = 1 for (N, C)):
// row r = n * S + s has its classes at n*C*S + c*S + s. S = 1: a lane group per row, 16-byte
// packed loads along the row. S > 1 (channel-second segmentation input, read in place, no
// permute copy): a thread per row, consecutive threads on consecutive s, so every load of a
// warp is one contiguous run. Sigmoid-family logits are elementwise over (M, C), 16-byte packs.
//
// Math in float for fp16/bf16/fp32 inputs (fp64 is the CPU's). Sums over rows/elements go to
// one double per thread, then per block (fixed tree), then one block sums the block partials
// in index order: bitwise run-to-run determinism, no float atomics. Integer atomics only for
// counts and histograms (exact).
//
// Every forward op computes the loss and, when compute_grad, the gradient of the reduced loss
// for grad_output = 1 in the same kernel, into a fresh buffer (one read of the logits, one
// write of the gradient). The gradient's dtype grad_t is the schema's saved-gradient dtype
// (csrc/ops.cpp, fused_losses/_ops.py saved_grad_dtype): the logits dtype for 'mean'/'sum' with
// bf16 or fp32 logits (the backward scales it in place, scale_grad_, free when grad_output ==
// 1), float32 for 'none' and for fp16 logits (the backward is scale_grad, which rounds
// saved * grad_output once). Every value is computed in float32 and rounded once to grad_t
// (round to nearest even), so the forward writes sizeof(grad_t) bytes per element: 2 for bf16
// 'mean'/'sum', 4 otherwise. Only bf16 logits have a grad_t other than float (dispatch_grad_t),
// so only their kernels are compiled twice. 'mean' needs its denominator before the gradient
// is scaled: a count kernel over the target (8 bytes per row) runs first and the loss kernel
// reads the count from device memory. Nothing here reads device memory from the host (no
// .item(), no sync).
//
// Out-of-range targets: a device-side assert (like torch's own kernels), and the row is treated
// as ignored, so there is never an out-of-bounds access even with asserts compiled out.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cuda/kernel_utils.cuh"
#include "losses_math.h"

namespace fused_losses {
namespace {

using namespace fused_losses::cuda;
namespace lm = fused_losses::math;

// The three input dtypes of the CUDA kernels (math in float32 for all of them).
#define FL_DISPATCH_CUDA_FLOATING_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// y = 2 * x + 1; grid-stride loop with int64 indices.
__global__ void build_probe_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = 2.0f * in[i] + 1.0f;
  }
}

// ==========================================================================================
// Shared pieces
// ==========================================================================================
enum class Reduction : int { None, Mean, Sum };

Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  TORCH_CHECK(false, "reduction: expected 'none', 'mean' or 'sum', got '", std::string(name), "'");
}

// The denominator of 'mean': count_dev[0] * count_mult when count_dev is given (a count made on
// the device), else count_host (known on the host: N for IB, numel for float targets).
struct MeanCount {
  const int64_t* count_dev = nullptr;
  int64_t count_mult = 1;
  int64_t count_host = 0;
};

__device__ __forceinline__ int64_t mean_count(const MeanCount& c) {
  return c.count_dev != nullptr ? c.count_dev[0] * c.count_mult : c.count_host;
}

// 1 / max(count, 1) for 'mean' (as the CPU kernels: float(1) / float(count)), else 1.
__device__ __forceinline__ float grad_scale(Reduction reduction, const MeanCount& c) {
  if (reduction != Reduction::Mean) return 1.0f;
  const int64_t n = mean_count(c);
  return 1.0f / static_cast<float>(n > 1 ? n : int64_t(1));
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

// count[0] += number of i < n with target[i] != ignore_index (count zeroed by the caller).
// Per block an integer sum, then one integer atomic per block (exact). Traffic: 8 bytes per row.
__global__ void __launch_bounds__(kThreads) count_valid_kernel(const int64_t* __restrict__ target, int64_t n,
                                                               int64_t ignore_index, int64_t* __restrict__ count) {
  long long local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    local += target[i] != ignore_index;
  }
  const long long total = block_sum(local);
  if (threadIdx.x == 0 && total != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(total));
  }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks for `work` independent items of `per_block` each, at most the number of blocks the
// device holds at once (kThreads-thread blocks, 2048 threads per multiprocessor): a persistent
// grid whose size, and so the order of every sum, depends only on the size and the device.
int64_t grid_for(int64_t work, int64_t per_block) {
  const int64_t resident = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                           (2048 / kThreads);
  const int64_t wanted = (work + per_block - 1) / per_block;
  return std::max<int64_t>(1, std::min(wanted, resident));
}

// Number of valid rows (target != ignore_index) as a device int64 (1,) tensor, no host read.
at::Tensor count_valid(const at::Tensor& target, int64_t ignore_index) {
  at::Tensor count = at::zeros({1}, target.options().dtype(at::kLong));
  const int64_t n = target.numel();
  if (n == 0) return count;
  const int64_t blocks = grid_for(n, kThreads * 4);
  count_valid_kernel<<<blocks, kThreads, 0, current_stream()>>>(target.data_ptr<int64_t>(), n, ignore_index,
                                                                count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count;
}

// Loss output of a reduced ('mean'/'sum') call: sums the partials and writes the 0-dim float32.
void finish_loss(const at::Tensor& partials, const MeanCount& count, Reduction reduction, const at::Tensor& out) {
  finish_loss_kernel<<<1, kThreads, 0, current_stream()>>>(partials.data_ptr<double>(), partials.numel(), count,
                                                           reduction == Reduction::Mean, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernels take float32, float16 or bfloat16 logits, got ", t);
}

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, ": expected a tensor on ", logits.device(), ", got ", t.device());
}

at::Tensor index_target(const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(!target.is_floating_point() && !target.is_complex() && target.scalar_type() != at::kBool,
              "target: expected integer class indices, got ", target.scalar_type());
  check_same_device(target, logits, "target");
  return target.to(at::kLong).contiguous();
}

// A per-class or per-row vector in float32 on the logits' device (no-op when it already is).
at::Tensor float_vector(const at::Tensor& v, const at::Tensor& logits, int64_t expected, const char* name) {
  check_same_device(v, logits, name);
  TORCH_CHECK(v.numel() == expected, name, ": expected ", expected, " values, got ", v.numel());
  return v.to(at::kFloat).contiguous().reshape({-1});
}

// dtype of a forward op's logits gradient (csrc/ops.cpp, fused_losses/_ops.py saved_grad_dtype,
// the CPU's saved_grad_dtype): the logits dtype for 'mean'/'sum' with bf16 or fp32 logits, else
// float32 ('none'; fp16 logits with every reduction). CUDA has no fp64.
at::ScalarType saved_grad_dtype(at::ScalarType logits_dtype, Reduction reduction) {
  if (reduction != Reduction::None && logits_dtype == at::kBFloat16) return at::kBFloat16;
  return at::kFloat;
}

// The saved gradient of a forward op: contiguous, logits-shaped, in saved_grad_dtype, as the
// schema's autograd formula expects; (0,) of that dtype when no gradient is asked for (the fake
// kernels give the same dtype). `zeroed`: filled with zeros of that dtype.
at::Tensor saved_grad_buffer(const at::Tensor& logits, bool compute_grad, bool zeroed, Reduction reduction) {
  const at::TensorOptions options = logits.options().dtype(saved_grad_dtype(logits.scalar_type(), reduction));
  if (!compute_grad) return at::empty({0}, options);
  return zeroed ? at::zeros(logits.sizes(), options) : at::empty(logits.sizes(), options);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<grad_t>{}) with grad_t the element type of the gradient buffer `grad` of a
// forward op over scalar_t logits: at::BFloat16 only when scalar_t is bf16 and `grad` is bf16
// (a reduced loss), else float. The bf16 branch is compiled for scalar_t = bf16 only, so fp16
// and fp32 logits instantiate every kernel once, as before. An empty (0,) buffer (no gradient
// wanted) dispatches on its dtype too; the kernels then get grad == nullptr.
template <typename scalar_t, typename Body>
void dispatch_grad_t(const at::Tensor& grad, Body&& body) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (grad.scalar_type() == at::kBFloat16) {
      body(TypeTag<at::BFloat16>{});
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(grad.scalar_type() == at::kFloat, "fused_losses: unexpected gradient dtype ",
                        grad.scalar_type());
  body(TypeTag<float>{});
}

// ==========================================================================================
// Softmax family
// ==========================================================================================
// What a softmax-row kernel computes per active row from log p_t (l):
//   Focal:    loss = alpha_t (1 - p_t)^gamma (-l),  k = scale * alpha_t * dFocal/dl
//   IB:       loss, k = scale * dloss/dl, d/dfeature from math::ib_row
//   OhemKept: loss = -l, k = -scale                      (rows of the `kept` mask only)
//   Ghmc:     loss = w[bin(1 - p_t)] (-l), k = -scale * w
//   Stats:    no loss; log p_t per row is the output
// and the gradient of every one is grad_c = k * ([c == t] - p_c) (losses_math.h).
enum class SoftmaxLoss : int { Focal, IB, OhemKept, Ghmc, Stats };

// grad_t: element type of the gradient output (float, or at::BFloat16 for bf16 logits with a
// reduced loss; see dispatch_grad_t).
template <typename scalar_t, typename grad_t = float>
struct SoftmaxArgs {
  const scalar_t* logits = nullptr;  // (N, C, S) contiguous
  const int64_t* target = nullptr;   // (N * S,)
  int64_t N = 0, C = 0, S = 1;
  int64_t ignore_index = 0;
  SoftmaxLoss loss = SoftmaxLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  // Focal (gamma also serves IB-focal)
  const float* alpha_per_class = nullptr;
  float alpha = 1.0f, gamma = 0.0f;
  // IB
  const float* feature_norm = nullptr;
  const float* class_weight = nullptr;
  float ib_alpha = 0.0f, ib_epsilon = 0.0f;
  bool detach_factor = false;
  // OHEM
  const bool* kept = nullptr;
  // GHM-C
  const float* bin_weights = nullptr;
  int64_t bins = 1;
  // Outputs, nullptr when not wanted.
  grad_t* grad = nullptr;          // (N, C, S), the saved gradient (saved_grad_dtype)
  scalar_t* loss_rows = nullptr;   // 'none': (N * S,)
  float* log_pt_rows = nullptr;    // Stats: (N * S,), 0 for inactive rows
  float* grad_feature = nullptr;   // IB: (N,)
  double* partials = nullptr;      // 'mean'/'sum': one per block
};

struct RowTarget {
  int64_t t;
  bool in_range;  // row < rows
  bool active;    // not ignored (and kept, for OHEM) and a valid class
};

template <typename A>
__device__ __forceinline__ RowTarget row_target(const A& a, int64_t row, int64_t rows) {
  RowTarget r{0, row < rows, false};
  if (!r.in_range) return r;
  r.t = a.target[row];
  r.active = r.t != a.ignore_index && (a.kept == nullptr || a.kept[row]);
  if (r.active && (r.t < 0 || r.t >= a.C)) {
    CUDA_KERNEL_ASSERT_MSG(false, "fused_losses: target class index out of range [0, C)");
    r.active = false;
  }
  return r;
}

struct RowResult {
  float loss;
  float k;               // dLoss/dlog p_t, already scaled
  float dloss_dfeature;  // IB only
};

template <typename A>
__device__ __forceinline__ RowResult softmax_row_result(const A& a, int64_t row, int64_t t, float log_pt, float scale) {
  RowResult out{0.0f, 0.0f, 0.0f};
  switch (a.loss) {
    case SoftmaxLoss::Focal: {
      const float alpha_t = lm::class_alpha(a.alpha_per_class, a.alpha, t);
      const lm::FocalTerm<float> ft = lm::focal_term(log_pt, a.gamma);
      out.loss = alpha_t * ft.value;
      out.k = scale * alpha_t * ft.dvalue_dlogpt;
      break;
    }
    case SoftmaxLoss::IB: {
      const float w = a.class_weight != nullptr ? a.class_weight[t] : 1.0f;
      const lm::IBRow<float> ib =
          lm::ib_row(log_pt, w, a.feature_norm[row], a.ib_alpha, a.ib_epsilon, a.gamma, a.detach_factor);
      out.loss = ib.loss;
      out.k = scale * ib.dloss_dlogpt;
      out.dloss_dfeature = scale * ib.dloss_dfeature;
      break;
    }
    case SoftmaxLoss::OhemKept:
      out.loss = -log_pt;
      out.k = -scale;
      break;
    case SoftmaxLoss::Ghmc: {
      const int64_t b = lm::ghm_bin(lm::ghm_softmax_g(log_pt), a.bins);
      const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
      out.loss = w * -log_pt;
      out.k = -scale * w;
      break;
    }
    case SoftmaxLoss::Stats:
      break;
  }
  return out;
}

// Per-row outputs, written once per row by one thread; returns the loss to accumulate.
template <typename scalar_t, typename grad_t>
__device__ __forceinline__ float write_row_outputs(const SoftmaxArgs<scalar_t, grad_t>& a, int64_t row,
                                                   const RowResult& res, float log_pt) {
  if (a.loss_rows != nullptr) a.loss_rows[row] = static_cast<scalar_t>(res.loss);
  if (a.log_pt_rows != nullptr) a.log_pt_rows[row] = log_pt;
  if (a.grad_feature != nullptr) a.grad_feature[row] = res.dloss_dfeature;
  return res.loss;
}

// ------------------------------------------------------------------------------------------
// softmax_rows_kernel: (N, C) rows (S = 1), C <= G * ITEMS * VEC. A group of G lanes per row
// (32 / G rows per warp); lane j of the group holds packs j, j + G, ... (VEC values each) in
// registers, so the row is read once and its exponentials are computed once:
//   m = max_c x_c (group shuffle), e_c = exp(x_c - m), s = sum_c e_c (group shuffle),
//   log p_t = x_t - m - log s, (loss, k) = softmax_row_result(...),
//   grad_c = -k e_c / s for c != t, grad_{c=t} = k (1 - p_t) = k * -expm1(log p_t),
// each computed in float32 and rounded once to the gradient's element type grad_t. Memory traffic per element:
// sizeof(scalar_t) read + sizeof(grad_t) written (VEC-value packs: 16 bytes of bf16 gradient
// for bf16 'mean'/'sum', 4 * VEC bytes of float32 otherwise); per row: 8 bytes of target
// (+ sizeof(scalar_t) for 'none' losses, 4 for Stats log p_t). Ignored rows skip the logits
// read and write a zero gradient row.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int VEC, int G, int ITEMS>
__global__ void __launch_bounds__(kThreads) softmax_rows_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  constexpr int kRowsPerWarp = 32 / G;
  const int lane = threadIdx.x % 32;
  const int group = lane / G;
  const int member = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t rows = a.N;
  const int64_t C = a.C;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  // The loop bound is the same for every lane of the warp (the shuffles need all 32 lanes).
  for (int64_t first = warp * kRowsPerWarp; first < rows; first += warps * kRowsPerWarp) {
    const int64_t row = first + group;
    const RowTarget rt = row_target(a, row, rows);
    const int64_t row_offset = (rt.in_range ? row : int64_t(0)) * C;
    const scalar_t* x = a.logits + row_offset;
    float v[ITEMS][VEC];
    float row_max = -std::numeric_limits<float>::infinity();
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c0 = static_cast<int64_t>(member + i * G) * VEC;
      if (rt.active && c0 < C) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[i][e] = static_cast<float>(p.v[e]);
          row_max = v[i][e] > row_max ? v[i][e] : row_max;
        }
      }
    }
    row_max = group_max<G>(row_max);
    float row_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t c0 = static_cast<int64_t>(member + i * G) * VEC;
      if (rt.active && c0 < C) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[i][e] = lm::exp_(v[i][e] - row_max);
          row_sum += v[i][e];
        }
      }
    }
    row_sum = group_sum<G>(row_sum);
    RowResult res{0.0f, 0.0f, 0.0f};
    float log_pt = 0.0f;
    if (rt.active) {
      log_pt = lm::log_softmax_target(static_cast<float>(x[rt.t]), row_max, lm::log_(row_sum));
      res = softmax_row_result(a, row, rt.t, log_pt, scale);
    }
    if (a.grad != nullptr && rt.in_range) {
      grad_t* g = a.grad + row_offset;
      const float p_scale = -res.k / row_sum;
      const float target_grad = res.k * lm::one_minus_pt_from_log(log_pt);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t c0 = static_cast<int64_t>(member + i * G) * VEC;
        if (c0 < C) {
          Pack<grad_t, VEC> out;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            out.v[e] = static_cast<grad_t>(!rt.active ? 0.0f : (c0 + e == rt.t ? target_grad : p_scale * v[i][e]));
          }
          store_pack<VEC>(g + c0, out);
        }
      }
    }
    if (member == 0 && rt.in_range) acc += write_row_outputs(a, row, res, log_pt);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// softmax_rows_large_kernel: (N, C) rows too long for registers. A warp per row, three sweeps
// over the row (max; sum of e_c; gradient with e_c recomputed), VEC-value packs. The second and
// third sweeps re-read the row just read, from L1/L2: device-memory traffic stays one read and
// one write per element (rows up to ~100 KB per warp stay cached). Gradient in grad_t, as above.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads) softmax_rows_large_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t rows = a.N;
  const int64_t C = a.C;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  for (int64_t row = warp; row < rows; row += warps) {  // one row per warp: warp-uniform branches
    const RowTarget rt = row_target(a, row, rows);
    const scalar_t* x = a.logits + row * C;
    float row_max = -std::numeric_limits<float>::infinity();
    float row_sum = 0.0f;
    RowResult res{0.0f, 0.0f, 0.0f};
    float log_pt = 0.0f;
    if (rt.active) {
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float value = static_cast<float>(p.v[e]);
          row_max = value > row_max ? value : row_max;
        }
      }
      row_max = group_max<32>(row_max);
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) row_sum += lm::exp_(static_cast<float>(p.v[e]) - row_max);
      }
      row_sum = group_sum<32>(row_sum);
      log_pt = lm::log_softmax_target(static_cast<float>(x[rt.t]), row_max, lm::log_(row_sum));
      res = softmax_row_result(a, row, rt.t, log_pt, scale);
    }
    if (a.grad != nullptr) {
      grad_t* g = a.grad + row * C;
      const float p_scale = -res.k / row_sum;
      const float target_grad = res.k * lm::one_minus_pt_from_log(log_pt);
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        Pack<grad_t, VEC> out;
        if (rt.active) {
          const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            out.v[e] = static_cast<grad_t>(c0 + e == rt.t ? target_grad
                                                           : p_scale * lm::exp_(static_cast<float>(p.v[e]) - row_max));
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<grad_t>(0.0f);
        }
        store_pack<VEC>(g + c0, out);
      }
    }
    if (lane == 0) acc += write_row_outputs(a, row, res, log_pt);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// softmax_spatial_kernel: channel-second (N, C, S) logits, S > 1, read in place. A thread per
// row r = n * S + s; consecutive threads take consecutive s, so for each class c a warp reads
// 32 consecutive values (coalesced) at n*C*S + c*S + s. kRegs > 0 (C <= kRegs): the row lives
// in registers (one read, exponentials once). kRegs == 0: three sweeps over the row (max, sum,
// gradient), the later two from L1/L2 (a block's rows are 256 * C * sizeof(scalar_t) bytes).
// Same formulas as softmax_rows_kernel. Memory traffic per element: sizeof(scalar_t) read,
// sizeof(grad_t) gradient written (single values, coalesced across the warp); per row 8 bytes
// of target.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int kRegs>
__global__ void __launch_bounds__(kThreads) softmax_spatial_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  const int64_t rows = a.N * a.S;
  const int64_t C = a.C, S = a.S;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < rows; row += stride) {
    const RowTarget rt = row_target(a, row, rows);
    const int64_t n = row / S;
    const int64_t base = n * C * S + (row - n * S);
    const scalar_t* x = a.logits + base;
    constexpr int kSlots = kRegs > 0 ? kRegs : 1;
    [[maybe_unused]] float v[kSlots];
    float row_max = -std::numeric_limits<float>::infinity();
    float row_sum = 0.0f;
    RowResult res{0.0f, 0.0f, 0.0f};
    float log_pt = 0.0f;
    if (rt.active) {
      if constexpr (kRegs > 0) {
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            v[c] = static_cast<float>(x[c * S]);
            row_max = v[c] > row_max ? v[c] : row_max;
          }
        }
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            v[c] = lm::exp_(v[c] - row_max);
            row_sum += v[c];
          }
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float value = static_cast<float>(x[c * S]);
          row_max = value > row_max ? value : row_max;
        }
        for (int64_t c = 0; c < C; ++c) row_sum += lm::exp_(static_cast<float>(x[c * S]) - row_max);
      }
      log_pt = lm::log_softmax_target(static_cast<float>(x[rt.t * S]), row_max, lm::log_(row_sum));
      res = softmax_row_result(a, row, rt.t, log_pt, scale);
    }
    if (a.grad != nullptr) {
      grad_t* g = a.grad + base;
      const float p_scale = -res.k / row_sum;
      const float target_grad = res.k * lm::one_minus_pt_from_log(log_pt);
      if constexpr (kRegs > 0) {
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            g[c * S] = static_cast<grad_t>(!rt.active ? 0.0f : (c == rt.t ? target_grad : p_scale * v[c]));
          }
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          g[c * S] = static_cast<grad_t>(
              !rt.active ? 0.0f
                         : (c == rt.t ? target_grad : p_scale * lm::exp_(static_cast<float>(x[c * S]) - row_max)));
        }
      }
    }
    acc += write_row_outputs(a, row, res, log_pt);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// focal_probs_kernel: focal with from_logits=False (the input holds probabilities). A thread
// per row reads only x_t: loss = alpha_t (1 - x_t)^gamma (-log x_t), and writes the one
// nonzero gradient value grad_{c=t} = scale * alpha_t * dFocal/dl / x_t (rounded once to the
// gradient's element type grad_t) into a gradient the host zeroed in that type. Traffic: per row 8
// bytes of target + one scattered logit read + one gradient write, plus the zero fill of the
// gradient (sizeof(grad_t) per element).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) focal_probs_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  const int64_t rows = a.N * a.S;
  const int64_t C = a.C, S = a.S;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < rows; row += stride) {
    const RowTarget rt = row_target(a, row, rows);
    RowResult res{0.0f, 0.0f, 0.0f};
    if (rt.active) {
      const int64_t n = row / S;
      const int64_t at_t = n * C * S + (row - n * S) + rt.t * S;
      const float p_t = static_cast<float>(a.logits[at_t]);
      const float alpha_t = lm::class_alpha(a.alpha_per_class, a.alpha, rt.t);
      const lm::FocalTerm<float> ft = lm::focal_term(lm::log_(p_t), a.gamma);
      res.loss = alpha_t * ft.value;
      if (a.grad != nullptr) a.grad[at_t] = static_cast<grad_t>(scale * alpha_t * ft.dvalue_dlogpt / p_t);
    }
    acc += write_row_outputs(a, row, res, 0.0f);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

template <typename scalar_t, typename grad_t>
struct SoftmaxLaunch {
  void (*kernel)(const SoftmaxArgs<scalar_t, grad_t>);
  int64_t rows_per_block;
};

// The kernel instance for (N, C) rows with VEC-value packs: the smallest register layout that
// holds the row, or the three-sweep kernel for long rows.
template <typename scalar_t, typename grad_t, int VEC>
SoftmaxLaunch<scalar_t, grad_t> pick_rows_kernel(int64_t C) {
  const int64_t packs = (C + VEC - 1) / VEC;
  if (packs <= 4) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 4, 1>, kWarps * 8};
  if (packs <= 16) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 16, 1>, kWarps * 2};
  if (packs <= 32) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 32, 1>, kWarps};
  if (packs <= 128) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 32, 4>, kWarps};
  return {softmax_rows_large_kernel<scalar_t, grad_t, VEC>, kWarps};
}

constexpr int kSpatialRegs = 32;  // channel-second rows of up to 32 classes stay in registers

template <typename scalar_t, typename grad_t>
void softmax_pass(SoftmaxArgs<scalar_t, grad_t> a, bool from_probs, const at::Tensor& reduced) {
  using Launch = SoftmaxLaunch<scalar_t, grad_t>;
  const int64_t rows = a.N * a.S;
  if (rows == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  Launch launch;
  if (from_probs) {
    launch = {focal_probs_kernel<scalar_t, grad_t>, kThreads};
  } else if (a.S > 1) {
    launch = a.C <= kSpatialRegs ? Launch{softmax_spatial_kernel<scalar_t, grad_t, kSpatialRegs>, kThreads}
                                 : Launch{softmax_spatial_kernel<scalar_t, grad_t, 0>, kThreads};
  } else {
    // Packs of kVec values: 16 bytes of logits, kVec * sizeof(grad_t) bytes of gradient (16 for
    // a gradient in the logits dtype, 32 = two stores for a float32 gradient of fp16/bf16).
    // Row offsets are multiples of kVec values, so aligned base pointers keep every pack aligned.
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool packed = a.C % kVec == 0 && aligned_to(a.logits, 16) &&
                        (a.grad == nullptr || aligned_to(a.grad, kVec * sizeof(grad_t)));
    launch = packed ? pick_rows_kernel<scalar_t, grad_t, kVec>(a.C) : pick_rows_kernel<scalar_t, grad_t, 1>(a.C);
  }
  const int64_t blocks = grid_for(rows, launch.rows_per_block);
  at::Tensor partials;
  if (reduced.defined()) {
    partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
    a.partials = partials.data_ptr<double>();
  }
  launch.kernel<<<blocks, kThreads, 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (reduced.defined()) finish_loss(partials, a.count, a.reduction, reduced);
}

struct SoftmaxShape {
  int64_t N, C, S;
};

SoftmaxShape softmax_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 2, "logits: expected (N, C) or (N, C, d...), got ", logits.sizes());
  int64_t s = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) s *= logits.size(d);
  return {logits.size(0), logits.size(1), s};
}

// The common set-up of the softmax-family ops: contiguous logits, int64 target, outputs.
struct SoftmaxCall {
  at::Tensor logits, target, grad, loss;
  SoftmaxShape sh;
  Reduction reduction;
};

SoftmaxCall softmax_call(const at::Tensor& logits_in, const at::Tensor& target_in, c10::string_view reduction_name,
                         bool compute_grad, bool zero_grad, const char* op) {
  SoftmaxCall call;
  check_logits(logits_in, op);
  call.reduction = parse_reduction(reduction_name);
  call.logits = logits_in.contiguous();
  call.sh = softmax_shape(call.logits);
  call.target = index_target(target_in, logits_in);
  TORCH_CHECK(call.target.numel() == call.sh.N * call.sh.S, "target: expected ", call.sh.N * call.sh.S,
              " class indices, got ", call.target.numel());
  call.grad = saved_grad_buffer(call.logits, compute_grad, zero_grad, call.reduction);
  call.loss = call.reduction == Reduction::None
                  ? at::empty(target_in.sizes(), call.logits.options())
                  : at::empty({}, call.logits.options().dtype(at::promote_types(call.logits.scalar_type(), at::kFloat)));
  return call;
}

// Arguments of a softmax pass over the call's logits. grad_t must be the element type of
// call.grad (dispatch_grad_t), except for Stats passes, which never write a gradient (grad_t =
// float, a.grad = nullptr whatever call.grad is).
template <typename scalar_t, typename grad_t = float>
SoftmaxArgs<scalar_t, grad_t> softmax_args(const SoftmaxCall& call, int64_t ignore_index, SoftmaxLoss loss) {
  SoftmaxArgs<scalar_t, grad_t> a;
  a.logits = call.logits.data_ptr<scalar_t>();
  a.target = call.target.data_ptr<int64_t>();
  a.N = call.sh.N;
  a.C = call.sh.C;
  a.S = call.sh.S;
  a.ignore_index = ignore_index;
  a.loss = loss;
  a.reduction = call.reduction;
  a.grad = loss != SoftmaxLoss::Stats && call.grad.numel() > 0 ? call.grad.data_ptr<grad_t>() : nullptr;
  a.loss_rows = call.reduction == Reduction::None && call.loss.numel() > 0 ? call.loss.data_ptr<scalar_t>() : nullptr;
  return a;
}

at::Tensor reduced_output(const SoftmaxCall& call) {
  return call.reduction == Reduction::None ? at::Tensor() : call.loss;
}

// softmax_focal_forward: count pass (for 'mean') + one softmax pass. Traffic per element:
// read the logits once (sizeof(scalar_t)), write the gradient once (sizeof(grad_t): 2 bytes
// for bf16 'mean'/'sum', else 4); per row 8 (count) + 8 bytes of target.
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            const c10::optional<at::Tensor>& alpha_per_class,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction, bool from_logits,
                                                            bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const SoftmaxCall call =
      softmax_call(logits_in, target_in, reduction, compute_grad, /*zero_grad=*/!from_logits, "softmax_focal_forward");
  at::Tensor alpha_vec, count;
  if (alpha_per_class.has_value()) alpha_vec = float_vector(*alpha_per_class, call.logits, call.sh.C, "alpha");
  if (call.reduction == Reduction::Mean) count = count_valid(call.target, ignore_index);
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "softmax_focal_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::Focal);
      a.alpha_per_class = alpha_vec.defined() ? alpha_vec.data_ptr<float>() : nullptr;
      a.alpha = static_cast<float>(alpha);
      a.gamma = static_cast<float>(gamma);
      if (count.defined()) a.count.count_dev = count.data_ptr<int64_t>();
      softmax_pass(a, !from_logits, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

// ohem_forward: stats pass (log p_t per row: read the logits once, write 4 bytes per row),
// selection on the N-sized arrays with torch ops on the device (the reference's sort-rank or
// mmseg-threshold rule, no host read), then the loss/gradient pass over the kept rows (read the
// logits again, write the gradient once).
std::tuple<at::Tensor, at::Tensor> ohem_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   double keep_fraction, int64_t keep_count,
                                                   c10::optional<double> thresh, int64_t min_kept_total,
                                                   int64_t ignore_index, c10::string_view reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction, compute_grad, false, "ohem_forward");
  const int64_t rows = call.sh.N * call.sh.S;
  const at::Tensor log_pt = at::empty({rows}, call.logits.options().dtype(at::kFloat));
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ohem_stats_cuda", [&] {
    SoftmaxArgs<scalar_t> a = softmax_args<scalar_t>(call, ignore_index, SoftmaxLoss::Stats);  // no gradient
    a.reduction = Reduction::None;
    a.grad = nullptr;
    a.loss_rows = nullptr;
    a.log_pt_rows = log_pt.data_ptr<float>();
    softmax_pass(a, false, at::Tensor());
  });
  const at::Tensor valid = call.target.ne(ignore_index);
  const at::Tensor n_valid = valid.sum();  // int64, on the device
  at::Tensor kept;
  if (!thresh.has_value()) {
    const at::Tensor k = keep_count > 0 ? at::clamp_max(n_valid, keep_count)
                                        : at::clamp_min(at::floor(n_valid.to(at::kDouble) * keep_fraction).to(at::kLong), 1);
    // Descending cross entropy, ignored rows last, ties to the lower index (stable sort).
    const at::Tensor key = at::where(valid, log_pt.neg(), -std::numeric_limits<float>::infinity());
    const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/true));
    at::Tensor rank = at::empty_like(order);
    rank.scatter_(0, order, at::arange(rows, order.options()));  // order is a permutation
    kept = rank.lt(k).logical_and_(valid);
  } else {
    const at::Tensor p = log_pt.exp();
    // Ignored rows sort as NaN (last, with NaN valid ones): the first n_valid sorted values are
    // mmseg's sort of the valid rows alone (reference.ohem_kept_mask does the same).
    const at::Tensor p_sorted =
        std::get<0>(at::sort(at::where(valid, p, std::numeric_limits<float>::quiet_NaN()), /*stable=*/true, 0, false));
    const at::Tensor idx = at::clamp_min(at::clamp_max(n_valid - 1, min_kept_total), 0);
    const at::Tensor at_idx = rows > 0 ? p_sorted.gather(0, idx.reshape({1})).squeeze(0) : p.new_zeros({});
    const at::Tensor min_threshold = at::where(n_valid.gt(0), at_idx, at::zeros_like(at_idx));
    const at::Tensor threshold = at::clamp_min(min_threshold, *thresh);
    kept = p.lt(threshold).logical_and_(valid);
  }
  const at::Tensor n_kept = kept.sum();  // int64, on the device
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ohem_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::OhemKept);
      a.kept = kept.data_ptr<bool>();
      a.count.count_dev = n_kept.data_ptr<int64_t>();
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

// ib_forward: one softmax pass on (N, C); per row math::ib_row. 'mean' divides by N.
// Traffic per element: read once, gradient written once (in saved_grad_dtype); per row 8
// (target) + 4 (feature norm) + 4 (feature gradient, always float32) bytes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const at::Tensor& feature_norm_in,
                                                           const c10::optional<at::Tensor>& class_weight_in,
                                                           double alpha, double epsilon, double gamma,
                                                           bool detach_factor, c10::string_view reduction,
                                                           bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  TORCH_CHECK(logits_in.dim() == 2, "logits: ib takes (N, C) logits, got ", logits_in.sizes());
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction, compute_grad, false, "ib_forward");
  const int64_t N = call.sh.N;
  const at::Tensor feature_norm = float_vector(feature_norm_in, call.logits, N, "feature_norm");
  at::Tensor class_weight;
  if (class_weight_in.has_value()) class_weight = float_vector(*class_weight_in, call.logits, call.sh.C, "weight");
  const at::Tensor grad_feature = at::empty({compute_grad ? N : 0}, call.logits.options().dtype(at::kFloat));
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ib_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      // No ignore_index in IB: a sentinel no class index can equal.
      SoftmaxArgs<scalar_t, grad_t> a =
          softmax_args<scalar_t, grad_t>(call, std::numeric_limits<int64_t>::min(), SoftmaxLoss::IB);
      a.feature_norm = feature_norm.data_ptr<float>();
      a.class_weight = class_weight.defined() ? class_weight.data_ptr<float>() : nullptr;
      a.ib_alpha = static_cast<float>(alpha);
      a.ib_epsilon = static_cast<float>(epsilon);
      a.gamma = static_cast<float>(gamma);
      a.detach_factor = detach_factor;
      a.grad_feature = compute_grad && N > 0 ? grad_feature.data_ptr<float>() : nullptr;
      a.count.count_host = N;
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad, grad_feature};
}

// ==========================================================================================
// Sigmoid family
// ==========================================================================================
enum class SigmoidLoss : int { Focal, Ghmc };

// grad_t: element type of the gradient output, as in SoftmaxArgs (the histogram kernels write
// no gradient and use the default).
template <typename scalar_t, typename target_t, typename grad_t = float>
struct SigmoidArgs {
  const scalar_t* logits = nullptr;  // (M, C) contiguous
  const target_t* target = nullptr;  // float target (M, C), or nullptr with labels
  const int64_t* labels = nullptr;   // (M,) labels, or nullptr with a float target
  int64_t M = 0, C = 0, numel = 0;
  int64_t ignore_index = 0;
  SigmoidLoss loss = SigmoidLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  float alpha = 0.25f, gamma = 2.0f;   // Focal
  const float* bin_weights = nullptr;  // Ghmc
  int64_t bins = 1;
  grad_t* grad = nullptr;              // (M, C) saved gradient (saved_grad_dtype) or nullptr
  scalar_t* loss_elems = nullptr;      // 'none': (M, C) or nullptr
  double* partials = nullptr;          // 'mean'/'sum': one per block
};

// Label of row r: the label itself, or -1 when the row is ignored (or out of [0, C]: device
// assert, then ignored). ignore_index is checked before the range, like the API says.
template <typename A>
__device__ __forceinline__ int64_t row_label(const A& a, int64_t r, bool& valid) {
  const int64_t label = a.labels[r];
  valid = label != a.ignore_index;
  if (valid && (label < 0 || label > a.C)) {
    CUDA_KERNEL_ASSERT_MSG(false, "fused_losses: label out of range [0, C]");
    valid = false;
  }
  return label;
}

// Element loss and gradient (gradient already scaled):
//   Focal: math::sigmoid_focal_element (alpha_t * BCE * (1 - p_t)^gamma and its derivative)
//   Ghmc:  loss = w[bin(|p - y|)] * BCE, grad = scale * w * (p - y)
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> sigmoid_element(const A& a, float x, float y, float scale) {
  const float e = lm::exp_(-lm::abs_(x));
  lm::LossGrad<float> out;
  if (a.loss == SigmoidLoss::Focal) {
    out = lm::sigmoid_focal_element(x, y, a.alpha, a.gamma, e);
    out.grad *= scale;
  } else {
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(x, y), a.bins);
    const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
    const lm::SigmoidParts<float> s = lm::sigmoid_parts(x, y, e);
    out.loss = w * s.bce;
    out.grad = scale * w * (s.p - y);
  }
  return out;
}

// Row index of element i (i < numel): 32-bit division when the tensor allows (cheaper).
__device__ __forceinline__ int64_t row_of(int64_t i, int64_t C, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(C)) : i / C;
}

// ------------------------------------------------------------------------------------------
// sigmoid_kernel: elementwise over (M, C). A thread takes packs of VEC = 16 / sizeof(scalar_t)
// consecutive elements (one 16-byte load of logits, one of a same-dtype target; a float32
// target of fp16/bf16 logits is two), the last numel % VEC elements one by one. Integer labels:
// y_c = [label == c] from the row's label (8 bytes per row, no one-hot); ignored rows give 0.
// Memory traffic per element: sizeof(scalar_t) read (+ sizeof(target_t) for a float target),
// sizeof(grad_t) written for the gradient (computed in float32, rounded once; a pack is 16
// bytes in the logits dtype, 4 * VEC of float32), + sizeof(scalar_t) for 'none' losses.
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename target_t, typename grad_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) sigmoid_kernel(const SigmoidArgs<scalar_t, target_t, grad_t> a) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const float scale = grad_scale(a.reduction, a.count);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double acc = 0.0;
  const int64_t packs = a.numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const int64_t i0 = p * VEC;
    const Pack<scalar_t, VEC> xs = load_pack<VEC>(a.logits + i0);
    float y[VEC];
    bool valid[VEC];
    if constexpr (kLabels) {
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
      bool row_valid;
      int64_t label = row_label(a, r, row_valid);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = row_valid;
        y[e] = label == c ? 1.0f : 0.0f;
        if (++c == a.C && e + 1 < VEC) {  // the next element starts row r + 1 (< M: it exists)
          c = 0;
          label = row_label(a, ++r, row_valid);
        }
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = true;
        y[e] = static_cast<float>(ts.v[e]);
      }
    }
    Pack<grad_t, VEC> grads;
    Pack<scalar_t, VEC> losses;
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      lm::LossGrad<float> lg{0.0f, 0.0f};
      if (valid[e]) lg = sigmoid_element(a, static_cast<float>(xs.v[e]), y[e], scale);
      pack_loss += lg.loss;
      grads.v[e] = static_cast<grad_t>(lg.grad);
      losses.v[e] = static_cast<scalar_t>(lg.loss);
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_elems != nullptr) store_pack<VEC>(a.loss_elems + i0, losses);
    acc += pack_loss;
  }
  for (int64_t i = packs * VEC + first; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    if constexpr (kLabels) {
      const int64_t r = row_of(i, a.C, small);
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = static_cast<float>(a.target[i]);
    }
    lm::LossGrad<float> lg{0.0f, 0.0f};
    if (valid) lg = sigmoid_element(a, static_cast<float>(a.logits[i]), y, scale);
    if (a.grad != nullptr) a.grad[i] = static_cast<grad_t>(lg.grad);
    if (a.loss_elems != nullptr) a.loss_elems[i] = static_cast<scalar_t>(lg.loss);
    acc += lg.loss;
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// Contiguous and aligned to `bytes` (a misaligned view gets one copy, so the kernels can use
// packed accesses everywhere).
at::Tensor aligned_contiguous(const at::Tensor& t, size_t bytes) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !aligned_to(c.data_ptr(), bytes)) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The common set-up of the sigmoid-family ops.
struct SigmoidCall {
  at::Tensor logits;        // contiguous, 16-byte aligned
  at::Tensor float_target;  // contiguous, aligned; logits dtype or float32; undefined with labels
  at::Tensor labels;        // int64 (M,); undefined with a float target
  at::Tensor count;         // labels: valid rows on the device (for 'mean' and GHM)
  int64_t M = 0, C = 0;
};

SigmoidCall sigmoid_call(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index, bool need_count,
                         const char* op) {
  SigmoidCall call;
  check_logits(logits_in, op);
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  call.logits = aligned_contiguous(logits_in, 16);
  call.C = call.logits.size(-1);
  call.M = call.C == 0 ? 0 : call.logits.numel() / call.C;
  if (target_in.is_floating_point()) {
    check_same_device(target_in, logits_in, "target");
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "target: a float target must have the logits' shape");
    const at::ScalarType td = target_in.scalar_type() == call.logits.scalar_type() ? target_in.scalar_type() : at::kFloat;
    const size_t vec = 16 / call.logits.element_size();
    call.float_target = aligned_contiguous(target_in.to(td), vec * at::elementSize(td));
  } else {
    call.labels = index_target(target_in, logits_in);
    TORCH_CHECK(call.labels.numel() == call.M, "target: integer labels must have shape logits.shape[:-1]");
    if (need_count) call.count = count_valid(call.labels, ignore_index);
  }
  return call;
}

MeanCount sigmoid_mean_count(const SigmoidCall& call) {
  MeanCount c;
  if (call.count.defined()) {
    c.count_dev = call.count.data_ptr<int64_t>();
    c.count_mult = call.C;
  } else {
    c.count_host = call.M * call.C;
  }
  return c;
}

// a.grad (a fresh buffer, or nullptr) is aligned for any pack: the CUDA caching allocator
// returns blocks aligned to far more than the 32 bytes of a Pack<float, 8>.
template <bool kLabels, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (a.numel == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  const int64_t blocks = grid_for(a.numel, static_cast<int64_t>(kThreads) * VEC);
  at::Tensor partials;
  if (reduced.defined()) {
    partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
    a.partials = partials.data_ptr<double>();
  }
  TORCH_INTERNAL_ASSERT(a.grad == nullptr || aligned_to(a.grad, VEC * sizeof(grad_t)),
                        "fused_losses: misaligned gradient buffer");
  sigmoid_kernel<scalar_t, target_t, grad_t, kLabels><<<blocks, kThreads, 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (reduced.defined()) finish_loss(partials, a.count, a.reduction, reduced);
}

// Runs the sigmoid kernel for the call's target kind; `configure` fills the loss fields.
template <typename Configure>
std::tuple<at::Tensor, at::Tensor> sigmoid_forward(const SigmoidCall& call, const at::Tensor& logits_in,
                                                  int64_t ignore_index, Reduction reduction, bool compute_grad,
                                                  Configure&& configure) {
  at::Tensor grad = saved_grad_buffer(call.logits, compute_grad, false, reduction);
  at::Tensor loss = reduction == Reduction::None
                        ? at::empty(logits_in.sizes(), call.logits.options())
                        : at::empty({}, call.logits.options().dtype(at::promote_types(call.logits.scalar_type(), at::kFloat)));
  const at::Tensor reduced = reduction == Reduction::None ? at::Tensor() : loss;
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "sigmoid_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      auto fill = [&](auto& a) {
        a.logits = call.logits.data_ptr<scalar_t>();
        a.M = call.M;
        a.C = call.C;
        a.numel = call.logits.numel();
        a.ignore_index = ignore_index;
        a.reduction = reduction;
        a.count = sigmoid_mean_count(call);
        a.grad = compute_grad && a.numel > 0 ? grad.data_ptr<grad_t>() : nullptr;
        a.loss_elems = reduction == Reduction::None && a.numel > 0 ? loss.data_ptr<scalar_t>() : nullptr;
        configure(a);
      };
      if (call.labels.defined()) {
        SigmoidArgs<scalar_t, float, grad_t> a;
        fill(a);
        a.labels = call.labels.data_ptr<int64_t>();
        launch_sigmoid<true>(a, reduced);
      } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
        SigmoidArgs<scalar_t, scalar_t, grad_t> a;
        fill(a);
        a.target = call.float_target.data_ptr<scalar_t>();
        launch_sigmoid<false>(a, reduced);
      } else {
        if constexpr (!std::is_same_v<scalar_t, float>) {
          SigmoidArgs<scalar_t, float, grad_t> a;
          fill(a);
          a.target = call.float_target.data_ptr<float>();
          launch_sigmoid<false>(a, reduced);
        }
      }
    });
  });
  return {loss, grad};
}

// sigmoid_focal_forward: one elementwise pass (+ the label count for 'mean').
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction_name, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Reduction reduction = parse_reduction(reduction_name);
  const SigmoidCall call =
      sigmoid_call(logits_in, target_in, ignore_index, reduction == Reduction::Mean, "sigmoid_focal_forward");
  return sigmoid_forward(call, logits_in, ignore_index, reduction, compute_grad, [&](auto& a) {
    a.loss = SigmoidLoss::Focal;
    a.alpha = static_cast<float>(alpha);
    a.gamma = static_cast<float>(gamma);
  });
}

// ==========================================================================================
// GHM-C
// ==========================================================================================
// Histogram of the sigmoid-family bins bin(|sigmoid(x) - y|) over the valid elements: per block
// in shared memory (bins <= kSharedBins), then one integer atomic per non-empty bin per block
// into counts (int64, zeroed). Traffic per element: one logits read (+ a float target read).
constexpr int64_t kSharedBins = 4096;

// One block's bin counts: in shared memory when bins <= kSharedBins (then one global integer
// atomic per non-empty bin per block in flush()), else straight into the global int64 counts.
// Integer atomics only, so the counts are exact and deterministic. `bins` is the same for every
// thread of the block, so the __syncthreads() calls are reached uniformly.
struct BlockHistogram {
  unsigned int* hist;
  unsigned long long* counts;
  int64_t bins;
  bool in_shared;

  __device__ BlockHistogram(unsigned int* shared_hist, unsigned long long* global_counts, int64_t num_bins)
      : hist(shared_hist), counts(global_counts), bins(num_bins), in_shared(num_bins <= kSharedBins) {
    if (in_shared) {
      for (int64_t b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0u;
      __syncthreads();
    }
  }

  __device__ void add(int64_t b) {
    if (in_shared) {
      atomicAdd(&hist[b], 1u);
    } else {
      atomicAdd(&counts[b], 1ull);
    }
  }

  __device__ void flush() {
    if (!in_shared) return;
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += kThreads) {
      if (hist[b] != 0u) atomicAdd(&counts[b], static_cast<unsigned long long>(hist[b]));
    }
  }
};

template <typename scalar_t, typename target_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) ghm_sigmoid_histogram_kernel(const SigmoidArgs<scalar_t, target_t> a,
                                                                         unsigned long long* __restrict__ counts) {
  __shared__ unsigned int hist[kSharedBins];
  BlockHistogram histogram(hist, counts, a.bins);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    if constexpr (kLabels) {
      const int64_t r = row_of(i, a.C, small);
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = static_cast<float>(a.target[i]);
    }
    if (!valid) continue;
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(static_cast<float>(a.logits[i]), y), a.bins);
    if (b >= 0) histogram.add(b);
  }
  histogram.flush();
}

// Histogram of the softmax bins bin(1 - p_t) = bin(-expm1(log p_t)) of the valid rows, from
// the float32 log p_t of a stats pass. Traffic per row: 4 + 8 bytes.
__global__ void __launch_bounds__(kThreads) ghm_softmax_histogram_kernel(const float* __restrict__ log_pt,
                                                                         const int64_t* __restrict__ target,
                                                                         int64_t rows, int64_t ignore_index,
                                                                         int64_t bins,
                                                                         unsigned long long* __restrict__ counts) {
  __shared__ unsigned int hist[kSharedBins];
  BlockHistogram histogram(hist, counts, bins);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows; r += stride) {
    if (target[r] == ignore_index) continue;
    const int64_t b = lm::ghm_bin(lm::ghm_softmax_g(log_pt[r]), bins);
    if (b >= 0) histogram.add(b);
  }
  histogram.flush();
}

// Bin weights from the counts (reference.ghmc, the CPU's ghm_weights_from_counts): EMA update
// of `state` first (bins non-empty in this batch: acc = m * acc + (1 - m) * count, float32),
// divisor = state or count, weight_b = n_valid / max(divisor_b, 1e-12) / n_nonempty for
// non-empty bins, 0 otherwise. One thread: bins-sized work.
__global__ void ghm_weights_kernel(const int64_t* __restrict__ counts, int64_t bins, MeanCount valid,
                                   float* __restrict__ state, float momentum, float one_minus_momentum,
                                   float* __restrict__ weights) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t nonempty = 0;
  for (int64_t b = 0; b < bins; ++b) nonempty += counts[b] > 0;
  const float nv = static_cast<float>(mean_count(valid));
  const float ne = static_cast<float>(nonempty > 1 ? nonempty : int64_t(1));
  for (int64_t b = 0; b < bins; ++b) {
    float divisor = static_cast<float>(counts[b]);
    if (state != nullptr) {
      if (counts[b] > 0) state[b] = lm::ghm_ema(state[b], static_cast<float>(counts[b]), momentum, one_minus_momentum);
      divisor = state[b];
    }
    const float d = divisor > 1e-12f ? divisor : 1e-12f;
    weights[b] = counts[b] > 0 ? (nv / d) / ne : 0.0f;
  }
}

at::Tensor ghmc_bin_weights_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                 const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                 bool use_sigmoid, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  if (state.has_value()) {
    check_same_device(*state, logits_in, "state");
    TORCH_CHECK(state->scalar_type() == at::kFloat && state->numel() == bins && state->is_contiguous(),
                "state: expected a contiguous float32 tensor of shape (", bins, ",)");
  }
  at::Tensor counts = at::zeros({bins}, logits_in.options().dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  MeanCount valid;
  at::Tensor valid_rows;
  if (use_sigmoid) {
    const SigmoidCall call = sigmoid_call(logits_in, target_in, ignore_index, /*need_count=*/true, "ghmc_bin_weights");
    valid = sigmoid_mean_count(call);
    valid_rows = call.count;
    const int64_t numel = call.logits.numel();
    if (numel > 0) {
      const int64_t blocks = grid_for(numel, kThreads * 4);
      FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghm_histogram_cuda", [&] {
        auto fill = [&](auto& a) {
          a.logits = call.logits.data_ptr<scalar_t>();
          a.M = call.M;
          a.C = call.C;
          a.numel = numel;
          a.ignore_index = ignore_index;
          a.bins = bins;
        };
        const cudaStream_t stream = current_stream();
        if (call.labels.defined()) {
          SigmoidArgs<scalar_t, float> a;
          fill(a);
          a.labels = call.labels.data_ptr<int64_t>();
          ghm_sigmoid_histogram_kernel<scalar_t, float, true><<<blocks, kThreads, 0, stream>>>(a, counts_ptr);
        } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
          SigmoidArgs<scalar_t, scalar_t> a;
          fill(a);
          a.target = call.float_target.data_ptr<scalar_t>();
          ghm_sigmoid_histogram_kernel<scalar_t, scalar_t, false><<<blocks, kThreads, 0, stream>>>(a, counts_ptr);
        } else {
          if constexpr (!std::is_same_v<scalar_t, float>) {
            SigmoidArgs<scalar_t, float> a;
            fill(a);
            a.target = call.float_target.data_ptr<float>();
            ghm_sigmoid_histogram_kernel<scalar_t, float, false><<<blocks, kThreads, 0, stream>>>(a, counts_ptr);
          }
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  } else {
    // "sum": the call's loss output is then a 0-dim tensor this op does not use (no rows buffer).
    const SoftmaxCall call = softmax_call(logits_in, target_in, "sum", false, false, "ghmc_bin_weights");
    const int64_t rows = call.sh.N * call.sh.S;
    valid_rows = count_valid(call.target, ignore_index);
    valid.count_dev = valid_rows.data_ptr<int64_t>();
    if (rows > 0) {
      const at::Tensor log_pt = at::empty({rows}, call.logits.options().dtype(at::kFloat));
      FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghm_stats_cuda", [&] {
        SoftmaxArgs<scalar_t> a = softmax_args<scalar_t>(call, ignore_index, SoftmaxLoss::Stats);
        a.reduction = Reduction::None;
        a.loss_rows = nullptr;
        a.log_pt_rows = log_pt.data_ptr<float>();
        softmax_pass(a, false, at::Tensor());
      });
      ghm_softmax_histogram_kernel<<<grid_for(rows, kThreads * 4), kThreads, 0, current_stream()>>>(
          log_pt.data_ptr<float>(), call.target.data_ptr<int64_t>(), rows, ignore_index, bins, counts_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor weights = at::empty({bins}, logits_in.options().dtype(at::kFloat));
  ghm_weights_kernel<<<1, 1, 0, current_stream()>>>(
      counts.data_ptr<int64_t>(), bins, valid, state.has_value() ? state->data_ptr<float>() : nullptr,
      static_cast<float>(momentum), static_cast<float>(1.0 - momentum), weights.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return weights;
}

// ghmc_forward: sigmoid: one elementwise pass; softmax: one softmax pass (the weight of a row
// depends only on its own g and the bin weights). Traffic per element: one read, one gradient
// write (+ a float target read).
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                   int64_t ignore_index, c10::string_view reduction_name,
                                                   bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  check_logits(logits_in, "ghmc_forward");
  const at::Tensor bin_weights = float_vector(bin_weights_in, logits_in, bins, "bin_weights");
  const Reduction reduction = parse_reduction(reduction_name);
  if (use_sigmoid) {
    const SigmoidCall call =
        sigmoid_call(logits_in, target_in, ignore_index, reduction == Reduction::Mean, "ghmc_forward");
    return sigmoid_forward(call, logits_in, ignore_index, reduction, compute_grad, [&](auto& a) {
      a.loss = SigmoidLoss::Ghmc;
      a.bin_weights = bin_weights.data_ptr<float>();
      a.bins = bins;
    });
  }
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction_name, compute_grad, false, "ghmc_forward");
  at::Tensor count;
  if (call.reduction == Reduction::Mean) count = count_valid(call.target, ignore_index);
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghmc_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::Ghmc);
      a.bin_weights = bin_weights.data_ptr<float>();
      a.bins = bins;
      if (count.defined()) a.count.count_dev = count.data_ptr<int64_t>();
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

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
  const c10::cuda::CUDAGuard guard(saved_in.device());
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
  const int64_t blocks = grid_for(numel, kThreads * 8);
  FL_DISPATCH_CUDA_FLOATING_TYPES(dtype, "scale_grad_cuda", [&] {
    using out_t = scalar_t;
    FL_DISPATCH_CUDA_FLOATING_TYPES(go_dtype, "scale_grad_cuda", [&] {
      scale_grad_kernel<out_t, scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
          saved.data_ptr<float>(), grad_output.data_ptr<scalar_t>(), mode, numel, C, S, out.data_ptr<out_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(grad.is_cuda(), "scale_grad_: grad must be a CUDA tensor, got ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
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
    const int64_t blocks = grid_for(numel, kThreads * 8);
    FL_DISPATCH_CUDA_FLOATING_TYPES(dtype, "scale_grad_inplace_cuda", [&] {
      rescale_grad_inplace_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), numel, packed, grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  record_applied_scale_kernel<<<1, 1, 0, stream>>>(grad_output.data_ptr<float>(), applied_scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor build_probe_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "build_probe: x must be float32, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  build_probe_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      xc.data_ptr<float>(), y.data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

TORCH_LIBRARY_IMPL(fused_losses, CUDA, m) {
  m.impl("build_probe", &build_probe_cuda);
  m.impl("softmax_focal_forward", &softmax_focal_forward_cuda);
  m.impl("sigmoid_focal_forward", &sigmoid_focal_forward_cuda);
  m.impl("ohem_forward", &ohem_forward_cuda);
  m.impl("ghmc_bin_weights", &ghmc_bin_weights_cuda);
  m.impl("ghmc_forward", &ghmc_forward_cuda);
  m.impl("ib_forward", &ib_forward_cuda);
  m.impl("scale_grad", &scale_grad_cuda);
  m.impl("scale_grad_", &scale_grad_inplace_cuda);
}

}  // namespace fused_losses
