"""Compile representative variants of every Triton kernel for a CUDA arch, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so it
accepts things the GPU path rejects (e.g. non-constexpr globals). This lowers each kernel to a
cubin for the given arch (ptxas ships with triton), so CPU-only CI catches those errors:

    TRITON_INTERPRET=0 python -m fused_losses._triton.compile_check [--arch 90] [--all]

Exit status 0 when every variant compiles; prints one line per variant.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time


def _variants(full: bool):
    from fused_losses._triton import kernels as K

    dtypes = ("fp32", "bf16", "fp16")
    rows = []
    for i, (xdt, kind, from_logits, class_w, grad, reduce, extras) in enumerate(itertools.product(
            dtypes, (K.FOCAL, K.STATS, K.IB), (True, False), (True, False), (True, False), (True, False),
            (False, True))):
        if kind != K.FOCAL and not from_logits:
            continue
        if extras and (kind == K.IB or not from_logits):
            continue  # the drop-in extras (weight, label smoothing) exist for FOCAL and STATS only
        types = dict(X=f"*{xdt}", T="*i64", CLASS_W="*fp32", FEAT="*fp32", SCALE="*fp32", W="*fp32",
                     LOSS="*fp32" if kind == K.STATS else f"*{xdt}",
                     PARTIAL="*fp32", LOGPT="*fp32", OMP="*fp32", LSE="*fp32", GRAD=f"*{xdt}", DFEAT="*fp32",
                     M="i64", C="i32", S="i32", sxn="i64", sxc="i32", sxs="i32", sgn="i64", sgc="i32", sgs="i32",
                     gamma="fp32", alpha="fp32", epsilon="fp32", smoothing="fp32", ignore_index="i64",
                     poly_eps="fp32")
        consts = dict(KIND=kind, HAS_CLASS_W=class_w, HAS_IGNORE=kind != K.IB, FROM_LOGITS=from_logits,
                      DETACH_FACTOR=False, IB_FOCAL=kind == K.IB and class_w, WRITE_GRAD=grad, STORE_ROWS=not reduce,
                      REDUCE=reduce, HAS_WEIGHT=extras, SMOOTH=extras, BLOCK_M=64 if i % 2 else 2,
                      BLOCK_C=64 if i % 2 else 2048,
                      POLY=extras and kind == K.FOCAL)  # Poly-1 (#24) with the extras
        rows.append((K.softmax_rows_kernel, types, consts))
    grads = [(K.softmax_grad_kernel,
              dict(X=f"*{xdt}", T="*i32", LSE="*fp32", COEF="*fp32", W="*fp32", GRAD=f"*{xdt}", M="i32", C="i32",
                   S="i32", sxn="i32", sxc="i32", sxs="i32", sgn="i32", sgc="i32", sgs="i32", ignore_index="i32",
                   smoothing="fp32"),
              dict(SKIP_ZERO_COEF=skip, HAS_WEIGHT=extras, SMOOTH=extras, BLOCK_M=64, BLOCK_C=64))
             for xdt, skip, extras in zip(dtypes + dtypes, (True, False, True) * 2, (False,) * 3 + (True,) * 3)]
    sigmoid = []
    for xdt, labels, kind, grad, extras in itertools.product(dtypes, (True, False), (K.SIGMOID_FOCAL, K.GHMC_SIGMOID),
                                                             (True, False), (False, True)):
        tdt = "*i64" if labels else f"*{xdt}"
        # extras: per-element weights and per-class alpha (FOCAL); the plain variant has neither.
        sigmoid.append((K.sigmoid_kernel,
                        dict(X=f"*{xdt}", T=tdt, BIN_W="*fp32", SCALE="*fp32", W="*fp32", ALPHA_C="*fp32",
                             LOSS=f"*{xdt}", PARTIAL="*fp32", GRAD=f"*{xdt}", numel="i64", C="i32", alpha="fp32",
                             gamma="fp32", ignore_index="i32", bins="i32", poly_eps="fp32"),
                        dict(KIND=kind, LABELS=labels, WRITE_GRAD=grad, STORE_ELEMS=not grad, REDUCE=grad,
                             HAS_WEIGHT=extras, WEIGHT_PER_ELEM=extras and labels,
                             ALPHA_PER_CLASS=extras and kind == K.SIGMOID_FOCAL, BLOCK=1024,
                             POLY=extras and kind == K.SIGMOID_FOCAL)))  # Poly-1 (#24) with the extras
        if kind == K.GHMC_SIGMOID and grad:
            sigmoid.append((K.ghm_sigmoid_hist_kernel,
                            dict(X=f"*{xdt}", T=tdt, W="*fp32", HIST="*i32", numel="i64", C="i32", ignore_index="i32",
                                 bins="i32", num_programs="i32"),
                            dict(LABELS=labels, HAS_WEIGHT=extras, WEIGHT_PER_ELEM=not labels, NUM_BINS_P2=16,
                                 BLOCK=1024)))
    # The one-pass tile kernels (issue #28): every gamma specialisation, int32 and int64 offsets,
    # two pieces (C = 80: 64 + 16) and one (C = 64); the hot cases as the launcher configures them
    # are counted by make gpu-budget.
    tiles = []
    for n, (xdt, mode, int64, extras) in enumerate(itertools.product(dtypes, (0, 1, 2), (False, True),
                                                                        (False, True))):
        idx = "i64" if int64 else "i32"
        block_b = 16 if n % 2 else 0
        tiles.append((K.softmax_focal_tile_kernel,
                      dict(X=f"*{xdt}", T="*i64", CLASS_W="*fp32", SCALE="*fp32", W="*fp32", LOSS=f"*{xdt}",
                           PARTIAL="*fp32", GRAD=f"*{xdt}", M=idx, C="i32", sxn=idx, sgn=idx, gamma="fp32",
                           alpha="fp32", ignore_index="i32"),
                      dict(GAMMA_MODE=mode, HAS_CLASS_W=extras, HAS_IGNORE=True, HAS_WEIGHT=extras, WRITE_GRAD=True,
                           STORE_ROWS=extras, REDUCE=not extras, INT64=int64, BLOCK_M=32, BLOCK_A=64,
                           BLOCK_B=block_b)))
        tiles.append((K.sigmoid_focal_labels_kernel,
                      dict(X=f"*{xdt}", T="*i64", SCALE="*fp32", LOSS=f"*{xdt}", PARTIAL="*fp32", GRAD=f"*{xdt}",
                           R=idx, C="i32", alpha="fp32", gamma="fp32", ignore_index="i32"),
                      dict(GAMMA_MODE=mode, WRITE_GRAD=not extras or mode == 1, STORE_ELEMS=extras, REDUCE=not extras,
                           INT64=int64, BLOCK_R=32, BLOCK_A=64, BLOCK_B=block_b)))
    rescale = [(K.rescale_grad_kernel, dict(GRAD=f"*{gdt}", GO="*fp32", APPLIED="*fp32", numel="i64", X=f"*{gdt}"),
                dict(BLOCK=4096)) for gdt in ("fp32", "bf16", "fp16")]
    rescale.append((K.record_scale_kernel, dict(GO="*fp32", APPLIED="*fp32", X="*fp32"), {}))
    # ---- distribution focal (#24): fused_losses/_triton/dfl.py ----
    from fused_losses._triton.dfl import dfl_kernel
    dfl = [(dfl_kernel, dict(X=f"*{xdt}", T="*fp32", W="*fp32", LOSS=f"*{xdt}", PARTIAL="*fp32",
                             GRAD=f"*{xdt}" if xdt != "fp16" else "*fp32", M="i64", C="i32", scale="fp32"),
            dict(HAS_WEIGHT=weighted, WRITE_GRAD=True, STORE_ROWS=not weighted, REDUCE=weighted, BLOCK_M=128,
                 BLOCK_C=32))
           for xdt, weighted in itertools.product(dtypes, (False, True))]
    everything = rows + grads + sigmoid + tiles + rescale + dfl
    if full:
        return everything
    # One representative per kernel and kind, the dtypes taking turns.
    groups: dict = {}
    for fn, types, consts in everything:
        key = (fn.__name__, consts.get("KIND"), consts.get("FROM_LOGITS"), consts.get("LABELS"),
               consts.get("HAS_WEIGHT"), consts.get("GAMMA_MODE"), consts.get("INT64"))
        groups.setdefault(key, []).append((fn, types, consts))
    picked = []
    for n, group in enumerate(groups.values()):
        wanted = dtypes[n % len(dtypes)]
        picked.append(next((v for v in group if v[1]["X"] == f"*{wanted}"), group[0]))
    return picked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90)")
    parser.add_argument("--all", action="store_true", help="every constexpr combination, not one per kind")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for fn, types, consts in _variants(args.all):
        # types["X"] names the logits (or gradient) dtype of the variant in the report line.
        signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
        constexprs = {(fn.arg_names.index(name),): value for name, value in consts.items()}
        start = time.time()
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                           options={"num_warps": 4})
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - report every failing variant
            failures += 1
            status = f"FAILED {type(exc).__name__}: {exc}"
        print(f"{fn.__name__} {types['X'][1:]} {consts}: {status} ({time.time() - start:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
