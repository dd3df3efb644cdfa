"""ghmc(process_group=...) and reduce_mean across 2 processes (gloo, CPU tensors).

Each rank takes one half of a batch; with the process group, GHM-C's bin counts (and n_valid)
are all-reduced before the bin weights and the EMA update, so every rank must see the bin weights
and the EMA state of the WHOLE batch: the per-entry losses ('none') and the gradients of the
'sum' of the two ranks, concatenated, equal the float64 reference on the full batch, and both
ranks' states equal the reference's after every step. One spawn (module fixture) serves every
backend; a backend that fails on a rank records the error, reported by its own test case.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

import fused_losses as fl
from fused_losses import distributed
from tests.utils import TOL, assert_rel_close, sigmoid_case, softmax_case

WORLD = 2
BACKENDS = ["reference", "cpu"]
BINS, MOMENTUM, STEPS = 10, 0.75, 3
VARIANTS = ["sigmoid", "softmax"]


def _batch(variant, step, dtype):
    """The full batch of a step (the same on every rank and in the test process) and a weight
    with zeros (invalid entries for GHM-C)."""
    if variant == "sigmoid":
        logits, target = sigmoid_case((24, 5), dtype, kind="labels", ignore_frac=0.1, seed=step)
        weight = (torch.rand(24, generator=torch.Generator().manual_seed(50 + step)) > 0.2).to(dtype)
    else:
        logits, target = softmax_case((24, 4, 3), dtype, ignore_frac=0.1, seed=step)
        weight = (torch.rand(24, 3, generator=torch.Generator().manual_seed(50 + step)) > 0.2).to(dtype)
    return logits, target, weight


def _half(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _steps(backend, variant, dtype, rank=None, group=None):
    """STEPS steps of GHM-C with an EMA state; per step the 'none' loss, the 'mean' loss, the
    gradient of the 'sum' (each call from the same state before the step: one update per step)
    and the state after the step. On a rank: its half of the batch, with the process group."""
    state = torch.zeros(BINS)
    out = []
    for step in range(STEPS):
        logits, target, weight = _batch(variant, step, dtype)
        if rank is not None:
            logits, target, weight = _half(logits, rank), _half(target, rank), _half(weight, rank)
        kw = dict(bins=BINS, momentum=MOMENTUM, state=state, use_sigmoid=variant == "sigmoid", weight=weight,
                  backend=backend, process_group=group)
        before = state.clone()
        res = dict(none=fl.ghmc(logits, target, reduction="none", **kw))
        state.copy_(before)
        res["mean"] = fl.ghmc(logits, target, reduction="mean", **kw)
        state.copy_(before)
        x = logits.clone().requires_grad_(True)
        (res["grad"],) = torch.autograd.grad(fl.ghmc(x, target, reduction="sum", **kw), x)
        res["state"] = state.clone()
        out.append(res)
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {"reduce_mean": distributed.reduce_mean(torch.tensor([rank + 1.0, 4.0 * rank]))}
        group = dist.new_group([0, 1])
        for backend in BACKENDS:
            for variant in VARIANTS:
                try:
                    res[backend, variant] = _steps(backend, variant, torch.float32, rank, group)
                except Exception:  # noqa: BLE001 - reported by the test case of this backend
                    res[backend, variant] = traceback.format_exc()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(str(path / "init"), str(path)), nprocs=WORLD, join=True)
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_reduce_mean(ranks):
    for res in ranks:
        assert torch.equal(res["reduce_mean"], torch.tensor([1.5, 2.0]))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ghmc_process_group_sees_the_whole_batch(ranks, backend, variant):
    got = [res[backend, variant] for res in ranks]
    for r, g in enumerate(got):
        assert not isinstance(g, str), f"rank {r}, backend {backend}:\n{g}"
    # one process, float64 reference, on the whole batch (no process group)
    whole = _steps("reference", variant, torch.float64)
    tol = TOL[torch.float32]
    for step in range(STEPS):
        for r in range(WORLD):
            # identical EMA state on every rank, equal to the whole batch's (float32 state)
            assert torch.equal(got[r][step]["state"], got[0][step]["state"]), f"step {step}: states differ"
            assert_rel_close(got[r][step]["state"], whole[step]["state"], 1e-6, f"step {step} rank {r} state")
        none = torch.cat([got[r][step]["none"] for r in range(WORLD)])
        assert_rel_close(none, whole[step]["none"], tol, f"step {step}: per-entry loss of the two halves")
        grad = torch.cat([got[r][step]["grad"] for r in range(WORLD)])
        assert_rel_close(grad, whole[step]["grad"], tol, f"step {step}: gradient of the sum")
        # 'mean' divides by this rank's own n_valid
        logits, target, weight = _batch(variant, step, torch.float64)
        for r in range(WORLD):
            t, w = _half(target, r), _half(weight, r)
            n_valid = ((t != -100) & (w != 0)).sum() * (logits.shape[-1] if variant == "sigmoid" else 1)
            assert_rel_close(got[r][step]["mean"], got[r][step]["none"].double().sum() / n_valid, tol,
                             f"step {step} rank {r}: 'mean' over the rank's valid entries")
    # and the rank-local histogram would have differed: the process group matters here
    local = _steps("reference", variant, torch.float64, rank=0)
    assert not torch.allclose(local[0]["none"], whole[0]["none"][:local[0]["none"].shape[0]].to(torch.float64))
