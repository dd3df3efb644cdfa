// The two ways csrc/cuda/*.cu is compiled, behind one set of spellings:
//   nvcc (the real build, setup.py): CUDA kernels registered for the CUDA dispatch key of the
//     `fused_losses` op namespace;
//   FUSED_LOSSES_CUDA_EMU (tests only, tests/cuda_emu/build.py): g++ compiles the same sources as
//     C++ against csrc/cuda_emu/cuda_emu.h, and the host functions are registered for the CPU
//     dispatch key of the `fused_losses_emu` namespace, so the kernels run on CPU tensors on the
//     emulator (see cuda_emu.h for what it models).
// Kernel code uses FL_LAUNCH(grid, block, smem, stream, kernel)(args...) instead of <<<>>>,
// FL_SHARED(type, name, count) instead of a static __shared__ array and
// FL_KERNEL_LAUNCH_CHECK() after each launch; host code uses the helpers below instead of
// is_cuda() and the at::cuda / c10::cuda calls. Include after <ATen/ATen.h>. The kernels
// themselves live in csrc/cuda/kernels/*.cuh and need only kernels/device.cuh (no ATen).
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

// The kernels' device layer (cuda_emu.h in the emulated build; cuda_runtime.h, FL_LAUNCH and
// FL_SHARED under nvcc), after ATen (the emulator's header must come after every host header).
#include "cuda/kernels/device.cuh"

#ifdef FUSED_LOSSES_CUDA_EMU
#define FL_OPS_NAMESPACE fused_losses_emu
#define FL_KERNEL_DISPATCH_KEY CPU
#define FL_KERNEL_LAUNCH_CHECK() ((void)0)  // an emulated launch has finished (or thrown)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FL_OPS_NAMESPACE fused_losses
#define FL_KERNEL_DISPATCH_KEY CUDA
#define FL_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

namespace fused_losses {
namespace cuda {

#ifdef FUSED_LOSSES_CUDA_EMU
// Tensors of the emulated kernels are CPU tensors; there is one emulated device.
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kKernelDeviceName = "CPU (CUDA emulator)";
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline int multiprocessor_count() { return ::fl_emu::multiprocessor_count(); }
#else
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kKernelDeviceName = "CUDA";
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

// Blocks of `threads` threads of `kernel` resident on one multiprocessor at once (the
// occupancy calculator: registers, shared memory and the launch bounds decide), at least 1.
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel, int threads) {
  int blocks = 0;
  const cudaError_t status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0);
  TORCH_CHECK(status == cudaSuccess, "fused_losses: cudaOccupancyMaxActiveBlocksPerMultiprocessor failed");
  return blocks > 0 ? blocks : 1;
}

}  // namespace cuda
}  // namespace fused_losses
