// The fused_losses op library (schemas: csrc/op_schemas.h) and the Python module stub of
// fused_losses._C.
//
// Every schema is defined in this one TORCH_LIBRARY block; each backend file only adds a
// TORCH_LIBRARY_IMPL(fused_losses, CPU|CUDA, m) (the CUDA kernels live in their own module,
// fused_losses._C_cuda: csrc/cuda/cuda_module.cpp). The test-only CUDA emulator registers the
// same schemas under another namespace (csrc/cuda_emu/emu_ops.cpp). Python-side fake (meta)
// kernels and autograd formulas are registered in fused_losses/_ops.py.
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

TORCH_LIBRARY(fused_losses, m) { define_op_schemas(m); }

}  // namespace fused_losses
