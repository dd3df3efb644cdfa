"""Mutation check of the CUDA test half on the emulator: every __syncthreads() in csrc/cuda
deleted, and grid-stride loops broken (a block stride instead of the grid stride), one mutant at
a time; `make test-cuda-emu`'s tests must fail on each.

    python -m tests.cuda_emu.mutants [--list] [--only ID ...] [--log FILE]

Each mutant is applied to a copy of csrc/ (build/cuda_emu_mutants/src), built incrementally in
build/cuda_emu_mutants/build, and the cuda_emu tests run against it (stopping at the first
failure: a killed mutant fails fast) under both make-target schedules until one kills it.
Too slow for every CI run (each mutant recompiles the files it touches); its result is committed
in tests/cuda_emu/mutants.log.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORK = os.path.join(ROOT, "build", "cuda_emu_mutants")
SCHEDULES = ["threads=forward,blocks=forward,sms=132", "threads=random,seed=1,blocks=reverse,sms=1"]
TESTS = ["tests/test_compiled_backends.py", "tests/test_backward.py", "tests/cuda_emu/test_kernels.py"]

# Grid-stride loops: (file, the stride expression, its broken form).
_GRID_STRIDES = [
    ("cuda/kernels/common_kernels.cuh", "const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;", "count_valid"),
    ("cuda/kernels/sigmoid_kernels.cuh", "const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;", "sigmoid"),
    ("cuda/kernels/sigmoid_kernels.cuh", "const I stride = static_cast<I>(gridDim.x) * kThreads;", "sigmoid_focal"),
    ("cuda/kernels/softmax_kernels.cuh", "const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;", "rows"),
    ("cuda/kernels/ghmc_kernels.cuh", "const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;", "histogram"),
    ("cuda/kernels/scale_grad_kernels.cuh", "const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;", "scale_grad"),
]


def mutants(csrc: str):
    """(id, relative path, source text of the mutant) for every mutant."""
    out = []
    cuda_dir = os.path.join(csrc, "cuda")
    files = sorted(os.path.relpath(os.path.join(d, f), cuda_dir) for d, _, fs in os.walk(cuda_dir) for f in fs)
    for rel in files:  # csrc/cuda and csrc/cuda/kernels (the kernel headers)
        if not rel.endswith((".cu", ".cuh")):
            continue
        path = os.path.join("cuda", rel)
        text = open(os.path.join(csrc, path)).read()
        for k, m in enumerate(re.finditer(r"__syncthreads\(\);", text)):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"nosync-{rel}:{line}", path, text[:m.start()] + ";" + text[m.end():]))
    for path, stride, name in _GRID_STRIDES:
        text = open(os.path.join(csrc, path)).read()
        for k, m in enumerate(re.finditer(re.escape(stride), text)):
            broken = stride.replace("gridDim.x", "1")  # every block strides as if it were alone
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"stride-{name}-{os.path.basename(path)}:{line}", path,
                        text[:m.start()] + broken + text[m.end():]))
    return out


def _sync_tree() -> str:
    """build/cuda_emu_mutants/src = csrc/, rewriting only files whose content differs (so the
    incremental build recompiles only what a mutant touched, and what the previous one did)."""
    src = os.path.join(WORK, "src")
    origin = os.path.join(ROOT, "csrc")
    for directory, _, files in os.walk(origin):
        target_dir = os.path.join(src, os.path.relpath(directory, origin))
        os.makedirs(target_dir, exist_ok=True)
        for name in files:
            a, b = os.path.join(directory, name), os.path.join(target_dir, name)
            data = open(a, "rb").read()
            if not os.path.exists(b) or open(b, "rb").read() != data:
                with open(b, "wb") as f:
                    f.write(data)
    return src


def _run_tests(library: str, schedule: str) -> tuple[bool, str]:
    env = dict(os.environ, FL_CUDA_EMU=schedule, FL_CUDA_EMU_LIBRARY=library)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider", "-k", "cuda_emu", *TESTS]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("FAILED") or " passed" in ln or " failed" in ln]
    return result.returncode != 0, "; ".join(lines[-3:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--log", default=os.path.join(HERE, "mutants.log"))
    args = parser.parse_args(argv)
    src = _sync_tree()
    todo = [m for m in mutants(src) if not args.only or m[0] in args.only]
    if args.list:
        print("\n".join(m[0] for m in todo))
        return 0
    survived = 0
    with open(args.log, "a") as log:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, git {git.strip()}, "
                  f"{len(todo)} mutants, schedules {SCHEDULES}\n")
        for ident, rel, text in todo:
            src = _sync_tree()
            with open(os.path.join(src, rel), "w") as f:
                f.write(text)
            start = time.time()
            # A fresh process per build: torch's builder skips a second build of the same
            # extension name in one process when its listed sources (the wrappers) are unchanged.
            directory = os.path.join(WORK, "build")
            subprocess.run([sys.executable, "-c", "import sys; from tests.cuda_emu import build; "
                            f"build.build(csrc={src!r}, directory={directory!r})"], cwd=ROOT, check=True,
                           capture_output=True)
            library = os.path.join(directory, "fused_losses_emu.so")
            built = time.time() - start
            killed, detail = False, ""
            for schedule in SCHEDULES:
                killed, detail = _run_tests(library, schedule)
                if killed:
                    detail = f"killed under {schedule}: {detail}"
                    break
            survived += not killed
            line = f"{ident}: {'KILLED' if killed else 'SURVIVED'} (build {built:.0f} s, " \
                   f"tests {time.time() - start - built:.0f} s) {detail if killed else detail}"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
        _sync_tree()  # back to the unmutated sources
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
