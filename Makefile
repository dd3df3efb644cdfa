# The two commands of the README: `make demo` and `make test`. Each sets itself up:
# a venv with the pinned torch, then the compiled extension (CPU part, and the CUDA part when
# nvcc is found; no GPU is needed to compile it).
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_PIN   := torch==2.14.1 torchvision==0.29.1
DEV_PINS    := pytest==9.2.0 pytest-xdist==3.8.0 hypothesis==6.170.15 expecttest==0.3.0 \
               matplotlib==3.11.2 tqdm==4.70.1 mlxtend==0.25.0 ninja==1.13.2 packaging numpy
# torch guesses CUDA_HOME wrongly (/usr/local) on our machines.
CUDA_HOME   ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES     := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
PYTEST_ARGS ?=

.PHONY: venv build test demo bench clean test-cuda-emu
.DEFAULT_GOAL := test

$(VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet $(DEV_PINS)
	touch $@

venv: $(VENV)/.installed

# In-place build: fused_losses/_C*.so next to the sources; ninja rebuilds only what changed.
fused_losses/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: fused_losses/.built

test: build
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

demo: build
	$(PY) -m fused_losses.demo

# The CUDA kernels on the CPU emulator (README "CUDA emulator"): builds the emulated extension
# (build/cuda_emu, incremental), then runs the cuda_emu half of the compiled-backend tests under
# two schedules, the kernel regressions and the emulator's self-tests, then (with nvcc) the ptxas
# resource check of every kernel (fails on register spills). Exits non-zero on any failure. EMU_ASAN=1: the AddressSanitizer + UBSan build instead (build/cuda_emu_asan), on a
# subset (EMU_ASAN_TESTS; about 10x slower), with the sanitizer runtime preloaded into python.
EMU_SCHEDULES  := threads=forward,blocks=forward,sms=132 threads=random,seed=1,blocks=reverse,sms=1
EMU_TESTS      := tests/test_compiled_backends.py tests/test_backward.py
EMU_ASAN       ?= 0
EMU_ASAN_TESTS ?= tests/cuda_emu/test_kernels.py tests/test_backward.py \
                  tests/test_compiled_backends.py::test_focal_every_row_kernel \
                  tests/test_compiled_backends.py::test_misaligned_views \
                  tests/test_compiled_backends.py::test_ghmc_large_spatial_and_many_bins \
                  tests/test_compiled_backends.py::test_sigmoid_focal_shapes_tails_layouts_and_mixed_targets
EMU_ASAN_ENV   := LD_PRELOAD=$$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
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

bench: build
	$(PY) -m benchmarks.bench --size small

clean:
	rm -rf build fused_losses/_C*.so fused_losses/.built
