// Operator schemas of the fused_losses library and the Python module stub.
//
// Every schema lives in this one TORCH_LIBRARY block; each backend file only adds a
// TORCH_LIBRARY_IMPL(fused_losses, CPU|CUDA, m). Python-side fake (meta) kernels and
// autograd formulas are registered in fused_losses/_backends/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fused_losses._C only has to load this shared library: its static initialisers
// register the ops. No pybind11 here, so the build is abi3 (one .so for every Python).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fused_losses {

bool compiled_with_cuda() {
#ifdef FUSED_LOSSES_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(fused_losses, m) {
  // Build facts, answered without any tensor (CompositeImplicitAutograd catch-all).
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  // A trivial elementwise op (2 * x + 1, float32) implemented by the CPU and the CUDA
  // kernel files: proves that compiling, linking and dispatcher registration work end to end.
  m.def("build_probe(Tensor x) -> Tensor");
}

}  // namespace fused_losses
