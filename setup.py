"""Build the compiled extension of fused_losses as two modules:

  fused_losses._C       the op schemas and the C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp);
                        always built
  fused_losses._C_cuda  the CUDA kernels (csrc/cuda/*.cu, csrc/cuda/*.cpp), registered for the
                        CUDA key of _C's ops; built when possible, loaded after _C when present

A CPU-only user never compiles (or waits for) the CUDA part: without a visible GPU a plain
`pip install .` builds only _C (see FUSED_LOSSES_BUILD_CUDA below); `make demo` builds only _C.

Environment switches
  FUSED_LOSSES_BUILD_CUDA=0|1   0: never build _C_cuda; 1: build it or fail (no GPU needed);
                                unset: build it only when torch is a CUDA build, nvcc is found
                                under CUDA_HOME AND a GPU is visible (torch.cuda.is_available()):
                                a plain `pip install .` on a machine without a GPU compiles the
                                CPU part only
  TORCH_CUDA_ARCH_LIST          GPU archs to compile; unset: the compute capabilities of the
                                visible GPUs, or (FUSED_LOSSES_BUILD_CUDA=1 without a GPU) the
                                broad list of _default_arch_list; `make build` and CI use "9.0"
  MAX_JOBS                      parallel compile jobs per module (ninja)

The build prints one line saying which parts it compiles and for which archs, and why (pip
shows it with `pip install -v`).

The ops are registered with TORCH_LIBRARY from static initialisers; neither module has
pybind11 bindings (dummy PyInit__C / PyInit__C_cuda), so one abi3 build serves every
Python >= 3.9.

Objects go to build/temp.<platform> under this directory, also for `pip install -e .`
(setuptools would use a throwaway temporary directory there): the in-place
build (`setup.py build_ext --inplace`, what `make` runs) and the editable install share one
ninja build, so neither recompiles what the other compiled.
"""
import glob
import os
import sys
import sysconfig

# torch guesses CUDA_HOME from `which nvcc` and can land on /usr/local (link fails with
# -lcudart). Prefer the standard toolkit location when the user did not say otherwise.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_version():
    import re
    import subprocess

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    out = subprocess.check_output([nvcc, "--version"], text=True)
    return Version(re.search(r"release (\d+\.\d+)", out).group(1))


_BUILD_PLAN = []  # the one line BuildExt prints when it compiles (extensions() runs for every command)


def _say(message):
    _BUILD_PLAN[:] = [f"fused_losses build: {message}"]


def _visible_gpu_count():
    """GPUs this build can see (0 for a CPU-only torch or no driver); needs no GPU to ask."""
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return 0


def _want_cuda():
    """(build the CUDA part?, why): FUSED_LOSSES_BUILD_CUDA=0/1 decide; unset, only with a
    visible GPU (a machine without one gets the CPU part only, whatever nvcc it has)."""
    flag = os.environ.get("FUSED_LOSSES_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"FUSED_LOSSES_BUILD_CUDA={flag!r}: expected 0, 1 or unset")
    have_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    possible = torch.version.cuda is not None and have_nvcc
    if flag == "0":
        return False, "FUSED_LOSSES_BUILD_CUDA=0"
    if flag == "1":
        if not possible:
            raise RuntimeError(
                "FUSED_LOSSES_BUILD_CUDA=1 but the CUDA part cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}")
        return True, "FUSED_LOSSES_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not have_nvcc:
        return False, f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME!r}"
    if _visible_gpu_count() == 0:
        return False, "no GPU is visible; FUSED_LOSSES_BUILD_CUDA=1 compiles the CUDA kernels anyway"
    return True, "a GPU is visible and nvcc is found"


def _visible_arch_list():
    """The compute capabilities of the visible GPUs, e.g. "8.6;9.0" (None without a GPU)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(_visible_gpu_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps) or None


def _default_arch_list(nvcc):
    # CUDA 13 dropped sm < 7.5. Users get the common datacenter and consumer archs plus PTX
    # for the newest, so a newer GPU can JIT; CI and the lent H100 build only "9.0".
    if nvcc >= Version("13.0"):
        return "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    if nvcc >= Version("12.8"):
        return "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    return "7.0;7.5;8.0;8.6;8.9;9.0+PTX"


def _pip_cuda_include_dirs():
    """A toolkit without the math-library headers (cusparse.h, cublas_v2.h, which ATen's CUDA
    headers include) can borrow them from the nvidia-* wheels torch was installed with."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [d for d in found if os.path.exists(os.path.join(d, "cusparse.h"))][:1]


def extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # *.cpp: the module stub (PyInit__C_cuda); *.cu: the kernels. Python loads each module with
    # RTLD_LOCAL, so _C_cuda cannot use functions defined in _C's files (csrc/*.cpp,
    # csrc/cpu/*.cpp): code both need lives in headers (csrc/losses_math.h) or in both lists.
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No -std flag: torch's build helper picks the standard its headers need (C++17 for
    # torch <= 2.9, C++20 for newer).
    # -fno-trapping-math: lets GCC if-convert (and so vectorise) the selects of the CPU loss
    # loops; the kernels never rely on floating-point exception flags. Rounding is unchanged
    # (this is not -ffast-math).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math",
           "-Wno-psabi"]  # GCC's note that vector-argument passing changed in GCC 4.6: not our ABI
    include_dirs = [os.path.join(HERE, "csrc")]
    modules = [cpp_extension.CppExtension(
        "fused_losses._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"], py_limited_api=True)]
    cuda, why = _want_cuda()
    if not cuda:
        _say(f"compiling the CPU part only (fused_losses._C): {why}")
    else:
        if os.environ.get("TORCH_CUDA_ARCH_LIST"):
            archs = f"sm {os.environ['TORCH_CUDA_ARCH_LIST']} (TORCH_CUDA_ARCH_LIST)"
        else:
            visible = _visible_arch_list()
            os.environ["TORCH_CUDA_ARCH_LIST"] = visible or _default_arch_list(_nvcc_version())
            archs = (f"sm {visible} (the visible GPUs; TORCH_CUDA_ARCH_LIST overrides)" if visible else
                     f"sm {os.environ['TORCH_CUDA_ARCH_LIST']} (no GPU visible: the default list; "
                     "TORCH_CUDA_ARCH_LIST overrides)")
        _say(f"compiling the CPU part (fused_losses._C) and the CUDA part (fused_losses._C_cuda) for {archs}: {why}")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        modules.append(cpp_extension.CUDAExtension(
            "fused_losses._C_cuda", cuda_sources, include_dirs=include_dirs + _pip_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"], py_limited_api=True))
    return modules


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja, MAX_JOBS); an editable install compiles into the same
    build/temp.<platform> as every other build instead of a throwaway directory (see the module
    docstring)."""

    def build_extensions(self):
        # stderr: `setup.py --quiet` (make) keeps it; pip shows it with -v
        for line in _BUILD_PLAN:
            print(line, file=sys.stderr, flush=True)
        super().build_extensions()

    def run(self):
        super().run()
        # A build directory reused from an earlier build (make build, then `pip wheel .`) can hold
        # a _C_cuda of that build in build/lib.*: a build without the CUDA part must not ship it
        # (bdist_wheel packs everything under build/lib.*). The in-place copy is make's business.
        if not self.inplace and not any(ext.name == "fused_losses._C_cuda" for ext in self.extensions):
            for stale in glob.glob(os.path.join(self.build_lib, "fused_losses", "_C_cuda*")):
                os.remove(stale)

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:
            plat = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(HERE, "build", plat)


setup(
    # name, version, license and classifiers: pyproject.toml [project]
    packages=find_packages(include=["fused_losses", "fused_losses.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    install_requires=["torch>=2.4", "packaging"],
    python_requires=">=3.9",
)
