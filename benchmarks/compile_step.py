"""Eager against torch.compile'd training steps with each fused_losses.nn module (issue 26).

One step = zero_grad, a Linear head (D -> C), the loss, backward, an SGD step (no momentum:
with momentum torch recompiles opt.step once when its buffers appear). The compiled step is
torch.compile(step) with the default inductor backend. Each variant is warmed up (the compiled
one compiles then), then timed per step (median of --steps steps on fresh batches of one
shape, eager and compiled steps alternating so that load changes on a shared machine hit
both alike); dynamo's frame count is read before and after the timed steps, so a recompilation
during timing shows as "recompiled" in the table.

    .venv/bin/python -m benchmarks.compile_step                        # every module, 2 threads
    .venv/bin/python -m benchmarks.compile_step --modules FocalLoss --n 8192 --out-dir /tmp

Writes benchmarks/results/compile-step-<date>-<HHMM>.md (machine, SIMD variant, torch,
threads, git commit, date; measured on this machine's CPU).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import fused_losses as fl

MODULES = {
    "FocalLoss": (lambda c: fl.nn.FocalLoss(alpha=torch.linspace(0.2, 1.0, c).tolist()), "index"),
    "SigmoidFocalLoss": (lambda c: fl.nn.SigmoidFocalLoss(reduction="sum"), "labels"),
    "OHEMLoss": (lambda c: fl.nn.OHEMLoss(keep=0.25), "index"),
    "GHMCLoss": (lambda c: fl.nn.GHMCLoss(momentum=0.75), "labels"),
    "IBLoss": (lambda c: fl.nn.IBLoss(), "features"),
    "IBFocalLoss": (lambda c: fl.nn.IBFocalLoss(), "features"),
}


def trainer(loss_fn, kind, head, lr=0.01):
    """One training step (zero_grad, head, loss, backward, plain SGD) as a function of a batch;
    tests/test_compile_steps.py compiles the same step. No momentum: with momentum torch
    recompiles opt.step once, when its momentum buffers appear."""
    opt = torch.optim.SGD(head.parameters(), lr=lr)

    def step(x, t):
        opt.zero_grad(set_to_none=True)
        logits = head(x)
        loss = loss_fn(logits, t, x) if kind == "features" else loss_fn(logits, t)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _time_interleaved(steps, batches):
    """Median seconds per step of each trainer in `steps`, run in turn on each batch (eager, then
    compiled, then eager...), so that a change of load on a shared machine hits both alike."""
    times = [[] for _ in steps]
    for x, t in batches:
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step(x, t)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                        text=True).strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--n", type=int, default=4096, help="batch size (rows)")
    ap.add_argument("--dim", type=int, default=256, help="features D of the Linear head")
    ap.add_argument("--classes", type=int, default=100, help="classes C")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, d, c = args.n, args.dim, args.classes
    rows = []
    load_before = os.getloadavg()
    for name in args.modules.split(","):
        factory, kind = MODULES[name]
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(n, d, generator=g),
                    torch.randint(0, c + 1 if kind == "labels" else c, (n,), generator=g))
                   for _ in range(args.warmup + args.steps)]
        torch.manual_seed(0)
        eager = trainer(factory(c), kind, torch.nn.Linear(d, c))
        torch.manual_seed(0)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(trainer(factory(c), kind, torch.nn.Linear(d, c)), backend=counter)
        start = time.perf_counter()
        compiled(*batches[0])
        compile_s = time.perf_counter() - start
        for x, t in batches[:args.warmup]:
            eager(x, t)
            compiled(x, t)
        frames_warm = counter.frame_count
        eager_s, compiled_s = _time_interleaved([eager, compiled], batches[args.warmup:])
        recompiled = counter.frame_count != frames_warm
        rows.append((name, eager_s, compiled_s, compile_s, counter.frame_count, recompiled))
        print(f"{name:18s} eager {eager_s * 1e3:8.2f} ms  compiled {compiled_s * 1e3:8.2f} ms  "
              f"({eager_s / compiled_s:4.2f}x)  first call {compile_s:6.1f} s  frames {counter.frame_count}"
              f"{'  RECOMPILED' if recompiled else ''}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    load_after = os.getloadavg()
    cpu_reason = fl.backends()["cpu"].reason
    simd = cpu_reason.split("SIMD variant ", 1)[1].split(" ", 1)[0] if "SIMD variant " in cpu_reason else "unknown"
    lines = [
        f"# Compiled vs eager training step, per nn module ({stamp:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- machine: {_machine()}; measured on hardware (CPU), a machine shared with other jobs: 1-min load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after",
        f"- fused_losses cpu backend SIMD variant: {simd}; torch {torch.__version__}; "
        f"{args.threads} threads (torch.set_num_threads)",
        f"- git commit: {_commit()}",
        f"- step: zero_grad, Linear({d}, {c}), loss, backward, SGD(lr=0.01); batch N={n}, float32; "
        f"median over {args.steps} steps after {args.warmup} warm-up steps (the compiled step compiles in "
        "its first call), eager and compiled steps alternating; torch.compile(step), default inductor backend",
        f"- command: `python -m benchmarks.compile_step --n {n} --dim {d} --classes {c} --steps {args.steps} "
        f"--warmup {args.warmup} --threads {args.threads}`",
        "",
        "| module | eager ms/step | compiled ms/step | eager / compiled | first compiled call s | dynamo frames "
        "| recompiled while timed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e, cs, comp, frames, rec in rows:
        lines.append(f"| {name} | {e * 1e3:.2f} | {cs * 1e3:.2f} | {e / cs:.2f} | {comp:.1f} | {frames} | "
                     f"{'yes' if rec else 'no'} |")
    out = Path(args.out_dir) / f"compile-step-{stamp:%Y-%m-%d-%H%M}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
