"""Static resource check of the CUDA kernels (no GPU needed): compiles every csrc/cuda/*.cu for
sm_90 with `nvcc --cubin -Xptxas -v` and fails on any kernel that spills registers to local
memory (spill stores or loads > 0). Prints registers, stack frame and spills per kernel, and the
resident blocks of 256 threads per multiprocessor the register count allows (what the
occupancy calculator gives grid_for, csrc/cuda/common.cuh).

    python -m tests.cuda_emu.resource_check [--arch sm_90] [--jobs 2] [--out FILE]
    python -m tests.cuda_emu.resource_check --from-log BUILD_LOG   # a build run with
        NVCC_APPEND_FLAGS="-Xptxas -v" (the ptxas lines of every file, no second compile)

Exit status 1 on a spill, 2 when nvcc is missing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")


def _include_dirs() -> list[str]:
    import importlib.util

    import torch.utils.cpp_extension as ext

    dirs = [os.path.join(ROOT, "csrc"), *ext.include_paths(), sysconfig.get_paths()["include"]]
    spec = importlib.util.find_spec("nvidia")  # cusparse.h & co. from the wheels torch came with
    for root in (spec.submodule_search_locations if spec else []):
        dirs += [d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.exists(os.path.join(d, "cusparse.h"))]
    return dirs


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def compile_one(source: str, arch: str) -> str:
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "--cubin", f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               *[f"-I{d}" for d in _include_dirs()], source, "-o", os.path.join(tmp, "out.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
    return result.stderr


def parse(ptxas: str) -> list[dict]:
    kernels, current = [], None
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = {"name": m.group(1), "regs": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
    return kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    parser.add_argument("--out", help="also write the report here")
    parser.add_argument("--from-log", help="parse the ptxas -v lines of this build log instead of compiling")
    args = parser.parse_args(argv)
    if args.from_log:
        sources = ["build log " + os.path.basename(args.from_log)]
        outputs = {sources[0]: open(args.from_log, errors="replace").read()}
    else:
        if not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            print(f"resource check: no nvcc under {CUDA_HOME}", file=sys.stderr)
            return 2
        sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            outputs = dict(zip(sources, pool.map(lambda s: compile_one(s, args.arch), sources)))
    lines, spills = [], 0
    for source in sources:
        kernels = parse(outputs[source])
        names = _demangle([k["name"] for k in kernels])
        label = os.path.relpath(source, ROOT) if os.path.isabs(source) else source
        lines.append(f"== {label} ({args.arch}): {len(kernels)} kernels")
        for k in sorted(kernels, key=lambda k: names[k["name"]]):
            regs = max(k["regs"], 1)
            blocks = min(8, 65536 // (((regs + 7) // 8 * 8) * 256)) if regs else 8
            bad = k["spill_stores"] or k["spill_loads"]
            spills += bool(bad)
            lines.append(f"{'SPILL ' if bad else '      '}{k['regs']:3d} regs  stack {k['stack']:4d} B  spill "
                         f"{k['spill_stores']}/{k['spill_loads']} B  <= {blocks} blocks/SM  {names[k['name']]}")
    lines.append(f"resource check: {spills} kernels spill" if spills else "resource check: no spills")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
