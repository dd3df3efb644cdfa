// Shared declarations of the fused_losses CUDA kernels (csrc/cuda/*.cu, one file per loss family,
// registered for the CUDA dispatch key in common.cu; csrc/cuda/platform.cuh says how the same
// sources also build for the CPU emulator of the tests): the schemas of
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
// as ignored, so there is never an out-of-bounds access even with asserts compiled out: no loss,
// a zero gradient row, not counted in the 'mean' denominator (count_valid), not in GHM-C's
// n_valid nor its histogram, never kept by OHEM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/platform.cuh"
#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

namespace lm = fused_losses::math;

// The three input dtypes of the CUDA kernels (math in float32 for all of them). In the body,
// scalar_t is the kernels' platform-neutral type (float, fl_half, fl_bf16: kernels/device.cuh),
// not at::Half / at::BFloat16; data pointers come from data_of<scalar_t>(tensor).
#define FL_DISPATCH_CUDA_FLOATING_TYPES(TYPE, NAME, ...)                                       \
  [&] {                                                                                        \
    const at::ScalarType fl_dispatch_type_ = (TYPE);                                           \
    switch (fl_dispatch_type_) {                                                               \
      case at::kFloat: {                                                                       \
        using scalar_t = float;                                                                \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      case at::kHalf: {                                                                        \
        using scalar_t = ::fused_losses::cuda::fl_half;                                        \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      case at::kBFloat16: {                                                                    \
        using scalar_t = ::fused_losses::cuda::fl_bf16;                                        \
        return __VA_ARGS__();                                                                  \
      }                                                                                        \
      default:                                                                                 \
        TORCH_CHECK(false, NAME, ": expected float32, float16 or bfloat16, got ", fl_dispatch_type_); \
    }                                                                                          \
  }()

// The at::ScalarType of a kernel element type.
template <typename T>
constexpr at::ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<T, float>) return at::kFloat;
  if constexpr (std::is_same_v<T, fl_half>) return at::kHalf;
  if constexpr (std::is_same_v<T, fl_bf16>) return at::kBFloat16;
  if constexpr (std::is_same_v<T, double>) return at::kDouble;
  if constexpr (std::is_same_v<T, int64_t>) return at::kLong;
}

// t's data as T* (T a kernel element type: fl_half for at::kHalf, ...), dtype-checked like
// data_ptr<T>() (the 16-bit types share at::Half / at::BFloat16's layout).
template <typename T>
T* data_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == scalar_type_of<T>(), "fused_losses: expected a tensor of ",
                        scalar_type_of<T>(), ", got ", t.scalar_type());
  return reinterpret_cast<T*>(t.data_ptr());
}

// ==========================================================================================
// Shared pieces
// ==========================================================================================

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  TORCH_CHECK(false, "reduction: expected 'none', 'mean' or 'sum', got '", std::string(name), "'");
}


// Blocks for `work` independent items of `per_block` each, at most the number of blocks of
// `kernel` the device holds at once (multiprocessors x resident blocks per multiprocessor, from
// the occupancy calculator, i.e. the kernel's real register and shared-memory use): a persistent
// grid whose size, and so the order of every sum, depends only on the size, the kernel and the
// device.
// (grid_size, kernels/common_kernels.cuh).
template <typename Kernel>
int64_t grid_for(Kernel kernel, int64_t work, int64_t per_block) {
  return grid_size(multiprocessor_count(), resident_blocks_per_sm(kernel, kThreads), work, per_block);
}


// out[0] += the count of valid entries among n (out: an int64 on the device, zeroed by the
// caller); integer atomics only, no host read.
void count_valid_into(int64_t* out, const CountSpec& spec, int64_t n);

// Number of valid rows as a device int64 (1,) tensor, no host read: target != ignore_index and
// in [0, upper) (upper = C for class indices, C + 1 for sigmoid labels, C meaning background),
// and weight[row] != 0 when a per-row weight is given (GHM-C). An out-of-range target is
// treated as ignored everywhere (the kernels assert on it).
at::Tensor count_valid(const at::Tensor& target, int64_t ignore_index, int64_t upper,
                       const float* weight = nullptr);

// Loss output of a reduced ('mean'/'sum') call: sums the partials and writes the 0-dim float32.
void finish_loss(const at::Tensor& partials, const MeanCount& count, Reduction reduction, const at::Tensor& out);

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(on_kernel_device(logits), op, ": logits must be a ", kKernelDeviceName, " tensor, got ", logits.device());
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernels take float32, float16 or bfloat16 logits, got ", t);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), name, ": expected a tensor on ", logits.device(), ", got ", t.device());
}

inline at::Tensor index_target(const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(!target.is_floating_point() && !target.is_complex() && target.scalar_type() != at::kBool,
              "target: expected integer class indices, got ", target.scalar_type());
  check_same_device(target, logits, "target");
  return target.to(at::kLong).contiguous();
}

// A per-class or per-row vector in float32 on the logits' device (no-op when it already is).
inline at::Tensor float_vector(const at::Tensor& v, const at::Tensor& logits, int64_t expected, const char* name) {
  check_same_device(v, logits, name);
  TORCH_CHECK(v.numel() == expected, name, ": expected ", expected, " values, got ", v.numel());
  return v.to(at::kFloat).contiguous().reshape({-1});
}

// dtype of a forward op's logits gradient (csrc/ops.cpp, fused_losses/_ops.py saved_grad_dtype,
// the CPU's saved_grad_dtype): the logits dtype for 'mean'/'sum' with bf16 or fp32 logits, else
// float32 ('none'; fp16 logits with every reduction). CUDA has no fp64.
inline at::ScalarType saved_grad_dtype(at::ScalarType logits_dtype, Reduction reduction) {
  if (reduction != Reduction::None && logits_dtype == at::kBFloat16) return at::kBFloat16;
  return at::kFloat;
}

// The saved gradient of a forward op: contiguous, logits-shaped, in saved_grad_dtype, as the
// schema's autograd formula expects; (0,) of that dtype when no gradient is asked for (the fake
// kernels give the same dtype). `zeroed`: filled with zeros of that dtype.
inline at::Tensor saved_grad_buffer(const at::Tensor& logits, bool compute_grad, bool zeroed, Reduction reduction) {
  const at::TensorOptions options = logits.options().dtype(saved_grad_dtype(logits.scalar_type(), reduction));
  if (!compute_grad) return at::empty({0}, options);
  return zeroed ? at::zeros(logits.sizes(), options) : at::empty(logits.sizes(), options);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<grad_t>{}) with grad_t the element type of the gradient buffer `grad` of a
// forward op over scalar_t logits: fl_bf16 only when scalar_t is bf16 and `grad` is bf16
// (a reduced loss), else float. The bf16 branch is compiled for scalar_t = bf16 only, so fp16
// and fp32 logits instantiate every kernel once, as before. An empty (0,) buffer (no gradient
// wanted) dispatches on its dtype too; the kernels then get grad == nullptr.
template <typename scalar_t, typename Body>
void dispatch_grad_t(const at::Tensor& grad, Body&& body) {
  if constexpr (std::is_same_v<scalar_t, fl_bf16>) {
    if (grad.scalar_type() == at::kBFloat16) {
      body(TypeTag<fl_bf16>{});
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(grad.scalar_type() == at::kFloat, "fused_losses: unexpected gradient dtype ",
                        grad.scalar_type());
  body(TypeTag<float>{});
}

// Contiguous and aligned to `bytes` (a misaligned view gets one copy, so the kernels can use
// packed accesses everywhere).
inline at::Tensor aligned_contiguous(const at::Tensor& t, size_t bytes) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !aligned_to(c.data_ptr(), bytes)) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// The `weight` argument of a loss op (csrc/op_schemas.h) as a contiguous float32 vector on the
// logits' device; nullopt -> undefined. numel: `rows` (one value per row), or `elements` (one
// per element, sigmoid family; -1: not allowed). The API layer already gives the math dtype.
inline at::Tensor weight_vector(const c10::optional<at::Tensor>& weight, const at::Tensor& logits, int64_t rows,
                                int64_t elements = -1) {
  if (!weight.has_value()) return at::Tensor();
  check_same_device(*weight, logits, "weight");
  const int64_t n = weight->numel();
  TORCH_CHECK(n == rows || n == elements, "weight: expected ", rows, " values (one per row)",
              elements >= 0 ? " or one per element (" + std::to_string(elements) + ")" : std::string(), ", got ", n);
  TORCH_CHECK(weight->is_floating_point(), "weight: expected a floating-point tensor, got ", weight->scalar_type());
  return weight->to(at::kFloat).contiguous().reshape({-1});
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr; }

inline void check_label_smoothing(double eps) {
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, "label_smoothing: expected a value in [0, 1], got ", eps);
}

// The host functions of the ops (one per schema of csrc/ops.cpp), registered in common.cu.
at::Tensor build_probe_cuda(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            const c10::optional<at::Tensor>& alpha_per_class,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction, bool from_logits,
                                                            bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing,
                                                            double epsilon);
std::tuple<at::Tensor, at::Tensor> ohem_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   double keep_fraction, int64_t keep_count,
                                                   c10::optional<double> thresh, int64_t min_kept_total,
                                                   int64_t ignore_index, c10::string_view reduction, bool compute_grad,
                                                   const c10::optional<at::Tensor>& weight, double label_smoothing);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const at::Tensor& feature_norm_in,
                                                           const c10::optional<at::Tensor>& class_weight_in,
                                                           double alpha, double epsilon, double gamma,
                                                           bool detach_factor, c10::string_view reduction,
                                                           bool compute_grad);
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction_name, bool compute_grad,
                                                            const c10::optional<at::Tensor>& alpha_per_class,
                                                            const c10::optional<at::Tensor>& weight, double epsilon);
at::Tensor ghmc_bin_weights_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                 const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                 bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight);
at::Tensor ghmc_bin_counts_cuda(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins, bool use_sigmoid,
                                int64_t ignore_index, const c10::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                   int64_t ignore_index, c10::string_view reduction_name,
                                                   bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing);
at::Tensor scale_grad_cuda(const at::Tensor& saved_in, const at::Tensor& grad_output_in, at::ScalarType dtype);
void scale_grad_inplace_cuda(const at::Tensor& grad, const at::Tensor& grad_output, const at::Tensor& applied_scale);

}  // namespace cuda
}  // namespace fused_losses
