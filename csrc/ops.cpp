// The fused_losses op library (schemas: csrc/op_schemas.h) and the Python module stub.
//
// Every schema is defined in this one TORCH_LIBRARY block; each backend file only adds a
// TORCH_LIBRARY_IMPL(fused_losses, CPU|CUDA, m). Python-side fake (meta) kernels and
// autograd formulas are registered in fused_losses/_backends/.
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

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
  define_op_schemas(m);
}

}  // namespace fused_losses
