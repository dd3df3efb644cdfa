"""Static SASS count of the Triton kernels exactly as the launchers configure them (no GPU).

    TRITON_INTERPRET=0 python -m fused_losses._triton.sass_count [--case NAME] [--dump DIR]

For each case (softmax focal C = 80 / 1203, sigmoid focal integer labels C = 80; fp32 and bf16;
reduction 'mean' with the gradient: the forward + backward of a training step) this runs the real
launcher of fused_losses._triton.launch on small CPU tensors with the kernel launch patched to
record the call (arguments, constexprs, num_warps, num_stages, grid) instead of running it,
specialises the arguments as triton's JIT does on a GPU (integers divisible by 16 and 16-byte
aligned pointers get tt.divisibility = 16, integer 1 becomes a constant; the rows x C shape of
the case, so the strides are the real ones), compiles for sm_90 (ptxas from triton) and counts
the SASS of the cubin (cuobjdump from triton).

Counting model: the one-pass kernels are straight-line code (one tile per program, no loop:
checked, a backward branch fails the count), so the warp-instructions a program executes are the
static count of its SASS (NOPs excluded; both sides of the few uniform branches are counted, an
upper bound) times num_warps; per element: that over BLOCK_M x C (the real columns, not the
padded tile). The roofline: H100 SXM, 3.35 TB/s and 4 warp-instructions/cycle/SM x 132 SMs x
1.98 GHz; bytes per element: logits read once + gradient written once + the target per row
(8 / C); pct = min(1, t_mem / t_issue). It ignores latency, dual issue and caches (a bound, not
a measurement).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ISSUE_RATE = 4 * 132 * 1.98e9  # warp-instructions per second, H100 SXM
HBM = 3.35e12  # bytes per second


def _record(call):
    """Runs call() with JITFunction.run patched; returns the recorded launches."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), grid))

    for cls in originals:
        cls.run = fake_run
    try:
        call()
    finally:
        for cls, run in originals.items():
            cls.run = run
    return launches


def _compile(fn, args, kwargs):
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constexprs[(i,)] = spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), options


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_of(kernel) -> tuple[str, int]:
    """(SASS text, registers per thread) of a compiled kernel's cubin."""
    bindir = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(bindir, "cuobjdump")
        sass = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    return sass, int(regs.group(1)) if regs else -1


def count(sass: str) -> dict:
    """Instruction counts of a straight-line kernel; raises on a backward branch (a loop)."""
    ops = collections.Counter()
    total = 0
    for m in _INST.finditer(sass):
        addr, op, rest = int(m.group(1), 16), m.group(3), m.group(4)
        if op == "NOP":
            continue
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) <= addr:
                if int(target.group(1), 16) == addr:
                    continue  # the trailing self-branch after EXIT
                raise RuntimeError(f"backward branch at {addr:#x}: a loop, the straight-line model does not apply")
        ops[op.split(".")[0]] += 1
        total += 1
    return dict(total=total, ops=ops)


def _widths(sass: str, prefix: str) -> list[int]:
    widths = set()
    for m in re.finditer(rf"\b{prefix}\.E(\.\w+)*", sass):
        mods = m.group(0).split(".")
        bits = 32
        for mod in mods:
            if mod in ("64", "128"):
                bits = int(mod)
            elif mod in ("U16", "S16"):
                bits = 16
            elif mod in ("U8", "S8"):
                bits = 8
        widths.add(bits)
    return sorted(widths)


def _cases():
    import torch

    from fused_losses._triton import launch

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for c, rows in ((80, 4096), (1203, 512)):
            def run(c=c, rows=rows, dtype=dtype):
                x = torch.zeros(rows, c, dtype=dtype)
                t = torch.zeros(rows, dtype=torch.int64)
                launch.softmax_focal(x, t, None, 1.0, 2.0, -100, "mean", True, True)
            out.append((f"softmax_focal_{'fp32' if dtype == torch.float32 else 'bf16'}_C{c}", c, dtype, run))

        def run_sig(dtype=dtype):
            x = torch.zeros(4096, 80, dtype=dtype)
            t = torch.zeros(4096, dtype=torch.int64)
            launch.sigmoid_focal(x, t, 0.25, 2.0, -100, "mean", True)
        out.append((f"sigmoid_focal_labels_{'fp32' if dtype == torch.float32 else 'bf16'}_C80", 80, dtype, run_sig))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None, help="substring of the case names to run")
    parser.add_argument("--dump", default=None, help="folder to write each case's SASS to")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sass_count: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    print(f"{'case':34} {'kernel':30} {'warps':>5} {'tile':>12} {'regs':>4} {'inst':>6} {'MUFU':>5} "
          f"{'ld/st bits':>10} {'w-inst/elem':>11} {'% roofline':>10}")
    for name, c, dtype, run in _cases():
        if args.case and args.case not in name:
            continue
        launches = _record(run)
        hot = [l for l in launches if l[0].fn.__name__ not in ("record_scale_kernel",)]
        fn, fargs, kwargs, grid = hot[0]
        kernel, options = _compile(fn, fargs, dict(kwargs))
        sass, regs = sass_of(kernel)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.sass"), "w") as f:
                f.write(sass)
        counted = count(sass)
        warps = options.get("num_warps", 4)
        block_rows = kwargs.get("BLOCK_M", kwargs.get("BLOCK_R"))
        elems = block_rows * c
        per_elem = counted["total"] * warps / elems
        esize = dtype.itemsize
        bytes_per_elem = 2 * esize + 8 / c
        pct = min(1.0, (bytes_per_elem / HBM) / (per_elem / ISSUE_RATE)) * 100
        ld = _widths(sass, "LDG")
        st = _widths(sass, "STG")
        tile = f"{block_rows}x({kwargs.get('BLOCK_A')}+{kwargs.get('BLOCK_B')})"
        print(f"{name:34} {fn.fn.__name__:30} {warps:>5} {tile:>12} {regs:>4} {counted['total']:>6} "
              f"{counted['ops'].get('MUFU', 0):>5} {str(ld) + '/' + str(st):>10} {per_elem:>11.3f} {pct:>9.0f}%",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
