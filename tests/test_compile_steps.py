"""A torch.compile'd training step with each nn module (issue 26): a Linear head, the loss,
backward and an SGD step, three steps on fresh batches of one shape. After the first step nothing
is compiled again (no recompilation, no new graph: dynamo's frame count and graph count stay
put), and every step's loss, the parameters after it and GHM-C's EMA state equal eager's.

The backend is "aot_eager": dynamo's guards and graph breaks (what recompiles) and AOTAutograd's
tracing of the ops (fake kernels, autograd formulas) are the same as under the default inductor,
without inductor's code generation (minutes on 2 cores). benchmarks/compile_step.py times the
inductor step against eager.
"""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fused_losses as fl
from benchmarks.compile_step import trainer
from tests.utils import TOL, assert_rel_close

N, D, C = 24, 8, 5

# name -> (module factory, target kind); per-class alphas/weights as a long-tailed classifier has
MODULES = {
    "FocalLoss": (lambda: fl.nn.FocalLoss(alpha=[0.1, 0.2, 0.3, 0.4, 0.5]), "index"),
    "SigmoidFocalLoss": (lambda: fl.nn.SigmoidFocalLoss(reduction="sum"), "labels"),
    "OHEMLoss": (lambda: fl.nn.OHEMLoss(keep=0.5), "index"),
    "GHMCLoss": (lambda: fl.nn.GHMCLoss(bins=6, momentum=0.75), "labels"),
    "GHMCLoss-softmax": (lambda: fl.nn.GHMCLoss(bins=6, momentum=0.75, use_sigmoid=False), "index"),
    "IBLoss": (lambda: fl.nn.IBLoss(weight=[1.0, 2.0, 1.0, 0.5, 1.0]), "features"),
    "IBFocalLoss": (lambda: fl.nn.IBFocalLoss(gamma=1.0), "features"),
}


def _batches(kind, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(N, D, generator=g)
        t = torch.randint(0, C + 1 if kind == "labels" else C, (N,), generator=g)  # labels: C is background
        out.append((x, t))
    return out


@pytest.mark.compile
@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_training_step_does_not_recompile_and_matches_eager(name):
    factory, kind = MODULES[name]
    torch.manual_seed(0)
    head = torch.nn.Linear(D, C)
    loss_fn = factory()
    eager_head, eager_loss = copy.deepcopy(head), copy.deepcopy(loss_fn)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(trainer(loss_fn, kind, head, lr=0.1), backend=counter)
    eager = trainer(eager_loss, kind, eager_head, lr=0.1)
    frames = []
    for i, (x, t) in enumerate(_batches(kind, 3, seed=len(name))):
        got = compiled(x, t)
        frames.append((counter.frame_count, counter.op_count))
        want = eager(x, t)
        assert_rel_close(got, want, TOL[torch.float32], f"{name} step {i} loss")
        for p, q in zip(head.parameters(), eager_head.parameters()):
            assert_rel_close(p.detach(), q.detach(), TOL[torch.float32], f"{name} step {i} parameters")
        for (b, buf), (_, ebuf) in zip(loss_fn.named_buffers(), eager_loss.named_buffers()):
            assert torch.equal(buf, ebuf), f"{name} step {i} buffer {b}"
    assert frames[0][0] > 0
    assert frames[1] == frames[0] and frames[2] == frames[0], f"{name}: compiled again after the first step: {frames}"
    if name.startswith("GHMC"):
        assert float(loss_fn.acc_sum.sum()) > 0  # the EMA state was updated by the compiled steps
