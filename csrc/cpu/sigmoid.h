// The sigmoid-family machinery of the CPU kernels (sigmoid focal, GHM-C sigmoid).
#pragma once

#include "cpu/common.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

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

// Contiguous logits and the target as labels or a float target, with the 'mean' count
// (csrc/cpu/sigmoid.cpp).
SigmoidInputs sigmoid_inputs(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index);

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

}  // namespace cpu_impl
}  // namespace fused_losses
