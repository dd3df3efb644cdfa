# The two commands of the README: `make demo` and `make test`. Each sets itself up and says what
# it is doing: a venv with the pinned torch, the compiled extension, and an editable install of
# fused_losses into that venv (so `.venv/bin/python` imports it from any directory).
#
# The extension is two modules (setup.py): fused_losses._C (op schemas + CPU kernels) and
# fused_losses._C_cuda (CUDA kernels; compiled when nvcc is found, no GPU needed).
#   make demo    builds only _C: the CPU demo never waits for nvcc
#   make build   builds both (the CUDA part when nvcc is found, GPU or not: it passes
#                FUSED_LOSSES_BUILD_CUDA=1 to setup.py then; =0 skips it); `make test` and .ci/run
#                use this. A plain `pip install .` builds the CUDA part only with a visible GPU.
# Times in the messages: a quiet 2-core machine (AMD EPYC); a busy one takes longer.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_PIN   := torch==2.14.1 torchvision==0.29.1
DEV_PINS    := pytest==9.2.0 pytest-xdist==3.8.0 hypothesis==6.170.15 expecttest==0.3.0 \
               matplotlib==3.11.2 tqdm==4.70.1 mlxtend==0.25.0 ninja==1.13.2 packaging numpy \
               mkdocs==1.6.1 mkdocs-material==9.8.1 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11
# torch guesses CUDA_HOME wrongly (/usr/local) on our machines.
CUDA_HOME   ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 9.0
# ninja jobs per extension module; each module has several translation units, so 2 jobs keep
# both cores busy.
export MAX_JOBS ?= 2
# torch's build finds ninja on PATH only: the venv's ninja (from DEV_PINS) must be on it, or the
# build silently falls back to one file at a time, without incremental rebuilds.
export PATH := $(abspath $(VENV))/bin:$(PATH)
CPU_SOURCES  := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
CUDA_SOURCES := setup.py $(wildcard csrc/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/kernels/*.cuh)
# Stamps live in build/ (ignored by git, removed by `make clean`).
CPU_STAMP   := build/.stamp-cpu
CUDA_STAMP  := build/.stamp-cuda
EDITABLE    := $(VENV)/.fused_losses-editable
PYTEST_ARGS ?=
# Shortens ninja's command lines to "[k/n] csrc/..." (a file done) and drops torch's note that
# no GPU is visible; every other line (compiler errors and warnings) passes unchanged.
NINJA_FILTER := sed -u -E -e 's|^(\[[0-9]+/[0-9]+\]) .* -c ($(CURDIR)/)?([^ ]+) -o .*|  \1 \3|' \
                -e '/No CUDA runtime is found/d'

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: venv build build-cpu test demo bench clean test-cuda-emu gpu-budget gpu-sim docs
.DEFAULT_GOAL := test

# One pip call for torch and the tools, --no-compile: pip would byte-compile every module of
# torch (about 25 s of one core); Python compiles the ones actually imported on first use.
$(VENV)/.installed: Makefile
	@echo "make: creating $(VENV) with torch 2.14.1 and the test/demo tools (about 2 min; 5.7 GB)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet --no-compile $(TORCH_PIN) $(DEV_PINS)
	touch $@

venv: $(VENV)/.installed

# In-place builds (fused_losses/_C*.so next to the sources); ninja rebuilds only what changed.
$(CPU_STAMP): $(VENV)/.installed $(CPU_SOURCES)
	@echo "make: compiling the CPU kernels, fused_losses._C (setup.py build_ext --inplace; about 3.5 min on 2 cores the first time)"
	@FUSED_LOSSES_BUILD_CUDA=0 $(PY) setup.py --quiet build_ext --inplace 2>&1 | $(NINJA_FILTER)
	@mkdir -p build && touch $@

$(CUDA_STAMP): $(CPU_STAMP) $(CUDA_SOURCES)
	@if [ "$${FUSED_LOSSES_BUILD_CUDA:-}" = 0 ]; then echo "make: FUSED_LOSSES_BUILD_CUDA=0: not building the CUDA part"; \
	elif [ -n "$(CUDA_HOME)" ] || [ "$${FUSED_LOSSES_BUILD_CUDA:-}" = 1 ]; then \
	  echo "make: compiling the CUDA kernels, fused_losses._C_cuda, for sm $(TORCH_CUDA_ARCH_LIST) (setup.py build_ext --inplace; about 1.5 min on 2 cores the first time; no GPU needed)"; \
	else echo "make: no nvcc found (CUDA_HOME unset): not building the CUDA part"; fi
	@FUSED_LOSSES_BUILD_CUDA=$${FUSED_LOSSES_BUILD_CUDA:-$(if $(CUDA_HOME),1,)} \
	  $(PY) setup.py --quiet build_ext --inplace 2>&1 | $(NINJA_FILTER)
	@touch $@

# `pip install -e`: .venv/bin/python imports fused_losses (this source tree, with the in-place
# .so files) from any directory. setup.py keeps the objects in build/ for it too, so this
# compiles nothing after the in-place build (it relinks _C, a few seconds); FUSED_LOSSES_BUILD_CUDA=0
# because the CUDA part is the in-place build's business.
$(EDITABLE): $(CPU_STAMP) pyproject.toml setup.py
	@echo "make: installing fused_losses into $(VENV) in editable mode (pip install --no-build-isolation -e .; about 20 s)"
	@FUSED_LOSSES_BUILD_CUDA=0 PYTHONWARNINGS="ignore:Editable installation" \
	  $(PY) -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | $(NINJA_FILTER)
	@touch $@

# A CUDA part older than its sources is removed rather than left to load beside a newer _C.
build-cpu: $(CPU_STAMP) $(EDITABLE)
	@if [ -e $(CUDA_STAMP) ] && [ -n "$$(find $(CUDA_SOURCES) -newer $(CUDA_STAMP) 2>/dev/null)" ]; then \
	  echo "make: removing the out-of-date CUDA part fused_losses/_C_cuda*.so (make build rebuilds it)"; \
	  rm -f fused_losses/_C_cuda*.so $(CUDA_STAMP); fi

build: $(CUDA_STAMP) $(EDITABLE)

test: build
	@echo "make: running the test suite on 2 workers (about 4 min on 2 cores)"
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: build-cpu
	@echo "make: running the demo: 8 LeNets on 4000 MNIST digits (about 1 min)"
	$(PY) -m fused_losses.demo

# The CUDA kernels on the CPU emulator (README "CUDA emulator"): builds the emulated extension
# (build/cuda_emu, incremental), then runs the cuda_emu half of the compiled-backend tests under
# two schedules, the kernel regressions and the emulator's self-tests, then (with nvcc) the ptxas
# resource check of every kernel (fails on register spills). Exits non-zero on any failure. EMU_ASAN=1: the AddressSanitizer + UBSan build instead (build/cuda_emu_asan), on a
# subset (EMU_ASAN_TESTS; about 10x slower), with the sanitizer runtime preloaded into python.
EMU_SCHEDULES  := threads=forward,blocks=forward,sms=132 threads=random,seed=1,blocks=reverse,sms=1
EMU_TESTS      := tests/test_compiled_backends.py tests/test_backward.py tests/test_accuracy_edges.py tests/test_dropin.py
EMU_ASAN       ?= 0
EMU_ASAN_TESTS ?= tests/cuda_emu/test_kernels.py tests/test_backward.py tests/test_dropin.py \
                  tests/test_compiled_backends.py::test_focal_every_row_kernel \
                  tests/test_compiled_backends.py::test_misaligned_views \
                  tests/test_compiled_backends.py::test_ghmc_large_spatial_and_many_bins \
                  tests/test_compiled_backends.py::test_sigmoid_focal_shapes_tails_layouts_and_mixed_targets
# the detector (#24) and long-tail (#25) losses: their kernels' cases, both lists
NEW_LOSS_TESTS := tests/test_detector_sigmoid.py tests/test_dfl.py tests/test_poly1.py tests/test_seesaw.py \
                  tests/test_eqlv2.py
EMU_TESTS      += $(NEW_LOSS_TESTS)
EMU_ASAN_TESTS += $(NEW_LOSS_TESTS)
# libstdc++ is preloaded right after the sanitizer runtime: otherwise ASan's __cxa_throw
# interceptor finds no real __cxa_throw (python itself does not link libstdc++) and the first C++
# exception (a device-side assert turned into a RuntimeError) aborts with "CHECK failed".
EMU_ASAN_ENV   := LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
                  ASAN_OPTIONS=detect_leaks=0 \
                  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 FL_CUDA_EMU_ASAN=1
test-cuda-emu: build
ifeq ($(EMU_ASAN),1)
	$(EMU_ASAN_ENV) $(PY) -m tests.cuda_emu.build --asan
	$(EMU_ASAN_ENV) FL_CUDA_EMU=threads=random,seed=2,sms=1 $(PY) -m pytest -n 2 -q -p no:cacheprovider \
	  -k cuda_emu $(EMU_ASAN_TESTS) $(PYTEST_ARGS)
else
	$(PY) -m tests.cuda_emu.build
	set -e; for schedule in $(EMU_SCHEDULES); do \
	  echo "== cuda_emu schedule $$schedule"; \
	  FL_CUDA_EMU=$$schedule $(PY) -m pytest -n 2 -q -p no:cacheprovider -k cuda_emu $(EMU_TESTS) $(PYTEST_ARGS); \
	done
	FL_CUDA_EMU=threads=forward $(PY) -m pytest -n 2 -q -p no:cacheprovider tests/cuda_emu $(PYTEST_ARGS)
	if [ -n "$(CUDA_HOME)" ]; then $(PY) -m tests.cuda_emu.resource_check; fi
endif

# The static SASS budget of the GPU kernels (issues #23, #28; csrc/cuda/NOTES.md "Static SASS budget"):
# counts the sm_90 SASS of the built fused_losses/_C_cuda*.so and of the Triton kernels compiled for
# sm_90, writes benchmarks/results/gpu-static-sm90.json, fails when a case exceeds its ceiling in
# benchmarks/gpu_budget_limits.json. No GPU needed; about 1 min on 2 cores. It reads the CUDA part
# as built and does not build it (so that running it in a worktree never rebuilds or re-installs):
# run `make build` first (.ci/run does). GPU_BUDGET_ARGS=--require-targets: also fail below the
# issues' roofline targets.
GPU_BUDGET_ARGS ?=
gpu-budget:
	TRITON_INTERPRET=0 $(PY) -m benchmarks.gpu_budget $(GPU_BUDGET_ARGS)

# The documentation site (mkdocs.yml, docs/): --strict makes every warning an error (a broken
# link or anchor, a page missing from nav, a docstring mkdocstrings cannot parse). The API pages
# come from the docstrings of fused_losses/*.py. 12-14 s on a busy 2-core machine.
docs: $(VENV)/.installed
	@echo "make: building the documentation site into build/site (mkdocs build --strict; about 15 s)"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d build/site

# Simulated measurement of the real CUDA kernels (issue #23; a developer tool, not in CI: minutes
# of CPU): GPGPU-Sim from ../shared/gpusim (build once: ../shared/gpusim/build.sh $(GPUSIM_HOME)),
# standalone drivers of benchmarks/gpusim/ (no torch at run time) against the copy yardstick
# moving the same bytes. Writes benchmarks/results/gpu-sim-<config>.json. SIM_CONFIG: a config
# folder name of ../shared/gpusim/configs (slice-dram: 16 SMs; h100-dram: the whole chip) or a
# path. GPU_SIM_CASES / GPU_SIM_DTYPES: a subset (benchmarks/gpusim/run.py --help).
SIM_CONFIG     ?= slice-dram
GPUSIM_HOME    ?= $(HOME)/.cache/gpgpu-sim
GPU_SIM_CASES  ?=
GPU_SIM_DTYPES ?= fp32 bf16
gpu-sim:
	@[ -f "$(GPUSIM_HOME)/env.sh" ] || { echo "make: no simulator in $(GPUSIM_HOME): PYTHON=$(PY) ../shared/gpusim/build.sh $(GPUSIM_HOME) (about 5 CPU-minutes)"; exit 1; }
	source "$(GPUSIM_HOME)/env.sh" && $(PY) benchmarks/gpusim/run.py --config "$(SIM_CONFIG)" \
	  --cases "$(GPU_SIM_CASES)" --dtypes "$(GPU_SIM_DTYPES)"

bench: build
	$(PY) -m benchmarks.bench --size small

clean:
	rm -rf build fused_losses/_C*.so fused_losses/.built
