"""A small CUDA driver for compute-sanitizer (memcheck, racecheck): focal and sigmoid_focal,
forward and backward, through every available fused GPU backend, on odd small shapes (tails
that do not fill a block, C = 1, 80, 1203, channel-second inputs, ignored rows, integer labels with
background) in float32 and bfloat16. Each result is also compared with the float64 reference on
the CPU, so a kernel that reads garbage without faulting still shows.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python -m benchmarks.sanitize_driver

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so an out-of-bounds access
is not hidden inside a larger cached block. Exit status: 0 all ran and matched, 1 a mismatch or
an error, 2 no fused GPU backend is available (nothing was sanitized).
"""
from __future__ import annotations

import argparse
import sys

import torch

import fused_losses as fl

GPU_BACKENDS = ("cuda", "triton")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def cases(gen):
    """(name, loss, logits (CPU fp32), target (CPU), kwargs)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 3

    out = []
    t = torch.randint(0, 80, (1001,), generator=gen)
    t[::7] = -100
    out.append(("focal 1001x80 ignore", "focal", randn(1001, 80), t, dict(gamma=2.0)))
    t = torch.randint(0, 19, (2, 17, 33), generator=gen)
    t[:, ::5] = 255
    out.append(("focal 2x19x17x33 ignore 255 alpha", "focal", randn(2, 19, 17, 33), t,
                dict(gamma=2.0, alpha=[0.25 + 0.01 * k for k in range(19)], ignore_index=255)))
    out.append(("focal 7x1203 gamma 0.5", "focal", randn(7, 1203), torch.randint(0, 1203, (7,), generator=gen),
                dict(gamma=0.5, reduction="sum")))
    out.append(("focal 5x1", "focal", randn(5, 1), torch.zeros(5, dtype=torch.long), dict(reduction="none")))
    y = (torch.rand(1001, 80, generator=gen) < 0.05).float()
    out.append(("sigmoid_focal 1001x80 float", "sigmoid_focal", randn(1001, 80), y, dict(reduction="sum")))
    labels = torch.randint(0, 81, (1001,), generator=gen)
    labels[::9] = -1
    out.append(("sigmoid_focal 1001x80 labels", "sigmoid_focal", randn(1001, 80), labels,
                dict(ignore_index=-1, reduction="mean")))
    labels = torch.randint(0, 1204, (3, 37), generator=gen)
    out.append(("sigmoid_focal 3x37x1203 labels none", "sigmoid_focal", randn(3, 37, 1203), labels,
                dict(reduction="none")))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = torch.linalg.vector_norm(ref)
    diff = torch.linalg.vector_norm(out - ref)
    return float(diff / scale) if scale > 0 else float(diff)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(GPU_BACKENDS))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda", help="cpu only to dry-run this script (e.g. the Triton "
                   "backend under TRITON_INTERPRET=1); the sanitizer needs cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize")
        return 2
    status = fl.backends()
    backends = [b for b in args.backends.split(",") if status[b].available]
    for b in args.backends.split(","):
        print(f"backend {b}: {'available' if status[b].available else 'UNAVAILABLE: ' + status[b].reason}")
    if not backends:
        print("no fused GPU backend is available: NOTHING SANITIZED")
        return 2
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for name, loss, x_cpu, t_cpu, kwargs in cases(gen):
        fn = getattr(fl, loss)
        for dtype in dtypes:
            x64 = x_cpu.to(dtype).double().requires_grad_(True)
            t64 = t_cpu.double() if t_cpu.is_floating_point() else t_cpu
            ref = fn(x64, t64, backend="reference", **kwargs)
            ref_grad, = torch.autograd.grad(ref.sum(), [x64])
            for backend in backends:
                x = x_cpu.to(dtype).to(args.device).requires_grad_(True)
                t = (t_cpu.to(dtype) if t_cpu.is_floating_point() else t_cpu).to(args.device)
                try:
                    out = fn(x, t, backend=backend, **kwargs)
                    grad, = torch.autograd.grad(out.sum(), [x])
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    err = max(rel_err(out, ref), rel_err(grad, ref_grad))
                    ok = err <= TOL[dtype]
                    msg = f"rel err {err:.2e}"
                except Exception as exc:  # noqa: BLE001 - report and go on: the sanitizer log is the point
                    ok, msg = False, f"{type(exc).__name__}: {exc}"
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {backend:6s} {str(dtype):15s} {name}: {msg}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
