// `make gpu-sim` driver: softmax focal loss (gamma 2, alpha 0.25, reduction 'mean', class-index
// targets with 1/64 of the rows ignored), the project's real kernels: the instance the launcher
// picks (softmax_launch_for, csrc/cuda/kernels/softmax_kernels.cuh) for (N, C) rows (S = 1:
// softmax_rows_kernel or softmax_rows_large_kernel) or channel-second (N, C, S) logits (S > 1:
// softmax_spatial_kernel), fp32 or bf16 logits, the gradient in the logits dtype (saved_grad_dtype
// of 'mean'). ROWS is N * S. The 'mean' denominator (valid rows) is a host count (the library
// counts on the device first, 8 bytes per row, another kernel not measured here). Checks the
// loss (block partials summed in order on the host, as finish_loss_kernel does) and the gradient
// against float64 on the CPU.
#include "driver_common.h"
#include "cuda/kernels/softmax_kernels.cuh"
#include "sim_bf16.h"

using namespace fused_losses::cuda;

namespace {

constexpr float kAlpha = 0.25f, kGamma = 2.0f;
constexpr int64_t kIgnore = -100;

template <typename T>
int run(const drv::Args& args) {
  const int64_t S = args.S, rows = args.rows, C = args.C;
  if (rows % S != 0) {
    std::fprintf(stderr, "driver: ROWS must be a multiple of S\n");
    return 2;
  }
  const int64_t N = rows / S, n = rows * C;
  drv::Rng rng(19);
  std::vector<float> x(n);
  for (auto& v : x) {
    const float f = static_cast<float>(rng.normal() * 2.0);
    v = sizeof(T) == 2 ? drv::bf16_to_float(drv::bf16_bits(f)) : f;
  }
  std::vector<int64_t> target(rows);
  int64_t valid_rows = 0;
  for (auto& t : target) {
    const uint32_t u = rng.next();
    t = u % 64 == 0 ? kIgnore : static_cast<int64_t>(u % C);
    valid_rows += t != kIgnore;
  }
  T* d_x = drv::to_device<T>(x);
  int64_t* d_target = nullptr;
  DRV_CHECK(cudaMalloc(&d_target, rows * sizeof(int64_t)));
  DRV_CHECK(cudaMemcpy(d_target, target.data(), rows * sizeof(int64_t), cudaMemcpyHostToDevice));
  T* d_grad = nullptr;
  DRV_CHECK(cudaMalloc(&d_grad, n * sizeof(T) + 16));

  SoftmaxArgs<T, T> a;
  a.logits = d_x;
  a.target = d_target;
  a.N = N;
  a.C = C;
  a.S = S;
  a.ignore_index = kIgnore;
  a.loss = SoftmaxLoss::Focal;
  a.reduction = Reduction::Mean;
  a.count.count_host = valid_rows;
  a.alpha = kAlpha;
  a.gamma = kGamma;
  a.grad = d_grad;
  const SoftmaxLaunch<T, T> launch = softmax_launch_for(a, false);
  const std::string occ = drv::occupancy_api(launch.kernel, kThreads);
  const int64_t grid = drv::launch_grid(args, (rows + launch.rows_per_block - 1) / launch.rows_per_block, occ);
  double* d_partials = nullptr;
  DRV_CHECK(cudaMalloc(&d_partials, grid * sizeof(double)));
  a.partials = d_partials;
  launch.kernel<<<static_cast<unsigned>(grid), kThreads>>>(a);
  DRV_CHECK(cudaGetLastError());
  DRV_CHECK(cudaDeviceSynchronize());

  const std::vector<double> partials = drv::from_device(d_partials, grid);
  const std::vector<double> grad = drv::from_device(d_grad, n);
  double sum = 0.0;
  for (double p : partials) sum += p;
  const double count = static_cast<double>(valid_rows > 1 ? valid_rows : 1);
  const double loss = sum / count;

  // float64 truth: l = log p_t, loss = -alpha (1 - p_t)^2 l,
  // dloss/dl = -alpha ((1 - p_t)^2 - 2 p_t l (1 - p_t)), grad_c = dloss/dl ([c == t] - p_c) / count.
  double ref_sum = 0.0;
  std::vector<double> ref_grad(n, 0.0);
  std::vector<double> row(C);
  for (int64_t nn = 0; nn < N; ++nn) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = nn * S + s, t = target[r];
      if (t == kIgnore) continue;
      double m = -INFINITY;
      for (int64_t c = 0; c < C; ++c) {
        row[c] = x[(nn * C + c) * S + s];
        m = std::fmax(m, row[c]);
      }
      double se = 0.0;
      for (int64_t c = 0; c < C; ++c) se += std::exp(row[c] - m);
      const double lse = m + std::log(se);
      const double l = row[t] - lse, pt = std::exp(l), omp = -std::expm1(l);
      ref_sum += -kAlpha * omp * omp * l;
      const double dl = -kAlpha * (omp * omp - 2.0 * pt * l * omp);
      for (int64_t c = 0; c < C; ++c) {
        const double pc = std::exp(row[c] - lse);
        ref_grad[(nn * C + c) * S + s] = dl * ((c == t ? 1.0 : 0.0) - pc) / count;
      }
    }
  }
  const double ref_loss = ref_sum / count;
  const double loss_rel = std::fabs(loss - ref_loss) / std::fabs(ref_loss);
  const double grad_rel = drv::rel_l2(grad, ref_grad);
  const int64_t bytes = n * 2 * static_cast<int64_t>(sizeof(T)) + rows * 8;  // logits, gradient, targets
  drv::report(bytes, grid, occ, loss_rel, grad_rel, 1e-5, sizeof(T) == 4 ? 1e-5 : 4e-3);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const drv::Args args = drv::parse(argc, argv);
  // One dtype per binary (run.py builds both): the simulator loads every kernel of the module,
  // and a PTX it rejects (see sim_bf16.h) would stop the other dtype's cases too.
#if defined(GPUSIM_DTYPE_BF16)
  return args.dtype == "bf16" ? run<simbf16::bf16>(args) : 2;
#else
  return args.dtype == "fp32" ? run<float>(args) : 2;
#endif
}
