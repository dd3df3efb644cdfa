"""seesaw(process_group=...) and eqlv2(process_group=...) across 2 processes (gloo, CPU tensors).

Each step splits one batch between the two ranks differently: unevenly (17 / 7 rows), all rows
on rank 0 and ZERO rows on rank 1, and a rank 0 whose rows are all IGNORED. With the process
group every rank must hold the state of the WHOLE batch after every step (Seesaw: the int64
counts all-reduced, so bitwise; EQLv2: the per-rank float64 batch sums added in rank order, so
equal up to the rounding of the partial sums) and the per-row losses ('none') and the gradients
of the 'sum' of the two ranks, concatenated, equal one process on the whole batch (float64
reference). One spawn (module fixture) serves every backend; a failure on a rank is recorded and
reported by its own test case.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

import fused_losses as fl
from fused_losses import _backends
from fused_losses import reference as R
from tests.utils import assert_rel_close

WORLD = 2
BACKENDS = ["reference", "cpu"] + (["triton"] if fl.backends()["triton"].available
                                   and "cpu" in _backends.get("triton").device_types else [])
LOSSES = ["seesaw", "eqlv2"]
C, N = 6, 24
# rows of rank 0 per step (the rest go to rank 1); step 2's rank 0 rows are all ignored
SPLITS = [17, N, 8]


def _batch(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    logits = 3.0 * torch.randn(N, C + 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C + 1, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100
    if step == 2:
        labels[:SPLITS[2]] = -100
    return logits.to(dtype), labels


def _call(loss, backend, x, labels, state, reduction, group):
    if loss == "seesaw":
        return fl.seesaw(x, labels, state, objectness=True, reduction=reduction, backend=backend,
                         process_group=group)
    return fl.eqlv2(x[:, :C], labels, state, reduction=reduction, backend=backend, process_group=group)


def _steps(loss, backend, dtype, rank=None, group=None):
    state = torch.zeros(C + 1) if loss == "seesaw" else R.eqlv2_initial_state(C)
    out = []
    for step in range(len(SPLITS)):
        logits, labels = _batch(step, dtype)
        if rank is not None:
            rows = slice(0, SPLITS[step]) if rank == 0 else slice(SPLITS[step], N)
            logits, labels = logits[rows], labels[rows]
        before = state.clone()
        res = {"none": _call(loss, backend, logits, labels, state, "none", group)}
        state.copy_(before)
        x = logits.clone().requires_grad_(True)
        total = _call(loss, backend, x, labels, state, "sum", group)
        (res["grad"],) = torch.autograd.grad(total, x)
        res["state"] = state.clone()
        out.append(res)
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {}
        group = dist.new_group([0, 1])
        for backend in BACKENDS:
            for loss in LOSSES:
                try:
                    res[backend, loss] = _steps(loss, backend, torch.float32, rank, group)
                except Exception:  # noqa: BLE001 - reported by the test case of this backend
                    res[backend, loss] = traceback.format_exc()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp_longtail")
    torch.multiprocessing.spawn(_worker, args=(str(path / "init"), str(path)), nprocs=WORLD, join=True)
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_process_group_sees_the_whole_batch(ranks, backend, loss):
    got = [res[backend, loss] for res in ranks]
    for r, g in enumerate(got):
        assert not isinstance(g, str), f"rank {r}, backend {backend}:\n{g}"
    whole = _steps(loss, "reference", torch.float64)
    for step in range(len(SPLITS)):
        assert got[1][step]["none"].shape[0] == N - SPLITS[step]
        for r in range(WORLD):
            assert torch.equal(got[r][step]["state"], got[0][step]["state"]), f"step {step}: the ranks' states differ"
            if loss == "seesaw":  # integer counts: the whole batch's, bitwise
                assert torch.equal(got[r][step]["state"], whole[step]["state"]), f"step {step} rank {r}"
            else:
                assert_rel_close(got[r][step]["state"], whole[step]["state"], 1e-5, f"step {step} rank {r} state")
        none = torch.cat([got[r][step]["none"] for r in range(WORLD)])
        assert_rel_close(none, whole[step]["none"], 1e-5, f"step {step}: per-row loss of the two ranks")
        grad = torch.cat([got[r][step]["grad"] for r in range(WORLD)])
        assert_rel_close(grad, whole[step]["grad"], 1e-5, f"step {step}: gradient of the sum")
    # rank 0 of step 2 has only ignored rows: its loss and gradient are 0
    assert got[0][2]["none"].abs().sum() == 0 and got[0][2]["grad"].abs().sum() == 0
    # the group matters: rank 1 alone (its rows only) would have ended with another state
    alone = _steps(loss, "reference", torch.float64, rank=1)
    assert not torch.allclose(alone[-1]["state"], whole[-1]["state"])
