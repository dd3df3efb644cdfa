// `make gpu-sim` driver: sigmoid focal loss with integer labels (C + 1 classes, C = background),
// reduction 'mean', gamma 2, alpha 0.25, the project's real kernel (the launcher's choice for
// these arguments: sigmoid_focal_kernel<.., kLabels = true, kGamma = 2>) on fp32 or bf16 logits,
// the gradient in the logits dtype (saved_grad_dtype of 'mean'). The 'mean' denominator (valid
// rows x C) is given as a host count (the library counts on the device first, 8 bytes per row,
// another kernel not measured here). Checks the loss (block partials summed in order on the host,
// as finish_loss_kernel does) and the gradient against float64 on the CPU.
#include "driver_common.h"
#include "cuda/kernels/sigmoid_kernels.cuh"
#include "sim_bf16.h"

using namespace fused_losses::cuda;

namespace {

constexpr float kAlpha = 0.25f, kGamma = 2.0f;
constexpr int64_t kIgnore = -100;

template <typename T>
int run(const drv::Args& args) {
  const int64_t M = args.rows, C = args.C, n = M * C;
  constexpr int VEC = 16 / sizeof(T);
  drv::Rng rng(23);
  std::vector<float> x(n);
  for (auto& v : x) {
    const float f = static_cast<float>(rng.normal() * 2.0);
    v = sizeof(T) == 2 ? drv::bf16_to_float(drv::bf16_bits(f)) : f;
  }
  std::vector<int64_t> labels(M);
  int64_t valid_rows = 0;
  for (auto& l : labels) {
    const uint32_t u = rng.next();
    l = u % 64 == 0 ? kIgnore : static_cast<int64_t>(u % (C + 1));  // 1/64 ignored, label C: background
    valid_rows += l != kIgnore;
  }
  T* d_x = drv::to_device<T>(x);
  int64_t* d_labels = nullptr;
  DRV_CHECK(cudaMalloc(&d_labels, M * sizeof(int64_t)));
  DRV_CHECK(cudaMemcpy(d_labels, labels.data(), M * sizeof(int64_t), cudaMemcpyHostToDevice));
  T* d_grad = nullptr;
  DRV_CHECK(cudaMalloc(&d_grad, n * sizeof(T) + 16));

#ifdef GPUSIM_SIGMOID_GENERIC  // the general instance (the extras' and GHM-C's kernel), for comparison
  const auto kernel = sigmoid_kernel<T, float, T, true, false>;
#else
  const auto kernel = sigmoid_focal_kernel<T, float, T, true, 2>;
#endif
  const std::string occ = drv::occupancy_api(kernel, kThreads);
  const int64_t grid = drv::launch_grid(args, (n + kThreads * VEC - 1) / (kThreads * VEC), occ);  // grid_for's rule
  double* d_partials = nullptr;
  DRV_CHECK(cudaMalloc(&d_partials, grid * sizeof(double)));

  SigmoidArgs<T, float, T> a;
  a.logits = d_x;
  a.labels = d_labels;
  a.M = M;
  a.C = C;
  a.numel = n;
  a.ignore_index = kIgnore;
  a.loss = SigmoidLoss::Focal;
  a.reduction = Reduction::Mean;
  a.count.count_host = valid_rows * C;
  a.alpha = kAlpha;
  a.gamma = kGamma;
  a.grad = d_grad;
  a.partials = d_partials;
  kernel<<<static_cast<unsigned>(grid), kThreads>>>(a);
  DRV_CHECK(cudaGetLastError());
  DRV_CHECK(cudaDeviceSynchronize());

  const std::vector<double> partials = drv::from_device(d_partials, grid);
  const std::vector<double> grad = drv::from_device(d_grad, n);
  double sum = 0.0;
  for (double p : partials) sum += p;
  const double count = static_cast<double>(valid_rows * C > 1 ? valid_rows * C : 1);
  const double loss = sum / count;

  // float64 truth: loss = alpha_t (1 - p_t)^gamma BCE, grad = d loss / dx / count.
  double ref_sum = 0.0;
  std::vector<double> ref_grad(n, 0.0);
  for (int64_t r = 0; r < M; ++r) {
    if (labels[r] == kIgnore) continue;
    for (int64_t c = 0; c < C; ++c) {
      const double xv = x[r * C + c], y = labels[r] == c ? 1.0 : 0.0;
      const double p = 1.0 / (1.0 + std::exp(-xv));
      const double omp = y == 1.0 ? 1.0 - p : p;  // 1 - p_t
      const double bce = y == 1.0 ? std::log1p(std::exp(-std::fabs(xv))) + std::fmax(-xv, 0.0)
                                  : std::log1p(std::exp(-std::fabs(xv))) + std::fmax(xv, 0.0);
      const double at = y == 1.0 ? kAlpha : 1.0 - kAlpha;
      ref_sum += at * omp * omp * bce;
      // d/dx: (p - y) (1 - p_t)^2 + bce 2 (1 - p_t) p (1 - p) (1 - 2y)
      ref_grad[r * C + c] = at * ((p - y) * omp * omp + bce * 2.0 * omp * p * (1.0 - p) * (1.0 - 2.0 * y)) / count;
    }
  }
  const double ref_loss = ref_sum / count;
  const double loss_rel = std::fabs(loss - ref_loss) / std::fabs(ref_loss);
  const double grad_rel = drv::rel_l2(grad, ref_grad);
  // bytes: logits read, gradient written, 8 B label per row.
  const int64_t bytes = n * 2 * static_cast<int64_t>(sizeof(T)) + M * 8;
  // fp32: the accuracy rule (1e-5); bf16: loss in float32 from exact bf16 inputs (1e-5), the
  // gradient rounded once to bf16 (unit roundoff 2^-8 relative per element).
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
