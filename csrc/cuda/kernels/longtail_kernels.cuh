// Seesaw and EQLv2 kernels of fused_losses (issue #25; no ATen: csrc/cuda/kernels/device.cuh).
// Launchers: csrc/cuda/longtail.cu. Semantics: fused_losses/reference.py seesaw / eqlv2.
//
// Seesaw: one block per row (grid-stride over rows): block reductions (fixed order: shuffle
// butterflies, then the warps in index order, every thread getting the same value) of the row's
// max and sum of exponentials (the detached softmax), then z = x + p min(0, log N_j - log N_t) +
// q max(0, x_j - c_t) (c_t = m + log s + log max(s_t, eps); z_t = x_t), its max and sums, the
// loss -log softmax(z)_t and the gradient w (softmax(z) - onehot) / D written in the same pass;
// the objectness pair by thread 0. Each block adds its rows' losses in row order into its own
// double partial; one block then adds the partials in block order (no float atomics).
//
// EQLv2: one block per chunk of kEqlRows rows, a thread per column (strided by kThreads): loss,
// gradient and, per column, the chunk's sums of |sigmoid(x) - y| * eqlv2 weight * w over
// positives and negatives (float, kEqlRows terms in row order) into the chunk's partial; a
// second kernel adds the chunk partials per class in chunk order in double. Loss partials: one
// double per chunk (fixed block tree), summed by finish_loss_kernel in chunk order.
//
// Out-of-range labels: a device assert and the row treated as ignored (never an out-of-bounds
// read), as every kernel of the library.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

constexpr int64_t kEqlRows = 128;  // rows per EQLv2 chunk (the statistics' partial sums)

// Reduction over the block (blockDim.x == kThreads) whose result every thread gets, in one fixed
// order (butterfly per warp, then warps 0..kWarps-1). `scratch`: kWarps values of shared memory;
// every thread of the block must call it.
template <bool kMax, typename T>
__device__ __forceinline__ T block_all(T v, T* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  __syncthreads();  // scratch is free (an earlier call's readers are done)
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = kMax ? (scratch[w] > r ? scratch[w] : r) : r + scratch[w];
  return r;
}

template <typename scalar_t, typename grad_t>
struct SeesawArgs {
  const scalar_t* logits = nullptr;  // (N, Ct) contiguous
  const int64_t* target = nullptr;   // (N,)
  const float* log_n = nullptr;      // (C,) log(max(cum_samples, 1))
  const float* weight = nullptr;     // (N,) or nullptr
  const int64_t* counts = nullptr;   // (2,): foreground rows, non-ignored rows
  grad_t* grad = nullptr;            // (N, Ct) or nullptr
  scalar_t* loss_rows = nullptr;     // 'none': (N,) classes (+ objectness unless split)
  scalar_t* obj_rows = nullptr;      // 'none' split: (N,) objectness
  double* partials = nullptr;        // reduced: (2, gridDim.x) classes, objectness
  int64_t N = 0, C = 0, Ct = 0, ignore_index = -100;
  float p = 0.8f, q = 2.0f, eps = 1e-2f;
  bool objectness = false, mean = false, split = false;
};

__device__ __forceinline__ float seesaw_z(float x, float ln, float lnt, float c_t, float p, float q) {
  float z = x;
  if (p > 0.0f) z += p * (ln - lnt < 0.0f ? ln - lnt : 0.0f);
  if (q > 0.0f) z += q * (x - c_t > 0.0f ? x - c_t : 0.0f);
  return z;
}

template <typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) seesaw_kernel(const SeesawArgs<scalar_t, grad_t> a) {
  FL_SHARED(float, scratch, kWarps);
  const float inv_fg = a.mean ? 1.0f / static_cast<float>(a.counts[0] > 1 ? a.counts[0] : int64_t(1)) : 1.0f;
  const float inv_valid = a.mean ? 1.0f / static_cast<float>(a.counts[1] > 1 ? a.counts[1] : int64_t(1)) : 1.0f;
  double cls_sum = 0.0, obj_sum = 0.0;  // thread 0's, rows in order
  for (int64_t r = blockIdx.x; r < a.N; r += gridDim.x) {
    const scalar_t* x = a.logits + r * a.Ct;
    grad_t* g = a.grad == nullptr ? nullptr : a.grad + r * a.Ct;
    const int64_t t = a.target[r];
    bool valid = t != a.ignore_index;
    if (valid && (t < 0 || t >= (a.objectness ? a.C + 1 : a.C))) {
      FL_DEVICE_ASSERT(false, "seesaw: target out of range");
      valid = false;
    }
    const float w = a.weight == nullptr ? 1.0f : a.weight[r];
    const bool active = valid && w != 0.0f;
    const bool fg = active && t < a.C;
    float lc = 0.0f;
    if (fg) {  // uniform over the block: every thread takes this branch or none does
      float m = -INFINITY;
      #pragma unroll 1
      for (int64_t j = threadIdx.x; j < a.C; j += kThreads) {
        const float v = to_float(x[j]);
        m = v > m ? v : m;
      }
      m = block_all<true>(m, scratch);
      float s = 0.0f;
      #pragma unroll 1
      for (int64_t j = threadIdx.x; j < a.C; j += kThreads) s += expf(to_float(x[j]) - m);
      s = block_all<false>(s, scratch);
      const float xt = to_float(x[t]);
      const float st = expf(xt - m) / s;
      const float c_t = m + logf(s) + logf(st > a.eps ? st : a.eps);
      const float lnt = a.log_n[t];
      float mz = -INFINITY;
      #pragma unroll 1
      for (int64_t j = threadIdx.x; j < a.C; j += kThreads) {
        const float z = j == t ? xt : seesaw_z(to_float(x[j]), a.log_n[j], lnt, c_t, a.p, a.q);
        mz = z > mz ? z : mz;
      }
      mz = block_all<true>(mz, scratch);
      float sz = 0.0f, so = 0.0f;
      #pragma unroll 1
      for (int64_t j = threadIdx.x; j < a.C; j += kThreads) {
        const float z = j == t ? xt : seesaw_z(to_float(x[j]), a.log_n[j], lnt, c_t, a.p, a.q);
        const float e = expf(z - mz);
        sz += e;
        so += j == t ? 0.0f : e;
      }
      sz = block_all<false>(sz, scratch);
      so = block_all<false>(so, scratch);
      const float log_pt = lm::log_softmax_target_sums(xt, mz, sz, so);
      lc = -log_pt * w;
      if (g != nullptr) {
        const float k = w * inv_fg;
        #pragma unroll 1
        for (int64_t j = threadIdx.x; j < a.C; j += kThreads) {
          const float z = j == t ? xt : seesaw_z(to_float(x[j]), a.log_n[j], lnt, c_t, a.p, a.q);
          const float v = j == t ? -k * lm::one_minus_pt_from_log(log_pt) : k * (expf(z - mz) / sz);
          g[j] = from_float<grad_t>(v);
        }
      }
    } else if (g != nullptr) {
      #pragma unroll 1
      for (int64_t j = threadIdx.x; j < a.C; j += kThreads) g[j] = from_float<grad_t>(0.0f);
    }
    if (threadIdx.x == 0) {
      float lo = 0.0f;
      if (a.objectness) {
        if (active) {
          const int64_t o = t == a.C ? 1 : 0;
          const float xa = to_float(x[a.C + o]), xb = to_float(x[a.C + 1 - o]);
          const float m2 = xa > xb ? xa : xb;
          const float ea = expf(xa - m2), eb = expf(xb - m2);
          const float log_po = lm::log_softmax_target_sums(xa, m2, ea + eb, eb);
          lo = -log_po * w;
          if (g != nullptr) {
            const float k = w * inv_valid;
            g[a.C + o] = from_float<grad_t>(-k * lm::one_minus_pt_from_log(log_po));
            g[a.C + 1 - o] = from_float<grad_t>(k * (eb / (ea + eb)));
          }
        } else if (g != nullptr) {
          g[a.C] = from_float<grad_t>(0.0f);
          g[a.C + 1] = from_float<grad_t>(0.0f);
        }
      }
      if (a.loss_rows != nullptr) {
        a.loss_rows[r] = from_float<scalar_t>(a.split ? lc : lc + lo);
        if (a.split && a.obj_rows != nullptr) a.obj_rows[r] = from_float<scalar_t>(lo);
      }
      cls_sum += static_cast<double>(lc);
      obj_sum += static_cast<double>(lo);
    }
  }
  if (threadIdx.x == 0 && a.partials != nullptr) {
    a.partials[blockIdx.x] = cls_sum;
    a.partials[gridDim.x + blockIdx.x] = obj_sum;
  }
}

// The reduced Seesaw losses from the block partials (in block order; one thread): classes /
// foreground rows and objectness / non-ignored rows for 'mean'; out[0] = classes (+ objectness
// unless split), out[1] = objectness when split.
template <typename = void>
__global__ void seesaw_finish_kernel(const double* __restrict__ partials, int64_t blocks,
                                     const int64_t* __restrict__ counts, bool mean, bool objectness, bool split,
                                     float* __restrict__ out_cls, float* __restrict__ out_obj) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double cls = 0.0, obj = 0.0;
  for (int64_t b = 0; b < blocks; ++b) cls += partials[b];
  for (int64_t b = 0; b < blocks; ++b) obj += partials[blocks + b];
  if (mean) {
    cls /= static_cast<double>(counts[0] > 1 ? counts[0] : int64_t(1));
    obj /= static_cast<double>(counts[1] > 1 ? counts[1] : int64_t(1));
  }
  if (split) {
    out_cls[0] = static_cast<float>(cls);
    if (objectness) out_obj[0] = static_cast<float>(obj);
  } else {
    out_cls[0] = static_cast<float>(objectness ? cls + obj : cls);
  }
}

template <typename scalar_t, typename grad_t>
struct Eqlv2Args {
  const scalar_t* logits = nullptr;  // (M, Ct) contiguous
  const int64_t* target = nullptr;   // (M,)
  const float* pos_neg = nullptr;    // (C,) the state's ratio row
  const float* weight = nullptr;     // (M,) or (M * Ct,) or nullptr
  bool weight_per_element = false;
  const int64_t* count = nullptr;    // (1,) non-ignored rows ('mean')
  grad_t* grad = nullptr;            // (M, Ct) or nullptr
  scalar_t* loss_elements = nullptr; // 'none': (M, Ct)
  double* loss_partials = nullptr;   // reduced: (chunks,)
  float* stat_partials = nullptr;    // (chunks, 2, C)
  int64_t M = 0, C = 0, Ct = 0, ignore_index = -100;
  float gamma = 12.0f, mu = 0.8f, alpha = 4.0f;
  bool mean = false;
};

template <typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) eqlv2_kernel(const Eqlv2Args<scalar_t, grad_t> a) {
  FL_SHARED(double, scratch, kWarps);
  const int64_t chunk = blockIdx.x;
  const int64_t r0 = chunk * kEqlRows;
  const int64_t r1 = r0 + kEqlRows < a.M ? r0 + kEqlRows : a.M;
  const float inv = a.mean ? 1.0f / static_cast<float>(a.count[0] > 1 ? a.count[0] : int64_t(1)) : 1.0f;
  double loss = 0.0;
  for (int64_t c = threadIdx.x; c < a.Ct; c += kThreads) {
    float w_pos = 1.0f, w_neg = 1.0f;
    if (c < a.C) {
      const float f = 1.0f / (1.0f + expf(-(a.gamma * (a.pos_neg[c] - a.mu))));
      w_neg = f;
      w_pos = 1.0f + a.alpha * (1.0f - f);
    }
    float pos = 0.0f, neg = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = a.target[r];
      const int64_t i = r * a.Ct + c;
      bool valid = t != a.ignore_index;
      if (valid && (t < 0 || t > a.C)) {
        FL_DEVICE_ASSERT(false, "eqlv2: target out of range");
        valid = false;
      }
      float w = 1.0f;
      if (a.weight != nullptr) w = a.weight[a.weight_per_element ? i : r];
      const bool act = valid && w != 0.0f;
      const bool y = t == c;
      const float x = to_float(a.logits[i]);
      const float ax = fabsf(x);
      const float en = expf(-ax);
      const float inv1 = 1.0f / (1.0f + en);
      const float sig_pos = x >= 0.0f ? inv1 : en * inv1;
      const float sig_neg = x >= 0.0f ? en * inv1 : inv1;
      const float sp = log1pf(en);
      const float bce = y ? (x < 0.0f ? -x + sp : sp) : (x > 0.0f ? x + sp : sp);
      const float eql = y ? w_pos : w_neg;
      const float l = act ? w * eql * bce : 0.0f;
      if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(act ? w * eql * (y ? -sig_neg : sig_pos) * inv : 0.0f);
      if (a.loss_elements != nullptr) a.loss_elements[i] = from_float<scalar_t>(l);
      loss += static_cast<double>(l);
      const float gst = act ? (y ? sig_neg : sig_pos) * eql * w : 0.0f;
      if (y) {
        pos += gst;
      } else {
        neg += gst;
      }
    }
    if (c < a.C) {
      a.stat_partials[chunk * 2 * a.C + c] = pos;
      a.stat_partials[chunk * 2 * a.C + a.C + c] = neg;
    }
  }
  loss = block_all<false>(loss, scratch);
  if (threadIdx.x == 0 && a.loss_partials != nullptr) a.loss_partials[chunk] = loss;
}

// stats[k] = sum over the chunks, in chunk order, of partials[chunk][k] (k < 2C), in double.
template <typename = void>
__global__ void __launch_bounds__(kThreads) eqlv2_stats_kernel(const float* __restrict__ partials, int64_t chunks,
                                                               int64_t width, double* __restrict__ stats) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < width; k += stride) {
    double s = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += static_cast<double>(partials[ch * width + k]);
    stats[k] = s;
  }
}

}  // namespace cuda
}  // namespace fused_losses
