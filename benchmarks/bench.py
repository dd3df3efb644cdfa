"""fused_losses benchmark: every available fused backend side by side with the eager reference,
torch.compile(reference) and peers, on workload-shaped cases.

    python -m benchmarks.bench --size small                  # CPU, a few minutes
    python -m benchmarks.bench --size large --device cuda    # GPU (benchmarks/gpu_suite.sh runs this)
    python -m benchmarks.bench --suite cpu --threads 2       # the CPU-kernel issues' six cases
    python -m benchmarks.bench --cases retinanet_labels --providers eager,compile --dtype float32

Providers (``--providers``, comma separated; default: all that apply):
  fused-cuda, fused-triton, fused-cpu  every fused_losses backend that fl.backends() reports
                available, called through the public API (validation included: what a user pays).
                Triton on CPU tensors (TRITON_INTERPRET=1) is a correctness tool and never timed.
  eager         fused_losses.reference.<loss> (plain PyTorch autograd; the validated keyword
                arguments are computed once, outside the timed region).
  compile       torch.compile(reference.<loss>, fullgraph=True, dynamic=False), compiled once per
                case (torch._dynamo.reset() between cases) and warmed up before timing.
  torchvision   torchvision.ops.sigmoid_focal_loss (sigmoid cases). With integer labels the timed
                call also builds the one-hot target and the ignore mask, as its user must.
  cross_entropy F.cross_entropy (softmax cases): the speed-of-light of a fused softmax loss. It
                computes the same loss only in the gamma=0 case (cityscapes_ce); elsewhere it
                does less work and is a lower bound, not a competitor.

Per case x dtype x provider, in two modes: 'fwd' (the training forward: logits require grad, the
graph is built and dropped) and 'fwdbwd' (forward + torch.autograd.grad of the scalar loss).
  time      median after warm-up. CPU: time.perf_counter per call; the calls of all providers of a
            case are interleaved in 5 rounds so load changes on a shared machine hit them alike;
            torch.set_num_threads fixed (recorded; default 1: on the shared 2-core development machine, at load ~5, eager
            segmentation focal fwd+bwd took a median 24 ms with 1 thread and 420 ms with 2, the
            threads waiting on each other's preemption; pass --threads N on a quiet machine). CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls;
            CUDA-event loop if Triton is missing).
  memory    peak extra memory of one call. CUDA: torch.cuda.max_memory_allocated() minus the
            allocated bytes before the call. CPU: the process's resident-set high-water mark
            (VmHWM, reset through /proc/self/clear_refs) minus VmRSS before the call, with glibc's
            mmap threshold pinned at 64 KiB so freed tensors leave the resident set; it counts
            every allocation (torch or not) that was touched, misses small (< 64 KiB) heap reuse.
  bandwidth the floor of bytes any implementation must move (each input read once, and for
            fwdbwd each gradient written once: 2 x N x C x sizeof(dtype) plus targets) over the
            time, and that as a percentage of a measured copy (bytes read + written by a large
            same-device tensor copy, measured once per run).
  ratios    speedup_vs_eager = t_eager / t, speedup_vs_compile = t_compile / t (> 1: faster).
  check     rel_err_vs_eager: max over loss and gradients of ||x - x_eager|| / ||x_eager|| in
            float64, so a fast wrong result shows in the table.

Outputs (``--out-dir``, default benchmarks/results/): <stem>.csv (rows appended, one per
case x dtype x provider x mode, with date, device, torch version, threads and git commit),
<stem>.md (the table, also printed last), <stem>.png (time and memory by provider). The stem
is <size>-<device>-<date>, or cpu-<date> for --suite cpu; the .md and .png add the run's UTC start
time (-<HHMM>), the day's CSV collects every run.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as dt
import gc
import inspect
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fused_losses as fl
from fused_losses import _backends, _validate, reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

FUSED_BACKENDS = ("cuda", "triton", "cpu")
PROVIDERS = tuple(f"fused-{b}" for b in FUSED_BACKENDS) + ("compile", "eager", "torchvision", "cross_entropy")
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}

CSV_COLUMNS = [
    "run_id", "date", "command", "git_commit", "device", "device_name", "torch", "triton", "torchvision",
    "threads", "loadavg_1m", "size", "case", "workload", "loss", "shape", "dtype", "provider", "mode",
    "ms_median", "ms_p25", "ms_p75", "ms_min", "repeats", "timer", "peak_extra_mb", "mem_method",
    "floor_bytes", "gbps", "copy_gbps", "pct_copy_bw", "speedup_vs_eager", "speedup_vs_compile",
    "compile_s", "rel_err_vs_eager", "note", "isa", "fused_bytes", "ms_1thread", "thread_scaling",
]


# ============================================================================================
# Cases
# ============================================================================================
@dataclass
class Inputs:
    args: tuple               # positional tensors of the loss: (logits, target[, features])
    kwargs: dict              # keyword arguments of the public API (what a user writes)
    grad_inputs: tuple        # tensors that require grad (gradients are what fwdbwd returns)
    floor_fwd: int            # bytes: each input read once
    floor_fwdbwd: int         # floor_fwd + each gradient written once


@dataclass
class Case:
    name: str
    loss: str                 # fused_losses function name
    workload: str
    shapes: dict              # size ('small' | 'large' | 'cpu') -> shape tuple
    build: Callable           # (shape, device, dtype, generator) -> Inputs
    peers: tuple = ()         # 'torchvision' and/or 'cross_entropy'
    ce_same_function: bool = False   # F.cross_entropy computes exactly this loss (gamma=0)
    fused_extra_passes: int = 0      # logits-sized reads/writes of the fused CPU kernels beyond the floor


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fused_bytes(case: "Case", inp: Inputs) -> int:
    """Bytes the fused CPU kernels are designed to move in fwd+bwd: the floor plus their extra
    logits-sized passes (OHEM: a second read of the logits and targets after the selection;
    float32 softmax GHM-C: the p - onehot buffer written in the softmax pass and read back when
    the bins' weights scale it)."""
    x, target = inp.args[0], inp.args[1]
    return inp.floor_fwdbwd + case.fused_extra_passes * _nbytes(x, target)


def _randn(shape, device, dtype, gen, scale=2.0, shift=0.0):
    x = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(scale).add_(shift)
    return x.to(dtype).requires_grad_(True)


def _detection_labels(n, c, device, gen, ignore_index=None, pos=0.02, ignored=0.08):
    """Anchor labels as an assigner makes them: ~2% positives in [0, C), ~8% ignored (IoU in the
    grey zone), the rest background (label C, mmdet convention)."""
    u = torch.rand(n, device=device, generator=gen)
    labels = torch.full((n,), c, device=device, dtype=torch.int64)
    positive = u < pos
    labels[positive] = torch.randint(0, c, (int(positive.sum()),), device=device, generator=gen)
    if ignore_index is not None:
        labels[(u >= pos) & (u < pos + ignored)] = ignore_index
    return labels


def _sigmoid_case(float_targets: bool):
    def build(shape, device, dtype, gen):
        n, c = shape
        x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-3.0)  # detector logits lean negative
        if float_targets:
            labels = _detection_labels(n, c, device, gen)
            target = F.one_hot(labels, c + 1)[:, :c].to(dtype)
            kwargs = dict(alpha=0.25, gamma=2.0, reduction="sum")
        else:
            target = _detection_labels(n, c, device, gen, ignore_index=-1)
            kwargs = dict(alpha=0.25, gamma=2.0, ignore_index=-1, reduction="sum")
        floor = _nbytes(x, target)
        return Inputs((x, target), kwargs, (x,), floor, floor + _nbytes(x))
    return build


def _weighted_retinanet_case(shape, device, dtype, gen):
    """mmdet's RetinaNet head as it calls the loss: integer labels (ignored anchors get label C and
    label_weight 0), per-anchor label_weights (N,), 'mean' with avg_factor = num_pos as a 0-dim
    device tensor (computed by the assigner, outside the timed call): sum(w * loss) / num_pos."""
    n, c = shape
    x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-3.0)
    labels = _detection_labels(n, c, device, gen, ignore_index=-1)
    weight = (labels != -1).to(torch.float32)
    labels = torch.where(labels == -1, c, labels)
    num_pos = (labels < c).sum().to(torch.float32).clamp(min=1.0)
    kwargs = dict(alpha=0.25, gamma=2.0, reduction="mean", weight=weight, avg_factor=num_pos)
    floor = _nbytes(x, labels, weight)
    return Inputs((x, labels), kwargs, (x,), floor, floor + _nbytes(x))


def _segmentation_target(b, c, h, w, device, gen, ignore=255, ignored=0.1):
    t = torch.randint(0, c, (b, h, w), device=device, generator=gen)
    t[torch.rand((b, h, w), device=device, generator=gen) < ignored] = ignore
    return t


def _segmentation_case(loss: str, **kwargs):
    def build(shape, device, dtype, gen):
        b, c, h, w = shape
        x = _randn((b, c, h, w), device, dtype, gen)
        t = _segmentation_target(b, c, h, w, device, gen)
        kw = dict(kwargs)
        if loss == "ohem":  # mmseg OHEMPixelSampler(thresh=0.7, min_kept=100000) on 512 x 1024 crops
            kw["min_kept"] = max(1, round(100000 * h * w / (512 * 1024)))
        floor = _nbytes(x, t)
        return Inputs((x, t), kw, (x,), floor, floor + _nbytes(x))
    return build


def _classify_case(**kwargs):
    """(N, C) rows with uniform class indices and the given focal keyword arguments."""
    def build(shape, device, dtype, gen):
        n, c = shape
        x = _randn((n, c), device, dtype, gen)
        t = torch.randint(0, c, (n,), device=device, generator=gen)
        floor = _nbytes(x, t)
        return Inputs((x, t), dict(kwargs), (x,), floor, floor + _nbytes(x))
    return build


def _longtail_counts(c: int) -> torch.Tensor:
    """Per-class training counts of a long-tailed dataset (Zipf, head 1280 images, tail 2)."""
    k = torch.arange(c, dtype=torch.float64)
    return torch.clamp(torch.round(1280.0 * (k + 1) ** -0.9), min=2)


def _longtail_case(loss: str):
    def build(shape, device, dtype, gen):
        n, c = shape
        counts = _longtail_counts(c)
        x = _randn((n, c), device, dtype, gen)
        t = torch.multinomial(counts.to(device=device, dtype=torch.float32), n, replacement=True, generator=gen)
        if loss == "focal":  # class-balanced focal (Cui et al. 2019): per-class alpha from effective numbers
            kwargs = dict(gamma=2.0, alpha=fl.class_weights(counts, "effective").to(device), reduction="mean")
            floor = _nbytes(x, t)
            return Inputs((x, t), kwargs, (x,), floor, floor + _nbytes(x))
        # IB: per-sample feature norms from the backbone, which require grad like the logits
        f = torch.rand(n, device=device, generator=gen).mul_(10).add_(1).to(dtype).requires_grad_(True)
        kwargs = dict(alpha=1000.0, reduction="mean")
        floor = _nbytes(x, t, f)
        return Inputs((x, t, f), kwargs, (x, f), floor, floor + _nbytes(x, f))
    return build


_SEG_SMALL, _SEG_LARGE = (2, 19, 128, 256), (8, 19, 512, 1024)

CASES = [
    Case("retinanet_labels", "sigmoid_focal", "RetinaNet head: anchors x 80 COCO classes, integer labels "
         "(2% positive, 8% ignored, rest background), reduction='sum' (the user divides by num_pos)", {"small": (32768, 80), "large": (1048576, 80),
         "cpu": (262144, 80)}, _sigmoid_case(False), peers=("torchvision",)),
    Case("retinanet_float", "sigmoid_focal", "RetinaNet head: anchors x 80, float one-hot targets "
         "(torchvision semantics), reduction='sum'", {"small": (32768, 80), "large": (1048576, 80), "cpu": (262144, 80)},
         _sigmoid_case(True), peers=("torchvision",)),
    Case("retinanet_weighted", "sigmoid_focal", "RetinaNet head as mmdet calls it: anchors x 80, integer "
         "labels, per-anchor label_weights (0 on the 8% ignored anchors), 'mean' with avg_factor=num_pos (a 0-dim "
         "tensor): compare with retinanet_labels (same work plus one weight per row)",
         {"small": (32768, 80), "large": (1048576, 80), "cpu": (262144, 80)}, _weighted_retinanet_case,
         peers=("torchvision",)),
    Case("cityscapes_focal", "focal", "Cityscapes-like segmentation: softmax focal gamma=2, 19 classes, "
         "ignore 255 (10% of pixels), mean", {"small": _SEG_SMALL, "large": _SEG_LARGE, "cpu": (4, 19, 128, 256)},
         _segmentation_case("focal", gamma=2.0, ignore_index=255), peers=("cross_entropy",)),
    Case("classify_focal_80", "focal", "softmax focal gamma=2 on (N, 80) rows, mean (the CPU-kernel issue's "
         "focal shape; uniform targets, no alpha)", {"cpu": (262144, 80)}, _classify_case(gamma=2.0, reduction="mean"),
         peers=("cross_entropy",)),
    Case("lvis_labels", "sigmoid_focal", "LVIS-like detection head: anchors x 1203 classes, integer labels, "
         "reduction='sum'", {"small": (8192, 1203), "large": (262144, 1203)}, _sigmoid_case(False), peers=("torchvision",)),
    Case("cityscapes_ce", "focal", "the segmentation case at gamma=0 (= cross entropy): F.cross_entropy "
         "computes the same loss here", {"small": _SEG_SMALL, "large": _SEG_LARGE},
         _segmentation_case("focal", gamma=0.0, ignore_index=255), peers=("cross_entropy",), ce_same_function=True),
    Case("longtail_focal_1000", "focal", "ImageNet-LT-like classification: batch 256 x 1000, class-balanced "
         "focal (per-class alpha), mean", {"small": (256, 1000), "large": (256, 1000)}, _longtail_case("focal"),
         peers=("cross_entropy",)),
    Case("longtail_focal_8142", "focal", "iNaturalist-2018-like classification: batch 256 x 8142, "
         "class-balanced focal, mean", {"small": (256, 8142), "large": (256, 8142)}, _longtail_case("focal"),
         peers=("cross_entropy",)),
    Case("longtail_ib_1000", "ib", "influence-balanced loss, batch 256 x 1000, feature norms require grad",
         {"small": (256, 1000), "large": (256, 1000)}, _longtail_case("ib"), peers=("cross_entropy",)),
    Case("longtail_ib_8142", "ib", "influence-balanced loss, batch 256 x 8142",
         {"small": (256, 8142), "large": (256, 8142)}, _longtail_case("ib"), peers=("cross_entropy",)),
    Case("cityscapes_ohem", "ohem", "OHEM on the segmentation case: mmseg OHEMPixelSampler thresh=0.7, "
         "min_kept=100000 per 512x1024 image (scaled by pixels: 25000 in all for the cpu shape), ignore 255",
         {"small": _SEG_SMALL, "large": _SEG_LARGE, "cpu": (4, 19, 128, 256)},
         _segmentation_case("ohem", thresh=0.7, ignore_index=255), peers=("cross_entropy",), fused_extra_passes=1),
    Case("cityscapes_ghmc", "ghmc", "GHM-C on the segmentation case: softmax (use_sigmoid=False), 10 bins, "
         "ignore 255", {"small": _SEG_SMALL, "large": _SEG_LARGE, "cpu": (4, 19, 128, 256)},
         _segmentation_case("ghmc", bins=10, use_sigmoid=False, ignore_index=255), peers=("cross_entropy",),
         fused_extra_passes=2),
]


# ---- quality_focal / varifocal / asymmetric (#24) ----
def _gfl_qfl_case(shape, device, dtype, gen):
    """mmdet's GFL head as it calls QualityFocalLoss: (label, score) targets (2% positive anchors
    with their IoU, the rest background C), per-anchor label_weights, 'mean' with avg_factor =
    num_pos (a 0-dim device tensor made outside the timed call)."""
    n, c = shape
    x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-3.0)
    labels = _detection_labels(n, c, device, gen)
    score = torch.where(labels < c, torch.rand(n, device=device, generator=gen), torch.zeros((), device=device))
    weight = torch.ones(n, device=device)
    num_pos = (labels < c).sum().to(torch.float32).clamp(min=1.0)
    kwargs = dict(score=score, weight=weight, reduction="mean", avg_factor=num_pos)
    floor = _nbytes(x, labels, score, weight)
    return Inputs((x, labels), kwargs, (x,), floor, floor + _nbytes(x))


def _vfl_dense_case(shape, device, dtype, gen):
    """mmdet's VFNet head as it calls VarifocalLoss: a dense (N, C) IoU-aware target (the IoU at
    each positive anchor's class, 0 elsewhere), 'mean' with avg_factor = num_pos."""
    n, c = shape
    x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-3.0)
    labels = _detection_labels(n, c, device, gen)
    iou = torch.rand(n, device=device, generator=gen)
    target = (F.one_hot(labels, c + 1)[:, :c].to(torch.float32) * iou[:, None]).to(dtype)
    num_pos = (labels < c).sum().to(torch.float32).clamp(min=1.0)
    kwargs = dict(reduction="mean", avg_factor=num_pos)
    floor = _nbytes(x, target)
    return Inputs((x, target), kwargs, (x,), floor, floor + _nbytes(x))


def _asl_case(shape, device, dtype, gen):
    """A multi-label classifier on OpenImages-sized labels: multi-hot targets (~0.2% positive, about
    19 labels per image of 9605), timm's AsymmetricLossMultiLabel defaults, reduction 'sum'."""
    n, c = shape
    x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-4.0)
    target = (torch.rand((n, c), device=device, generator=gen) < 0.002).to(dtype)
    floor = _nbytes(x, target)
    return Inputs((x, target), dict(reduction="sum"), (x,), floor, floor + _nbytes(x))


CASES += [
    Case("gfl_qfl", "quality_focal", "GFL head (mmdet): 8 images x 100k anchors x 80 classes, (label, score) "
         "targets (2% positive), label_weights, mean / num_pos", {"small": (32768, 80), "large": (800000, 80),
         "cpu": (800000, 80)}, _gfl_qfl_case),
    Case("vfl_dense", "varifocal", "VFNet head (mmdet): 8 images x 100k anchors x 80 classes, dense IoU-aware "
         "target, mean / num_pos", {"small": (32768, 80), "large": (800000, 80), "cpu": (800000, 80)},
         _vfl_dense_case),
    Case("asl_openimages", "asymmetric", "multi-label classifier, batch 256 x 9605 OpenImages labels, "
         "multi-hot (0.2%), timm defaults, sum", {"small": (64, 9605), "large": (256, 9605), "cpu": (256, 9605)},
         _asl_case),
]
# ---- distribution focal / Poly-1 (#24) ----
def _dfl_case(shape, device, dtype, gen):
    """GFL's box branch as mmdet's GFLHead calls DFL: (positives x 4 sides, reg_max + 1 bins) logits,
    float distances in [0, reg_max - 0.01] (bbox2distance), per-side weight = the positive's quality
    score repeated over its 4 sides, 'mean' with avg_factor=4.0."""
    rows, bins = shape
    x = _randn(shape, device, dtype, gen)
    t = torch.rand(rows, device=device, generator=gen).mul_(bins - 1 - 0.01)
    w = torch.rand(-(-rows // 4), device=device, generator=gen).repeat_interleave(4)[:rows].contiguous()
    floor = _nbytes(x, t, w)
    return Inputs((x, t), dict(weight=w, reduction="mean", avg_factor=4.0), (x,), floor, floor + _nbytes(x))


CASES += [
    Case("gfl_dfl", "distribution_focal", "GFL box branch: DFL over 800k positives x 4 sides x 17 bins "
         "(3.2M rows of 17, as mmdet's GFLHead passes them), per-side quality weights, mean with avg_factor=4.0",
         {"small": (400000, 17), "large": (3200000, 17), "cpu": (3200000, 17)}, _dfl_case),
    Case("classify_poly1_80", "focal", "Poly-1 focal: classify_focal_80 (softmax focal gamma=2 on (N, 80) rows, "
         "mean) with epsilon=1", {"small": (32768, 80), "large": (262144, 80), "cpu": (262144, 80)},
         _classify_case(gamma=2.0, reduction="mean", epsilon=1.0), peers=("cross_entropy",)),
    Case("retinanet_poly1_labels", "sigmoid_focal", "Poly-1 sigmoid focal: retinanet_labels with epsilon=1",
         {"small": (32768, 80), "large": (1048576, 80), "cpu": (262144, 80)},
         lambda shape, device, dtype, gen: _poly1(_sigmoid_case(False)(shape, device, dtype, gen)),
         peers=("torchvision",)),
]


def _poly1(inp: Inputs) -> Inputs:
    inp.kwargs["epsilon"] = 1.0
    return inp


CASES_BY_NAME = {c.name: c for c in CASES}

# --suite cpu: exactly the CPU-kernel issues' cases (focal 262144 x 80 fp32 mean; sigmoid_focal 262144 x 80
# with float targets and with integer labels (8% ignored), sum; segmentation 4 x 19 x 128 x 256 ignore 255:
# focal, OHEM thresh 0.7 min_kept 25000, softmax GHM-C 10 bins), fwd+bwd, cpu backend vs eager reference vs
# torch.compile(reference), and the fused and compiled fwd+bwd also at 1 thread (thread scaling).
SUITES = {
    "cpu": dict(size="cpu", device="cpu", dtypes=["float32"],
                cases=["classify_focal_80", "retinanet_float", "retinanet_labels", "retinanet_weighted",
                       "cityscapes_focal",
                       "cityscapes_ohem", "cityscapes_ghmc"],
                providers=["fused-cpu", "compile", "eager"], scaling=True),
}
# ---- quality_focal / varifocal / asymmetric (#24) ----
SUITES["detector-sigmoid"] = dict(size="cpu", device="cpu", dtypes=["float32"],
                                  cases=["gfl_qfl", "vfl_dense", "asl_openimages"],
                                  providers=["fused-cpu", "compile", "eager"], scaling=False)
# distribution focal / Poly-1 (#24): the DFL case and the Poly-1 focal cases, fused cpu vs eager vs compile
SUITES["detector-dfl"] = dict(size="cpu", device="cpu", dtypes=["float32"],
                              cases=["gfl_dfl", "classify_poly1_80", "retinanet_poly1_labels"],
                              providers=["fused-cpu", "compile", "eager"], scaling=False)


# ============================================================================================
# Providers
# ============================================================================================
class Skip(Exception):
    """A provider that does not apply (reason in the message); listed under the table unless
    quiet (a peer that does not apply to this loss, a backend the header already reports)."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


def _reference_kwargs(loss: str, inp: Inputs) -> dict:
    """The validated, normalised keyword arguments the reference (and every backend) receives."""
    sig = inspect.signature(getattr(fl, loss))
    bound = sig.bind(*inp.args, **inp.kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("backend", None)
    names = ("logits", "target", "features") + (STATE_ARGS if loss in STATEFUL_LOSSES else ())  # #25: the state
    tensors = [args.pop(name) for name in names if name in args]
    avg_factor = args.pop("avg_factor", None)
    kwargs = getattr(_validate, f"{loss}_args")(*tensors, **args)
    if avg_factor is not None:  # applied by _reference_fn, as the functional layer does: 'sum' / avg_factor
        kwargs.update(reduction="sum", avg_factor=avg_factor)
    return kwargs


def _reference_fn(loss: str) -> Callable:
    """reference.<loss>, taking _reference_kwargs's avg_factor (divides its 'sum' by it)."""
    fn = _backends.get("reference").losses[loss]  # Poly-1's epsilon: the reference backend's routing (#24)

    def with_avg_factor(*args, avg_factor=None, **kwargs):
        out = fn(*args, **kwargs)
        return out if avg_factor is None else out / avg_factor
    return with_avg_factor


@dataclass
class Provider:
    name: str
    fn: Callable[[], torch.Tensor]   # returns the scalar loss
    compile_s: Optional[float] = None
    note: str = ""


def _torchvision_fn(inp: Inputs, c: int):
    from torchvision.ops import sigmoid_focal_loss
    x, target = inp.args
    alpha, gamma = inp.kwargs.get("alpha", 0.25), inp.kwargs.get("gamma", 2.0)
    if target.is_floating_point():
        return lambda: sigmoid_focal_loss(x, target, alpha=alpha, gamma=gamma, reduction="sum")
    ignore = inp.kwargs.get("ignore_index", -100)
    weight, avg_factor = inp.kwargs.get("weight"), inp.kwargs.get("avg_factor")

    def with_labels():  # what a torchvision user writes for mmdet-style labels: one-hot + ignore mask
        valid = target != ignore
        onehot = F.one_hot(torch.where(valid, target, c), c + 1)[..., :c].to(x.dtype)
        loss = sigmoid_focal_loss(x, onehot, alpha=alpha, gamma=gamma, reduction="none")
        if weight is not None:  # label_weights and num_pos: reduction='none', multiply, sum, divide
            return (loss * (valid.to(weight.dtype) * weight)[..., None]).sum() / avg_factor
        return (loss * valid[..., None]).sum()
    return with_labels


def make_provider(name: str, case: Case, inp: Inputs, ref_kwargs: dict, device: torch.device,
                  own_state: bool = False) -> Provider:
    if case.loss in STATEFUL_LOSSES and not own_state:  # ---- seesaw / eqlv2 (#25): a state per provider
        return stateful_provider(name, case, inp, ref_kwargs, device)
    x = inp.args[0]
    ref_fn = _reference_fn(case.loss)
    if name.startswith("fused-"):
        backend = name[len("fused-"):]
        status = fl.backends()[backend]
        if not status.available:
            raise Skip(f"backend {backend!r} unavailable: {status.reason}", quiet=True)
        if backend == "triton" and device.type != "cuda":
            raise Skip("Triton on CPU tensors runs in the interpreter (a correctness tool), not timed")
        api = getattr(fl, case.loss)
        fn = lambda: api(*inp.args, **inp.kwargs, backend=backend)  # noqa: E731
        try:
            fn()
        except RuntimeError as exc:
            if "cannot run" in str(exc) or "not available" in str(exc):
                raise Skip(str(exc)) from None
            raise
        return Provider(name, fn)
    if name == "eager":
        return Provider(name, lambda: ref_fn(*inp.args, **ref_kwargs))
    if name == "compile":
        torch._dynamo.reset()
        note = ""
        compiled = torch.compile(ref_fn, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        try:
            _fwdbwd(lambda: compiled(*inp.args, **ref_kwargs), inp)()
        except Exception as exc:  # noqa: BLE001 - a graph break under fullgraph: fall back, say so
            torch._dynamo.reset()
            compiled = torch.compile(ref_fn, fullgraph=False, dynamic=False)
            _fwdbwd(lambda: compiled(*inp.args, **ref_kwargs), inp)()
            note = f"fullgraph failed ({type(exc).__name__}); compiled with graph breaks"
        _sync(device)
        return Provider(name, lambda: compiled(*inp.args, **ref_kwargs), time.perf_counter() - t0, note)
    if name == "torchvision":
        if "torchvision" not in case.peers:
            raise Skip("torchvision applies to sigmoid cases only", quiet=True)
        return Provider(name, _torchvision_fn(inp, x.shape[-1]), note="one-hot + ignore mask inside the timed call"
                        if not inp.args[1].is_floating_point() else "")
    if name == "cross_entropy":
        if "cross_entropy" not in case.peers:
            raise Skip("F.cross_entropy applies to softmax cases only", quiet=True)
        target = inp.args[1]
        ignore = ref_kwargs.get("ignore_index", -100)
        return Provider(name, lambda: F.cross_entropy(x, target, ignore_index=ignore, reduction="mean"),
                        note="" if case.ce_same_function else "speed-of-light: plain CE, less work than this loss")
    raise ValueError(f"unknown provider {name!r}")


def _fwdbwd(fn, inp: Inputs):
    return lambda: torch.autograd.grad(fn(), inp.grad_inputs, allow_unused=True)


# ============================================================================================
# Measurement
# ============================================================================================
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values, q):
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def warm_cpu(fn, warmup_s: float) -> float:
    """Call fn at least twice and for about warmup_s; returns the duration of the last call (s)."""
    t_end = time.perf_counter() + warmup_s
    n_warm, t_last = 0, 0.0
    while n_warm < 2 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        t_last = time.perf_counter() - t0
        n_warm += 1
        if n_warm >= 2 and t_last > warmup_s:
            break
    return t_last


def cpu_repeats(t_call: float, rep_s: float) -> int:
    return int(min(1000, max(5, math.ceil(rep_s / max(t_call, 1e-6)))))


def time_calls(fn, n: int) -> list:
    """n calls of fn, each timed with perf_counter (ms), with the garbage collector held off."""
    times = []
    gc.collect(0)
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return times


def _stats(times: list):
    return statistics.median(times), _quantile(times, 0.25), _quantile(times, 0.75), min(times)


def time_cpu(fn, warmup_s: float, rep_s: float, repeats: Optional[int]):
    """Median/p25/p75/min in ms of fn() timed one call at a time with perf_counter."""
    n = repeats or cpu_repeats(warm_cpu(fn, warmup_s), rep_s)
    return (*_stats(time_calls(fn, n)), n, "perf_counter")


def time_cuda(fn, warmup_s: float, rep_s: float, repeats: Optional[int]):
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and repeats is None:
        med, p25, p75, low = do_bench(fn, warmup=int(warmup_s * 1e3), rep=int(rep_s * 1e3),
                                      quantiles=[0.5, 0.25, 0.75, 0.0])
        return med, p25, p75, low, "", "triton.testing.do_bench"
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    n = repeats or 50
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), _quantile(times, 0.25), _quantile(times, 0.75), min(times), n, "cuda events"


class RssMeter:
    """Peak extra resident memory of one call on CPU (see the module docstring)."""

    method = ("process RSS high-water delta (VmHWM after - VmRSS before; glibc mmap threshold 64 KiB and "
              "malloc_trim during the measurement so freed memory leaves RSS)")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        """Timing runs with glibc's thresholds fixed at the steady state its dynamic rule reaches
        (mmap 32 MiB, trim 64 MiB) so every timed call sees the same allocator; a memory
        measurement lowers them for its one call and restores them."""
        self.error = None
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self._thresholds(32 << 20, 64 << 20)
            self._reset()
            self._status("VmHWM")
        except (OSError, AttributeError) as exc:
            self.error = f"unavailable: {exc}"

    def _thresholds(self, mmap_bytes: int, trim_bytes: int):
        if not (self.libc.mallopt(self.M_MMAP_THRESHOLD, mmap_bytes) and
                self.libc.mallopt(self.M_TRIM_THRESHOLD, trim_bytes)):
            raise OSError("mallopt refused")

    @staticmethod
    def _reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    def peak_extra(self, fn) -> float:
        if self.error:
            return float("nan")
        gc.collect(0)
        # Freed tensors go back to the OS (munmap) instead of staying resident in the heap, and
        # malloc_trim drops what the heap holds free now, so RSS follows live memory in the call.
        self._thresholds(64 << 10, 128 << 10)
        try:
            self.libc.malloc_trim(0)
            self._reset()
            before = self._status("VmRSS")
            fn()
            return max(0, self._status("VmHWM") - before) / 2 ** 20
        finally:
            self._thresholds(32 << 20, 64 << 20)


def peak_extra_mb(fn, device: torch.device, rss: Optional[RssMeter]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return rss.peak_extra(fn) if rss is not None else float("nan")


def copy_bandwidth_gbps(device: torch.device, warmup_s: float, rep_s: float) -> float:
    """Bytes read + written per second by a large same-device copy (the practical ceiling). On
    CPU the best of three medians: a shared VM's copy speed drifts by 30% between minutes, and a
    slow copy measurement would flatter every "% copy" of the run."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)   # 1 GiB on GPU, 128 MiB on CPU (fp32)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    timer = time_cuda if device.type == "cuda" else time_cpu
    ms = min(timer(lambda: dst.copy_(src), warmup_s, rep_s, None)[0] for _ in range(1 if device.type == "cuda" else 3))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the tensors' device (NaN where ref is NaN: a match)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    mask = ~torch.isnan(ref) & ~(torch.isinf(ref) & (out == ref))
    if bool((torch.isnan(out) != torch.isnan(ref)).any()):
        return float("inf")
    diff = torch.linalg.vector_norm((out - ref)[mask])
    scale = torch.linalg.vector_norm(ref[mask])
    return float(diff / scale) if scale > 0 else float(diff)


def _outputs(fn, inp: Inputs):
    loss = fn()
    grads = torch.autograd.grad(loss, inp.grad_inputs, allow_unused=True)
    return [loss.detach()] + [g for g in grads if g is not None]


# ============================================================================================
# Environment
# ============================================================================================
def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fused_losses", "csrc",
                                "setup.py", "benchmarks/bench.py"], capture_output=True, text=True, timeout=10).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except Exception:  # noqa: BLE001 - no git (e.g. a copied tree on the device machine)
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def cpu_isa() -> str:
    """The CPU's vector instruction sets that matter to the kernels (from /proc/cpuinfo's flags,
    x86 or aarch64) and ATen's own CPU capability (torch.backends.cpu.get_cpu_capability())."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    have = [name for name in ("avx512f", "avx2", "fma", "asimd", "sve") if name in flags]
    if flags and "avx512f" not in flags and "avx2" in flags:
        have.append("no avx512f")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = "n/a"
    return f"{' '.join(have) or platform.machine()}; ATen CPU capability {capability}"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name.split()[0] if name else "cuda").strip("-") or "cuda"


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def _version(dist: str) -> str:
    """Installed version without importing the package (triton and torchvision take seconds)."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "n/a"


# ============================================================================================
# Output: Markdown and plot
# ============================================================================================
def _fmt(v, spec=".3g", empty="") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return empty
    return format(v, spec)


def _iqr_pct(row: dict):
    try:
        return 100.0 * (row["ms_p75"] - row["ms_p25"]) / row["ms_median"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _times(v) -> str:
    text = _fmt(v, ".2f")
    return text + "x" if text else ""


def _order(rows):
    pos = {p: i for i, p in enumerate(PROVIDERS)}
    return sorted(rows, key=lambda r: (r["_dtype_i"], r["_case_i"], pos.get(r["provider"], 99)))


def _mb_moved(row: dict) -> str:
    try:
        return f"{int(row['floor_bytes']) / 1e6:.0f} / {int(row['fused_bytes']) / 1e6:.0f}"
    except (KeyError, TypeError, ValueError):
        return ""


def markdown(rows: list, meta: dict, skipped: list) -> str:
    out = [f"## fused_losses benchmark: {meta['title']}", ""]
    out += [f"- date: {meta['date']} (UTC); wall time of the run: {meta['wall_s']:.0f} s",
            f"- command: `{meta['command']}`",
            f"- device: {meta['device_name']}; threads: {meta['threads']}; torch {meta['torch']}, "
            f"triton {meta['triton']}, torchvision {meta['torchvision']}; git {meta['git_commit']}",
            f"- CPU ISA: {meta['isa']}",
            f"- fused backends: {meta['backends']}",
            f"- measured copy bandwidth (read + write): {meta['copy_gbps']:.1f} GB/s at the start (what % copy uses)"
            + (f", {meta['copy_gbps_end']:.1f} GB/s at the end" if meta.get("copy_gbps_end") else ""),
            f"- 1-minute load average: {meta['load_start']} at the start, {meta['load_end']} at the end "
            f"({os.cpu_count()} logical CPUs; a load above that means other processes competed for the cores "
            "and the times are inflated)",
            f"- time: median after warm-up ({meta['timer']}); memory: {meta['mem_method']}",
            "- fwd = training forward (graph built and dropped; a fused kernel may already compute the gradient "
            "here, in the same pass over the logits, so compare fwd+bwd); fwd+bwd = forward + autograd.grad. "
            "IQR % = (p75 - p25) / median of the fwd+bwd "
            "calls: differences smaller than that are noise. Speedups are t_eager / t and t_compile / t of fwd+bwd "
            "(> 1 is faster). GB/s = the floor bytes (inputs read once, gradients written once: 2 x N x C x "
            "sizeof(dtype) plus targets) over the fwd+bwd time; % copy = that over the measured copy bandwidth, "
            "i.e. the time the floor bytes take at copy speed over the measured time. rel err = max over loss and "
            "gradients of the relative L2 error against the eager reference. MB floor / fused = the floor bytes "
            "and the bytes the fused CPU kernels are designed to move (OHEM reads the logits twice; float32 "
            "softmax GHM-C writes and reads back a logits-sized p - onehot buffer). 1-thread ms / scaling (fused and compile, fwd+bwd, when measured) = the same call with 1 torch "
            "thread, and that time over the time at the run's thread count.",
            ""]
    if meta.get("stopped"):
        out += [f"**Run stopped early: {meta['stopped']}. Only the rows below were measured.**", ""]
    head = ["case", "shape", "dtype", "provider", "fwd ms", "fwd+bwd ms", "IQR %", "vs eager", "vs compile",
            "peak extra MB", "GB/s", "% copy", "rel err", "MB floor / fused", "1-thread ms", "scaling", "note"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["case"], r["dtype"], r["provider"]), {})[r["mode"]] = r
    seen = []
    for r in _order(rows):
        key = (r["case"], r["dtype"], r["provider"])
        if key in seen:
            continue
        seen.append(key)
        fwd, fb = by_key[key].get("fwd", {}), by_key[key].get("fwdbwd", {})
        both = fb or fwd
        out.append("| " + " | ".join([
            r["case"], r["shape"], r["dtype"], r["provider"], _fmt(fwd.get("ms_median"), ".3f", "-"),
            _fmt(fb.get("ms_median"), ".3f", "-"), _fmt(_iqr_pct(fb), ".0f"), _times(fb.get("speedup_vs_eager")),
            _times(fb.get("speedup_vs_compile")),
            _fmt(fb.get("peak_extra_mb"), ".1f"), _fmt(fb.get("gbps"), ".1f"), _fmt(fb.get("pct_copy_bw"), ".1f"),
            _fmt(both.get("rel_err_vs_eager"), ".1e"), _mb_moved(fb), _fmt(fb.get("ms_1thread"), ".3f"),
            _times(fb.get("thread_scaling")), both.get("note", "")]) + " |")
    if skipped:
        out += ["", "Not measured:"]
        out += [f"- {s}" for s in skipped]
    return "\n".join(out) + "\n"


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _order(rows) if r["mode"] == "fwdbwd" and not math.isnan(r["ms_median"])]
    if not rows:
        return
    groups = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    cmap = plt.get_cmap("tab10")
    height = 0.8 / len(providers)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.22 * len(groups) * len(providers)), sharey=True)
    for metric, ax, label in (("ms_median", axes[0], "forward+backward time, ms (log)"),
                              ("peak_extra_mb", axes[1], "peak extra memory, MB (log)")):
        for j, p in enumerate(providers):
            ys, vals = [], []
            for i, g in enumerate(groups):
                for r in rows:
                    if (r["case"], r["dtype"]) == g and r["provider"] == p and r[metric] == r[metric] and r[metric] > 0:
                        ys.append(i + (j - (len(providers) - 1) / 2) * height)
                        vals.append(r[metric])
            ax.barh(ys, vals, height=height, color=cmap(j % 10), label=p)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels([f"{c}\n{d}" for c, d in groups], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================
# Driver
# ============================================================================================
class _Stop(BaseException):
    """Budget reached or SIGTERM: a BaseException, so no `except Exception` on the way swallows it."""


def _on_sigterm(signum, frame):  # timeout(1) sends SIGTERM: finish the files with what was measured
    raise _Stop("SIGTERM")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["small", "large"], default="small")
    p.add_argument("--suite", choices=sorted(SUITES), help="preset: 'cpu' = the CPU-kernel issue's cases "
                   "(fused cpu vs eager vs compile), Markdown to results/cpu-<date>-<HHMM>.md")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="comma list: float32,bfloat16,float16 (default: float32 on "
                   "CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)} or 'fused' "
                   "(default: all)")
    p.add_argument("--cases", default=None, help=f"comma list of {','.join(CASES_BY_NAME)} (default: all with "
                   "a shape for --size)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 1 on CPU, see "
                   "the module docstring; torch's own on CUDA)")
    p.add_argument("--warmup-s", type=float, default=None, help="warm-up seconds per measurement")
    p.add_argument("--rep-s", type=float, default=None, help="timed seconds per measurement")
    p.add_argument("--repeats", type=int, default=None, help="fixed number of timed calls (overrides --rep-s)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many "
                   "seconds and write what was measured")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the CSV, Markdown and PNG go")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--scaling", action="store_true", help="CPU: also time the fused and compiled fwd+bwd with 1 "
                   "thread (thread scaling; on by default for --suite cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the cases as a Markdown table and exit")
    return p.parse_args(argv)


def cases_markdown() -> str:
    lines = ["| case | loss | small | large | --suite cpu | peers | workload |", "|---|---|---|---|---|---|---|"]
    for c in CASES:
        shape = lambda size: "x".join(map(str, c.shapes[size])) if size in c.shapes else "-"  # noqa: E731
        lines.append(f"| {c.name} | {c.loss} | {shape('small')} | {shape('large')} | {shape('cpu')} | "
                     f"{', '.join(c.peers)} | {c.workload} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print(cases_markdown())
        return {}
    t_start = time.perf_counter()
    suite = SUITES.get(args.suite) if args.suite else None
    size = suite["size"] if suite else args.size
    device = torch.device(args.device or (suite["device"] if suite else ("cuda" if torch.cuda.is_available()
                                                                           else "cpu")))
    dtype_names = (args.dtype.split(",") if args.dtype else
                   suite["dtypes"] if suite else (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]))
    dtypes = [DTYPES[d.strip()] for d in dtype_names]
    if args.providers:
        providers = []
        for p in args.providers.split(","):
            p = p.strip()
            providers += [f"fused-{b}" for b in FUSED_BACKENDS] if p == "fused" else [p]
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            raise SystemExit(f"unknown providers {unknown}; choose from {PROVIDERS} or 'fused'")
    else:
        providers = list(suite["providers"]) if suite else list(PROVIDERS)
    if args.cases:
        names = [c.strip() for c in args.cases.split(",")]
        unknown = [n for n in names if n not in CASES_BY_NAME]
        if unknown:
            raise SystemExit(f"unknown cases {unknown}; choose from {list(CASES_BY_NAME)}")
    else:
        names = suite["cases"] if suite else [c.name for c in CASES if size in c.shapes]
    cases = [CASES_BY_NAME[n] for n in names]
    missing = [c.name for c in cases if size not in c.shapes]
    if missing:
        raise SystemExit(f"cases {missing} have no {size!r} shape")
    threads = args.threads or (1 if device.type == "cpu" else None)
    scaling = device.type == "cpu" and (args.scaling or bool(suite and suite.get("scaling"))) and (threads or 1) > 1
    if threads:
        torch.set_num_threads(threads)
    warmup_s = args.warmup_s if args.warmup_s is not None else (0.1 if device.type == "cuda" else 0.2)
    rep_s = args.rep_s if args.rep_s is not None else (0.2 if device.type == "cuda" else 0.5)

    now = dt.datetime.now(dt.timezone.utc)
    date = now.strftime("%Y-%m-%d")
    stem = f"cpu-{date}" if args.suite == "cpu" else f"{size}-{device_slug(device)}-{date}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The CSV of a day collects every run (rows carry their run_id); the table and the plot of a
    # run carry its UTC start time, so a second run on the same day does not overwrite them.
    csv_path = out_dir / f"{stem}.csv"
    md_path, png_path = (out_dir / f"{stem}-{now.strftime('%H%M')}{ext}" for ext in (".md", ".png"))
    status = fl.backends()
    meta = dict(
        run_id=now.strftime("%Y-%m-%dT%H:%M:%SZ"), date=now.strftime("%Y-%m-%d %H:%M"),
        command="python -m benchmarks.bench " + " ".join(argv), git_commit=git_commit(), device=device.type,
        device_name=device_name(device), isa=cpu_isa() if device.type == "cpu" else "n/a (GPU run)",
        torch=torch.__version__, triton=_version("triton"),
        torchvision=_version("torchvision"), threads=torch.get_num_threads(),
        backends="; ".join(f"{n}: {'available' if s.available else 'unavailable (' + s.reason + ')'}"
                           for n, s in status.items() if n != "reference"),
        timer=("triton.testing.do_bench, one provider after another" if device.type == "cuda" else
               "time.perf_counter per call; the providers' calls interleaved in 5 rounds"),
        title=(f"--suite {args.suite}" if args.suite else f"--size {size}") + f" on {device_name(device)}",
    )
    meta["load_start"] = _loadavg()
    rss = RssMeter() if device.type == "cpu" else None
    meta["mem_method"] = ("torch.cuda.max_memory_allocated delta" if device.type == "cuda" else
                          RssMeter.method + (f" ({rss.error})" if rss.error else ""))
    meta["copy_gbps"] = copy_bandwidth_gbps(device, warmup_s, rep_s)

    from tqdm import tqdm
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if hasattr(signal, "SIGTERM") else None
    rows, skipped = [], []
    order = {p: i for i, p in enumerate(PROVIDERS)}
    run_order = sorted(providers, key=lambda p: (p != "eager", order[p]))  # eager first: the check's baseline
    bar = tqdm(total=len(dtypes) * len(cases) * len(run_order), desc="bench", unit="run", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    gen = torch.Generator(device=device)
    try:
        for di, dtype in enumerate(dtypes):
            dname = str(dtype).replace("torch.", "")
            for ci, case in enumerate(cases):
                if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                    meta["stopped"] = f"time budget of {args.budget_s:.0f} s reached"
                    skipped.append(f"{case.name} {dname} and later: time budget reached")
                    raise _Stop("budget")
                shape = case.shapes[size]
                gen.manual_seed(args.seed)
                try:
                    group = _run_group(case, shape, device, dtype, dname, run_order, gen, warmup_s, rep_s,
                                       args.repeats, rss, bar, skipped, scaling=scaling)
                except (_Stop, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. inputs that do not fit: skip the case
                    skipped.append(f"{case.name} {dname}: inputs or reference failed: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}")
                    _after_error(device)
                    bar.update(len(run_order))
                    continue
                for r in group:
                    r.update(_dtype_i=di, _case_i=ci, size=args.suite or size, **{k: meta[k] for k in (
                        "run_id", "command", "git_commit", "device", "device_name", "torch", "triton",
                        "torchvision", "threads", "isa")}, date=meta["run_id"], copy_gbps=meta["copy_gbps"],
                        mem_method=meta["mem_method"])
                    r["loadavg_1m"] = _loadavg()
                    if r["gbps"] == r["gbps"]:
                        r["pct_copy_bw"] = 100.0 * r["gbps"] / meta["copy_gbps"]
                _append_csv(csv_path, group)
                rows += group
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except (_Stop, KeyboardInterrupt) as exc:
        meta.setdefault("stopped", f"interrupted ({type(exc).__name__}: {exc})")
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    meta["load_end"] = _loadavg()
    meta["copy_gbps_end"] = copy_bandwidth_gbps(device, warmup_s, rep_s)
    meta["wall_s"] = time.perf_counter() - t_start
    text = markdown(rows, meta, skipped)
    md_path.write_text(text)
    if not args.no_plot:
        plot(rows, png_path, meta["title"] + f", {meta['threads']} thread(s), {meta['date']} UTC, fwd+bwd")
    print(text)
    print(f"wrote {csv_path} (appended), {md_path}" + ("" if args.no_plot else f", {png_path}"), file=sys.stderr)
    return dict(rows=rows, meta=meta, csv=csv_path, md=md_path, png=None if args.no_plot else png_path,
                skipped=skipped)


CPU_ROUNDS = 5


def _run_group(case, shape, device, dtype, dname, providers, gen, warmup_s, rep_s, repeats, rss, bar, skipped,
               scaling=False):
    """Every provider on one case x dtype; returns the CSV rows with ratios filled in.

    On CPU the timed calls of all providers are interleaved in CPU_ROUNDS rounds (a share of each
    provider's calls per round), so a change of load on a shared machine during the group hits
    every provider alike and the ratios stay fair. On CUDA each provider runs do_bench in turn.
    """
    gc.collect()
    inp = case.build(shape, device, dtype, gen)
    ref_kwargs = _reference_kwargs(case.loss, inp)
    ref_out = _outputs(lambda: _reference_fn(case.loss)(*inp.args, **ref_kwargs), inp)
    shape_s = "x".join(map(str, shape))
    rows, plans = [], []

    def failed(base, exc):
        done = {r["mode"] for r in rows if r["provider"] == base["provider"]}
        rows.extend(dict(base, mode=m, **_empty_metrics(), note=f"error: {type(exc).__name__}: {exc}"[:300])
                    for m in MODES if m not in done)
        plans[:] = [p for p in plans if p["base"]["provider"] != base["provider"]]
        _after_error(device)

    for name in providers:
        bar.set_postfix_str(f"{case.name} {dname} {name}")
        base = dict(case=case.name, workload=case.workload, loss=case.loss, shape=shape_s, dtype=dname,
                    provider=name)
        try:
            prov = make_provider(name, case, inp, ref_kwargs, device)
            err = float("nan")
            if name != "cross_entropy" or case.ce_same_function:
                out = _outputs(prov.fn, inp)
                err = max(rel_err(o, r) for o, r in zip(out, ref_out)) if len(out) == len(ref_out) else float("inf")
                del out
            for mode, fn, floor in (("fwd", prov.fn, inp.floor_fwd), ("fwdbwd", _fwdbwd(prov.fn, inp),
                                                                        inp.floor_fwdbwd)):
                plan = dict(base=base, mode=mode, fn=fn, floor=floor, prov=prov, err=err, samples=[])
                if device.type == "cuda":
                    plan["stats"] = time_cuda(fn, warmup_s, rep_s, repeats)
                else:
                    plan["n"] = repeats or cpu_repeats(warm_cpu(fn, warmup_s), rep_s)
                plans.append(plan)
        except Skip as exc:
            if not exc.quiet:
                skipped.append(f"{case.name} {dname} {name}: {exc}")
        except (_Stop, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken provider must not end the sweep
            failed(base, exc)
        finally:
            bar.update(1)

    if device.type != "cuda":
        rounds = 1 if repeats else CPU_ROUNDS
        for rd in range(rounds):
            for plan in list(plans):
                k = plan["n"] // rounds + (1 if rd < plan["n"] % rounds else 0)
                try:
                    plan["samples"] += time_calls(plan["fn"], k)
                except (_Stop, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001
                    failed(plan["base"], exc)
        for plan in plans:
            plan["stats"] = (*_stats(plan["samples"]), plan["n"], "perf_counter, interleaved" if rounds > 1
                             else "perf_counter")
        if scaling:  # the same fwd+bwd calls with 1 thread, interleaved the same way
            threads = torch.get_num_threads()
            scaled = [p for p in plans if p["mode"] == "fwdbwd" and (p["base"]["provider"].startswith("fused-") or
                                                                     p["base"]["provider"] == "compile")]
            torch.set_num_threads(1)
            try:
                for p in scaled:
                    p["samples_1t"] = []
                    warm_cpu(p["fn"], warmup_s)
                for rd in range(rounds):
                    for p in scaled:
                        k = p["n"] // rounds + (1 if rd < p["n"] % rounds else 0)
                        p["samples_1t"] += time_calls(p["fn"], k)
            finally:
                torch.set_num_threads(threads)

    for plan in plans:
        med, p25, p75, low, n, tname = plan["stats"]
        try:
            mem = peak_extra_mb(plan["fn"], device, rss)
        except (_Stop, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - the time stands without the memory number
            mem = float("nan")
            _after_error(device)
        rows.append(dict(plan["base"], mode=plan["mode"], ms_median=med, ms_p25=p25, ms_p75=p75, ms_min=low,
                         repeats=n, timer=tname, peak_extra_mb=mem, floor_bytes=plan["floor"],
                         gbps=plan["floor"] / (med * 1e-3) / 1e9, pct_copy_bw=float("nan"),
                         speedup_vs_eager=float("nan"), speedup_vs_compile=float("nan"),
                         compile_s=plan["prov"].compile_s, rel_err_vs_eager=plan["err"], note=plan["prov"].note,
                         fused_bytes=fused_bytes(case, inp) if plan["mode"] == "fwdbwd" else plan["floor"],
                         ms_1thread=statistics.median(plan["samples_1t"]) if plan.get("samples_1t") else float("nan"),
                         thread_scaling=(statistics.median(plan["samples_1t"]) / med if plan.get("samples_1t")
                                         else float("nan"))))
    plans.clear()
    for mode in MODES:
        t = {r["provider"]: r["ms_median"] for r in rows if r["mode"] == mode}
        for r in rows:
            if r["mode"] == mode and r["ms_median"] == r["ms_median"]:
                if "eager" in t:
                    r["speedup_vs_eager"] = t["eager"] / r["ms_median"]
                if "compile" in t:
                    r["speedup_vs_compile"] = t["compile"] / r["ms_median"]
    if "compile" in providers:
        torch._dynamo.reset()
    return rows


def _empty_metrics():
    nan = float("nan")
    return dict(ms_median=nan, ms_p25=nan, ms_p75=nan, ms_min=nan, repeats="", timer="", peak_extra_mb=nan, floor_bytes="",
                gbps=nan, pct_copy_bw=nan, speedup_vs_eager=nan, speedup_vs_compile=nan, compile_s="",
                rel_err_vs_eager=nan)


def _after_error(device):
    gc.collect()  # full collection: an exception's traceback can hold tensors in a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _append_csv(path: Path, rows: list) -> None:
    new = not path.exists() or path.stat().st_size == 0
    columns = CSV_COLUMNS
    if not new:  # a file written by an older version keeps its header (columns it lacks are left out)
        with open(path, newline="") as f:
            columns = next(csv.reader(f), None) or CSV_COLUMNS
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})



# ---- seesaw / eqlv2 (#25) ----
# Stateful losses: the state (Seesaw's cum_samples, EQLv2's (3, C) statistics) is the third
# positional argument. Each provider owns a clone and every call (check and timed calls alike)
# starts by copying the case's initial state into it (C or 3 x C floats, < 15 KB: nothing next to
# the N x C pass), so every call computes the same step and the providers stay comparable.
STATEFUL_LOSSES = ("seesaw", "eqlv2")
STATE_ARGS = ("cum_samples", "state")


def stateful_provider(name: str, case: Case, inp: Inputs, ref_kwargs: dict, device: torch.device) -> Provider:
    state0 = getattr(inp, "state0", inp.args[2]).detach().clone()  # the state as built (the check's too)
    state = state0.clone()
    own = Inputs((inp.args[0], inp.args[1], state), inp.kwargs, inp.grad_inputs, inp.floor_fwd, inp.floor_fwdbwd)
    prov = make_provider(name, case, own, ref_kwargs, device, own_state=True)
    step = prov.fn

    def reset_then_step():
        with torch.no_grad():
            state.copy_(state0)
        return step()
    prov.fn = reset_then_step
    return prov


def _lvis_counts(c: int) -> torch.Tensor:
    """Per-class instance counts of an LVIS-like long tail (Zipf, head 50000, tail 1)."""
    k = torch.arange(c, dtype=torch.float64)
    return torch.clamp(torch.round(50000.0 * (k + 1) ** -1.2), min=1)


def _seesaw_lvis_case(shape, device, dtype, gen):
    """mmdet's Mask R-CNN box head on LVIS with SeesawLoss: RoIs x (1203 + 2) (classes, then the
    objectness pair), 25% foreground with long-tailed labels, the rest background (label C);
    cum_samples mid-training (long-tailed counts, background 3x the foreground); 'mean'."""
    n, c = shape
    x = _randn((n, c + 2), device, dtype, gen)
    counts = _lvis_counts(c)
    labels = torch.full((n,), c, device=device, dtype=torch.int64)
    fg = torch.rand(n, device=device, generator=gen) < 0.25
    labels[fg] = torch.multinomial(counts.to(device=device, dtype=torch.float32), int(fg.sum()), replacement=True,
                                   generator=gen)
    cum = torch.cat([counts, counts.sum()[None] * 3]).to(device=device, dtype=torch.float32)
    kwargs = dict(objectness=True, reduction="mean")
    floor = _nbytes(x, labels)
    inp = Inputs((x, labels, cum), kwargs, (x,), floor, floor + _nbytes(x))
    inp.state0 = cum.clone()  # _run_group's reference call updates args[2]: the providers start from this
    return inp


def _eqlv2_lvis_case(shape, device, dtype, gen):
    """A one-stage LVIS head with EQLv2: anchors x 1203 sigmoids, detection labels (2% positive with
    long-tailed classes, 8% ignored, the rest background C); the state after some steps (ratios
    spread around mu, so the weights differ from 1); 'mean' over the rows."""
    n, c = shape
    x = _randn((n, c), device, dtype, gen, scale=2.0, shift=-3.0)
    labels = _detection_labels(n, c, device, gen, ignore_index=-100)
    state = reference.eqlv2_initial_state(c, device=device)
    ratio = torch.rand(c, device=device, generator=gen) * 1.6
    state[1] = 1000.0
    state[0] = ratio * 1000.0
    state[2] = ratio
    kwargs = dict(reduction="mean")
    floor = _nbytes(x, labels)
    inp = Inputs((x, labels, state), kwargs, (x,), floor, floor + _nbytes(x))
    inp.state0 = state.clone()
    return inp


CASES += [
    Case("seesaw_lvis", "seesaw", "Mask R-CNN box head on LVIS with Seesaw (mmdet layout: 1203 classes + the "
         "objectness pair), 8 images x 512 RoIs, 25% foreground, state carried (each call from the same "
         "cum_samples), mean", {"longtail": (8 * 512, 1203), "small": (2 * 512, 1203)}, _seesaw_lvis_case),
    Case("eqlv2_lvis", "eqlv2", "one-stage LVIS head with EQLv2: 100k anchors x 1203 sigmoids (2% positive, 8% "
         "ignored), statistics state (each call from the same state), mean over rows",
         {"longtail": (100000, 1203), "small": (10000, 1203)}, _eqlv2_lvis_case),
]
CASES_BY_NAME.update({c.name: c for c in CASES[-2:]})
SUITES["longtail-detection"] = dict(size="longtail", device="cpu", dtypes=["float32"],
                                    cases=["seesaw_lvis", "eqlv2_lvis"], providers=["fused-cpu", "compile", "eager"])


if __name__ == "__main__":
    main()
