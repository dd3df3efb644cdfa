// The Python module stub of fused_losses._C_cuda, the CUDA half of the extension.
//
// The CUDA kernels (csrc/cuda/*.cu) are a module of their own so that a CPU-only build never
// compiles them: fused_losses._C holds the schemas (csrc/ops.cpp) and the CPU kernels, and
// fused_losses/_ext.py imports this module after it when the file is present. Importing it only
// has to load the shared library: the static initialisers of the .cu files register their
// kernels for the CUDA key (TORCH_LIBRARY_IMPL(fused_losses, CUDA, m)). No pybind11, so the
// build is abi3 like _C.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
