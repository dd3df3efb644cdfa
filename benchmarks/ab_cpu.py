"""Before/after A/B of the fused CPU kernels through the public API (fwd+bwd, 2 threads): two
source trees with their own compiled fused_losses._C, called in alternating subprocesses (3
rounds; each: 3 warm-up steps, 15 timed steps, min and median). On a VM whose speed drifts by 30%
from minute to minute, alternating the two builds is what makes the ratio meaningful.

    git worktree add /tmp/before <commit> && (cd /tmp/before && FUSED_LOSSES_BUILD_CUDA=0 \
        ../path/to/.venv/bin/python setup.py --quiet build_ext --inplace)
    BEFORE=/tmp/before AFTER=$PWD .venv/bin/python benchmarks/ab_cpu.py [case ...]

Prints a Markdown table: min and median of the three rounds' values (the median column takes
the middle round)."""
import os, subprocess, sys, json
CODE = r'''
import time, json, sys, torch
import fused_losses as fl
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
case = sys.argv[1]
if case in ("focal_80",):
    x = (torch.randn(262144, 80, generator=g) * 2).requires_grad_(); t = torch.randint(0, 80, (262144,), generator=g)
    f = lambda: fl.focal(x, t, gamma=2.0, backend="cpu")
elif case.startswith("sigmoid"):
    x = (torch.randn(262144, 80, generator=g) * 2 - 3).requires_grad_()
    u = torch.rand(262144, generator=g); lab = torch.randint(0, 80, (262144,), generator=g)
    lab[u > 0.02] = 80; lab[u > 0.92] = -1
    if case == "sigmoid_labels":
        f = lambda: fl.sigmoid_focal(x, lab, alpha=0.25, gamma=2.0, ignore_index=-1, reduction="sum", backend="cpu")
    elif case == "sigmoid_float":
        tf = torch.nn.functional.one_hot(torch.where(lab < 0, 80, lab), 81)[:, :80].float()
        f = lambda: fl.sigmoid_focal(x, tf, alpha=0.25, gamma=2.0, reduction="sum", backend="cpu")
    else:
        w = (lab != -1).float(); lab2 = torch.where(lab == -1, 80, lab); n = (lab2 < 80).sum().float()
        f = lambda: fl.sigmoid_focal(x, lab2, alpha=0.25, gamma=2.0, reduction="mean", weight=w, avg_factor=n, backend="cpu")
else:
    x = (torch.randn(4, 19, 128, 256, generator=g) * 2).requires_grad_()
    t = torch.randint(0, 19, (4, 128, 256), generator=g); t[torch.rand(t.shape, generator=g) < 0.1] = 255
    if case == "seg_focal":
        f = lambda: fl.focal(x, t, gamma=2.0, ignore_index=255, backend="cpu")
    elif case == "seg_ohem":
        f = lambda: fl.ohem(x, t, thresh=0.7, min_kept=25000, ignore_index=255, backend="cpu")
    else:
        f = lambda: fl.ghmc(x, t, bins=10, use_sigmoid=False, ignore_index=255, backend="cpu")
def step():
    torch.autograd.grad(f(), x)
for _ in range(3): step()
ts = []
for _ in range(15):
    a = time.perf_counter(); step(); ts.append(time.perf_counter() - a)
ts.sort(); print(json.dumps([ts[0] * 1e3, ts[len(ts) // 2] * 1e3]))
'''
trees = {"before": os.environ["BEFORE"], "after": os.environ.get("AFTER", os.getcwd())}
cases = sys.argv[1:] or ["focal_80", "sigmoid_labels", "sigmoid_float", "sigmoid_weighted", "seg_focal", "seg_ohem", "seg_ghmc"]
print("| case | before min ms | after min ms | min ratio | before median ms | after median ms | median ratio |")
print("|---|---:|---:|---:|---:|---:|---:|")
for case in cases:
    res = {k: [] for k in trees}
    for _ in range(3):
        for k, tree in trees.items():
            out = subprocess.run([sys.executable, "-c", CODE, case], env=dict(os.environ, PYTHONPATH=tree),
                                 capture_output=True, text=True, cwd="/tmp")
            if out.returncode:
                print(out.stderr[-2000:]); sys.exit(1)
            res[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    b = min(m for m, _ in res["before"]); a = min(m for m, _ in res["after"])
    bm = sorted(md for _, md in res["before"])[1]; am = sorted(md for _, md in res["after"])[1]
    print(f"| {case} | {b:.1f} | {a:.1f} | {b / a:.2f}x | {bm:.1f} | {am:.1f} | {bm / am:.2f}x |", flush=True)
