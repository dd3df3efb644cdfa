// The op library of the emulated CUDA build (tests only, tests/cuda_emu/build.py): the schemas
// of every fused_losses op in the `fused_losses_emu` namespace (their host functions, the real
// csrc/cuda/*.cu compiled against cuda_emu.h, register for its CPU key in csrc/cuda/common.cu),
// plus the emulator's controls:
//   emu_configure(spec) -> previous spec   schedule and device facts (cuda_emu.h, configure)
//   emu_configuration() -> spec
//   emu_take_device_asserts() -> [str]     device asserts recorded since the last call
//   emu_statistics() -> [launches, blocks, CUDA threads]
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "cuda_emu/cuda_emu.h"
#include "op_schemas.h"

namespace {

std::string emu_configure(c10::string_view spec) { return ::fl_emu::configure(std::string(spec).c_str()); }

std::string emu_configuration() { return ::fl_emu::configuration(); }

std::vector<std::string> emu_take_device_asserts() {
  std::vector<std::string> out;
  std::istringstream in(::fl_emu::take_device_asserts());
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

std::vector<int64_t> emu_statistics() {
  int64_t s[3];
  ::fl_emu::statistics(s);
  return {s[0], s[1], s[2]};
}

}  // namespace

TORCH_LIBRARY(fused_losses_emu, m) {
  fused_losses::define_op_schemas(m);
  m.def("emu_configure(str spec) -> str", &emu_configure);
  m.def("emu_configuration() -> str", &emu_configuration);
  m.def("emu_take_device_asserts() -> str[]", &emu_take_device_asserts);
  m.def("emu_statistics() -> int[]", &emu_statistics);
}
