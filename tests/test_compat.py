"""fused_losses.compat (torchvision adapter, RetinaNet patch, mmdet's FocalLoss),
fused_losses.distributed.reduce_mean and examples/retinanet.py.

Ground truth: torchvision.ops.sigmoid_focal_loss on float64 inputs (the peer formula itself);
for MMDetFocalLoss, mmdet's py_sigmoid_focal_loss + weight_reduce_loss written out below.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib

import pytest
import torch
import torch.distributed as dist

import fused_losses as fl
from fused_losses import compat, distributed
from tests.utils import TOL, assert_rel_close, rel_error, sigmoid_case

ROOT = pathlib.Path(__file__).resolve().parents[1]


# torchvision is imported by the tests that use it, not by the module: the 2-process test's
# spawned workers import this module and should not pay for it.
@pytest.fixture(scope="module")
def tv_ops():
    import torchvision.ops
    return torchvision.ops


@pytest.fixture(scope="module")
def tv_retinanet():
    import torchvision.models.detection.retinanet
    return torchvision.models.detection.retinanet


# --------------------------------------------------------------------------------------------
# sigmoid_focal_loss: torchvision's signature and numbers
# --------------------------------------------------------------------------------------------
def test_signature_is_torchvisions(tv_ops):
    ours = inspect.signature(compat.sigmoid_focal_loss).parameters
    theirs = inspect.signature(tv_ops.sigmoid_focal_loss).parameters
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
        assert ours[name].kind == theirs[name].kind, name


def _loss_grads(fn, x, t, cot_seed, *args, target_grad=False):
    """fn(x, t, *args) and the gradients of <fn(...), cot> for inputs (and targets)."""
    x = x.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(target_grad)
    out = fn(x, t, *args)
    g = torch.Generator().manual_seed(cot_seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    wrt = [x, t] if target_grad else [x]
    grads = torch.autograd.grad(out, wrt, cot)
    return out.detach(), [gr.detach() for gr in grads]


SHAPES = [(7, 3), (2, 5, 4, 6), (9,), (0, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["float", "soft"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_adapter_matches_torchvision(dtype, reduction, kind, shape, tv_ops):
    x, t = sigmoid_case(shape, torch.float64, kind=kind, seed=len(shape) * 10 + shape[-1])
    for alpha, gamma in [(0.25, 2), (-1, 0.5), (0.0, 0.0), (1.0, 3.5)]:
        # positional arguments, exactly as torchvision code calls it
        ref, (ref_gx,) = _loss_grads(tv_ops.sigmoid_focal_loss, x, t, 3, alpha, gamma, reduction)
        out, (gx,) = _loss_grads(compat.sigmoid_focal_loss, x.to(dtype), t.to(dtype), 3, alpha, gamma, reduction)
        what = f"{kind} {tuple(shape)} alpha={alpha} gamma={gamma} {reduction}"
        assert out.shape == ref.shape and gx.shape == x.shape
        if x.numel() == 0 and reduction == "mean":
            # documented difference: the mean of nothing is 0 here (as every loss of the package), NaN in torch
            assert torch.isnan(ref) and float(out) == 0.0 and gx.numel() == 0
            continue
        if reduction == "none":
            assert out.dtype == dtype
        assert_rel_close(out, ref, TOL[dtype], f"loss {what}")
        assert_rel_close(gx, ref_gx, TOL[dtype], f"grad {what}")


def test_adapter_fused_path_and_keywords(tv_ops):
    """The adapter calls the fused function (not a copy of torchvision's code) and accepts keywords."""
    x, t = sigmoid_case((64, 5), torch.float32, kind="soft", seed=3)
    assert fl.backends()["cpu"].available, "the compiled cpu backend is needed here"
    ours = compat.sigmoid_focal_loss(inputs=x, targets=t, alpha=0.3, gamma=1.5, reduction="sum")
    direct = fl.sigmoid_focal(x, t, alpha=0.3, gamma=1.5, reduction="sum", backend="cpu")
    assert torch.equal(ours, direct)
    assert_rel_close(ours, tv_ops.sigmoid_focal_loss(x.double(), t.double(), 0.3, 1.5, "sum"), TOL[torch.float32])


def test_adapter_non_contiguous_and_scalar(tv_ops):
    x, t = sigmoid_case((6, 8), torch.float64, kind="soft", seed=5)
    xs, ts = x.t(), t.t()  # non-contiguous views
    assert_rel_close(compat.sigmoid_focal_loss(xs, ts), tv_ops.sigmoid_focal_loss(xs, ts), TOL[torch.float64])
    for reduction in ["none", "mean", "sum"]:
        x0, t0 = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
        out = compat.sigmoid_focal_loss(x0, t0, reduction=reduction)
        ref = tv_ops.sigmoid_focal_loss(x0, t0, reduction=reduction)
        assert out.shape == ref.shape == ()
        assert_rel_close(out, ref, TOL[torch.float64], reduction)


def test_adapter_target_gradient(tv_ops):
    """torchvision's loss is differentiable in soft targets (e.g. distillation); so is the adapter."""
    x, t = sigmoid_case((5, 4), torch.float64, kind="soft", seed=6)
    for reduction in ["none", "sum"]:
        ref, (rgx, rgt) = _loss_grads(tv_ops.sigmoid_focal_loss, x, t, 2, 0.25, 2, reduction, target_grad=True)
        out, (gx, gt) = _loss_grads(compat.sigmoid_focal_loss, x, t, 2, 0.25, 2, reduction, target_grad=True)
        assert_rel_close(out, ref, TOL[torch.float64], reduction)
        assert_rel_close(gx, rgx, TOL[torch.float64], f"inputs grad {reduction}")
        assert_rel_close(gt, rgt, TOL[torch.float64], f"targets grad {reduction}")


def test_adapter_low_precision_dtypes(tv_ops):
    """Documented difference: reductions of fp16/bf16 inputs come back in float32, at least as
    close to float64 as torchvision's own low-precision result."""
    x, t = sigmoid_case((256, 8), torch.float64, kind="float", seed=7)
    ref = tv_ops.sigmoid_focal_loss(x, t, reduction="sum")
    for dtype in (torch.bfloat16, torch.float16):
        out = compat.sigmoid_focal_loss(x.to(dtype), t.to(dtype), reduction="sum")
        assert out.dtype == torch.float32
        eager = tv_ops.sigmoid_focal_loss(x.to(dtype), t.to(dtype), reduction="sum")
        assert rel_error(out, ref) <= max(rel_error(eager, ref), 1e-6)
        assert compat.sigmoid_focal_loss(x.to(dtype), t.to(dtype)).dtype == dtype


def test_adapter_rejects_what_torchvision_rejects(tv_ops):
    x, t = sigmoid_case((4, 3), torch.float32, kind="float", seed=8)
    with pytest.raises(TypeError, match="targets.*fused_losses.sigmoid_focal"):
        compat.sigmoid_focal_loss(x, t.long())
    with pytest.raises(TypeError, match="targets"):
        compat.sigmoid_focal_loss(x, t.bool())
    for alpha in (1.5, -0.5):
        with pytest.raises(ValueError, match="alpha"):
            tv_ops.sigmoid_focal_loss(x, t, alpha)
        with pytest.raises(ValueError, match="alpha"):
            compat.sigmoid_focal_loss(x, t, alpha)
    with pytest.raises(ValueError):
        tv_ops.sigmoid_focal_loss(x, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        compat.sigmoid_focal_loss(x, t, reduction="avg")
    with pytest.raises(ValueError):
        compat.sigmoid_focal_loss(x, t[:, :2])


# --------------------------------------------------------------------------------------------
# patch_torchvision
# --------------------------------------------------------------------------------------------
@pytest.fixture
def pristine_retinanet(monkeypatch, tv_retinanet):
    """Whatever a test does, the module's function is put back afterwards (monkeypatch restores
    the attribute it recorded), so a failing test cannot leak a patch into other tests."""
    monkeypatch.setattr(tv_retinanet, "sigmoid_focal_loss", tv_retinanet.sigmoid_focal_loss)
    return tv_retinanet.sigmoid_focal_loss


def test_patch_plain_call_and_restore(pristine_retinanet, tv_ops, tv_retinanet):
    original = pristine_retinanet
    assert original is tv_ops.sigmoid_focal_loss
    handle = compat.patch_torchvision()
    assert tv_retinanet.sigmoid_focal_loss is compat.sigmoid_focal_loss
    assert handle.active and handle.original is original
    handle.restore()
    assert tv_retinanet.sigmoid_focal_loss is original
    handle.restore()  # twice: harmless
    assert tv_retinanet.sigmoid_focal_loss is original and not handle.active


def test_patch_context_manager_restores_even_on_exception(pristine_retinanet, tv_retinanet):
    original = pristine_retinanet
    with compat.patch_torchvision() as handle:
        assert tv_retinanet.sigmoid_focal_loss is compat.sigmoid_focal_loss
    assert tv_retinanet.sigmoid_focal_loss is original and not handle.active
    with pytest.raises(KeyError):
        with compat.patch_torchvision():
            raise KeyError("boom")
    assert tv_retinanet.sigmoid_focal_loss is original


def test_patch_idempotent_nested_and_out_of_order(pristine_retinanet, tv_retinanet):
    original = pristine_retinanet
    with compat.patch_torchvision():
        with compat.patch_torchvision():
            assert tv_retinanet.sigmoid_focal_loss is compat.sigmoid_focal_loss
        assert tv_retinanet.sigmoid_focal_loss is compat.sigmoid_focal_loss  # inner exit keeps it
    assert tv_retinanet.sigmoid_focal_loss is original
    first, second = compat.patch_torchvision(), compat.patch_torchvision()
    first.restore()  # out of order: the outer one first
    assert tv_retinanet.sigmoid_focal_loss is original
    second.restore()  # must not put the fused loss back
    assert tv_retinanet.sigmoid_focal_loss is original


def test_patch_restores_exactly_what_was_there(pristine_retinanet, monkeypatch, tv_ops, tv_retinanet):
    def users_own_loss(*args, **kwargs):
        return tv_ops.sigmoid_focal_loss(*args, **kwargs)

    monkeypatch.setattr(tv_retinanet, "sigmoid_focal_loss", users_own_loss)
    with compat.patch_torchvision() as handle:
        assert handle.original is users_own_loss
    assert tv_retinanet.sigmoid_focal_loss is users_own_loss
    # someone else replaces the function while patched: restore leaves theirs in place
    handle = compat.patch_torchvision()
    monkeypatch.setattr(tv_retinanet, "sigmoid_focal_loss", pristine_retinanet)
    handle.restore()
    assert tv_retinanet.sigmoid_focal_loss is pristine_retinanet


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls the adapter makes into fused_losses.sigmoid_focal."""
    calls = []
    inner = compat._functional.sigmoid_focal

    def counting(*args, **kwargs):
        calls.append(kwargs.get("reduction"))
        return inner(*args, **kwargs)

    monkeypatch.setattr(compat._functional, "sigmoid_focal", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patched_retinanet_head_loss(dtype, pristine_retinanet, fused_calls, tv_retinanet):
    """RetinaNetClassificationHead.compute_loss, stock vs patched: the same loss and gradient,
    with ignored anchors (BETWEEN_THRESHOLDS), background anchors and an image without positives."""
    head = tv_retinanet.RetinaNetClassificationHead(in_channels=8, num_anchors=3, num_classes=6)
    g = torch.Generator().manual_seed(0)
    n_images, n_anchors, k = 3, 50, 6
    logits = (2 * torch.randn(n_images, n_anchors, k, generator=g, dtype=torch.float64))
    matched, targets = [], []
    for i in range(n_images):
        n_gt = 3
        m = torch.randint(-2, n_gt, (n_anchors,), generator=g)  # -2 ignored, -1 background, >= 0 a box
        if i == 2:
            m[m >= 0] = -1  # no foreground: the head divides by max(1, 0)
        matched.append(m)
        targets.append({"labels": torch.randint(0, k, (n_gt,), generator=g)})

    def run(x):
        x = x.detach().clone().requires_grad_(True)
        loss = head.compute_loss(targets, {"cls_logits": x}, matched)
        loss.backward()
        return loss.detach(), x.grad

    ref, ref_grad = run(logits)  # stock torchvision, float64: ground truth
    assert not fused_calls
    with compat.patch_torchvision():
        out, grad = run(logits.to(dtype))
    assert fused_calls == ["sum"] * n_images
    assert_rel_close(out, ref, TOL[dtype], "loss")
    assert_rel_close(grad, ref_grad, TOL[dtype], "grad")
    assert float(ref) > 0


def test_patch_without_the_module_layout_is_a_clear_error(monkeypatch, tv_retinanet):
    monkeypatch.delattr(tv_retinanet, "sigmoid_focal_loss")
    with pytest.raises(RuntimeError, match="no module-level sigmoid_focal_loss"):
        compat.patch_torchvision()


# --------------------------------------------------------------------------------------------
# examples/retinanet.py at tiny size
# --------------------------------------------------------------------------------------------
def test_retinanet_example_tiny(fused_calls, pristine_retinanet, capsys, tv_retinanet):
    spec = importlib.util.spec_from_file_location("retinanet_example", ROOT / "examples" / "retinanet.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    steps, batch = 2, 2
    result = example.main(["--steps", str(steps), "--image-size", "64", "--batch-size", str(batch),
                           "--num-classes", "5", "--fpn-channels", "32"])
    printed = capsys.readouterr().out
    assert "max |parameter difference|" in printed
    # the fused runs, and only they, went through the fused loss: one call per image per step
    assert fused_calls == ["sum"] * (steps * batch)
    assert tv_retinanet.sigmoid_focal_loss is pristine_retinanet
    for s, f in zip(result["stock"], result["fused"]):
        for key in ("classification", "bbox_regression", "total"):
            assert abs(f[key] - s[key]) <= 1e-5 * abs(s[key]), (key, s[key], f[key])
        assert s["classification"] > 0
    assert len(result["stock"]) == steps
    assert result["max_param_diff"] <= 1e-5, result["max_param_diff"]


# --------------------------------------------------------------------------------------------
# MMDetFocalLoss: mmdet 3.x FocalLoss semantics
# --------------------------------------------------------------------------------------------
MMDET_EPS = torch.finfo(torch.float32).eps


def mmdet_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None,
                     loss_weight=1.0):
    """mmdet.models.losses.FocalLoss.forward (use_sigmoid=True, CPU path), written out: integer
    labels -> one_hot(target, C + 1)[:, :C]; py_sigmoid_focal_loss with its weight reshaping;
    weight_reduce_loss (avg_factor + float32 eps for 'mean'; ignored for 'none')."""
    if pred.dim() != target.dim():
        num_classes = pred.size(1)
        target = torch.nn.functional.one_hot(target, num_classes=num_classes + 1)[:, :num_classes]
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None:
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                assert weight.numel() == loss.numel()
                weight = weight.view(loss.size(0), -1)
        assert weight.ndim == loss.ndim
        loss = loss * weight
    if avg_factor is None:
        loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    elif reduction == "mean":
        loss = loss.sum() / (avg_factor + MMDET_EPS)
    elif reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss_weight * loss


def _mmdet_case(n=30, c=6, seed=0, kind="labels"):
    g = torch.Generator().manual_seed(seed)
    pred = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c + 1, (n,), generator=g)  # c: background
    if kind == "labels":
        return pred, labels
    onehot = torch.nn.functional.one_hot(labels, c + 1)[:, :c]
    return pred, (onehot if kind == "onehot_long" else onehot.double() * (0.9 if kind == "soft" else 1.0))


MMDET_BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", MMDET_BACKENDS)
@pytest.mark.parametrize("kind", ["labels", "onehot", "onehot_long", "soft"])
@pytest.mark.parametrize("wkind", [None, "row", "element", "flat"])
@pytest.mark.parametrize("reduction, avg_factor", [("mean", None), ("sum", None), ("none", None), ("mean", 7.0),
                                                    ("mean", "tensor"), ("mean", 0), ("none", 3.0)])
def test_mmdet_focal_loss_matches_mmdet(backend, kind, wkind, reduction, avg_factor):
    pred, target = _mmdet_case(kind=kind, seed=len(kind))
    n, c = pred.shape
    g = torch.Generator().manual_seed(5)
    weight = {None: None, "row": (torch.rand(n, generator=g) > 0.3).double(),
              "element": torch.rand(n, c, generator=g, dtype=torch.float64),
              "flat": torch.rand(n * c, generator=g, dtype=torch.float64)}[wkind]
    if avg_factor == "tensor":
        avg_factor = torch.tensor(12.0, dtype=torch.float64)  # a 0-dim tensor, e.g. after reduce_mean
    module = compat.MMDetFocalLoss(gamma=1.5, alpha=0.3, loss_weight=2.0, backend=backend)
    x1, x2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    ours = module(x1, target, weight=weight, avg_factor=avg_factor, reduction_override=reduction)
    peer = mmdet_focal_loss(x2, target, weight, gamma=1.5, alpha=0.3, reduction=reduction, avg_factor=avg_factor,
                            loss_weight=2.0)
    assert ours.shape == peer.shape
    assert_rel_close(ours, peer, 1e-12, f"MMDetFocalLoss vs mmdet ({kind}, {wkind}, {reduction}, {avg_factor})")
    cot = torch.randn(peer.shape, generator=g, dtype=torch.float64)
    (g1,), (g2,) = torch.autograd.grad(ours, x1, cot), torch.autograd.grad(peer, x2, cot)
    assert_rel_close(g1, g2, 1e-12, "grad")


def test_mmdet_focal_loss_signature_and_errors():
    init = inspect.signature(compat.MMDetFocalLoss.__init__).parameters
    assert [(k, p.default) for k, p in init.items() if k != "self"][:5] == [
        ("use_sigmoid", True), ("gamma", 2.0), ("alpha", 0.25), ("reduction", "mean"), ("loss_weight", 1.0)]
    fwd = inspect.signature(compat.MMDetFocalLoss.forward).parameters
    assert list(fwd)[1:] == ["pred", "target", "weight", "avg_factor", "reduction_override"]
    with pytest.raises(NotImplementedError, match="use_sigmoid"):
        compat.MMDetFocalLoss(use_sigmoid=False)
    pred, labels = _mmdet_case()
    module = compat.MMDetFocalLoss(backend="reference")
    with pytest.raises(ValueError, match="avg_factor"):
        module(pred, labels, avg_factor=3.0, reduction_override="sum")
    with pytest.raises(ValueError, match="reduction_override"):
        module(pred, labels, reduction_override="max")
    with pytest.raises(ValueError, match="^weight: shape"):
        module(pred, labels, weight=torch.ones(7))
    # the default reduction is 'mean' = loss.mean(), as mmdet (not sigmoid_focal's 'none')
    assert module(pred, labels).dim() == 0
    assert "loss_weight=1.0" in repr(module)


def test_mmdet_focal_loss_avg_factor_tensor_no_host_read(monkeypatch):
    """A 0-dim avg_factor tensor is divided on the device: its value is never read on the host."""
    pred, labels = _mmdet_case()
    af = torch.tensor(5.0, dtype=torch.float64)
    calls = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(self) or 0.0)
    out = compat.MMDetFocalLoss(backend="reference")(pred, labels, avg_factor=af)
    assert not calls and out.dim() == 0


# --------------------------------------------------------------------------------------------
# reduce_mean
# --------------------------------------------------------------------------------------------
def test_reduce_mean_without_distributed():
    assert not dist.is_initialized()
    t = torch.tensor([1.0, 3.0])
    assert distributed.reduce_mean(t) is t  # identity, as mmdet's
    assert torch.equal(t, torch.tensor([1.0, 3.0]))
    with pytest.raises(TypeError, match="tensor"):
        distributed.reduce_mean(3.0)


def _ddp_batch(n, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.full((n,), c)  # background
    pos = torch.rand(n, generator=g) < 0.3
    labels[pos] = torch.randint(0, c, (int(pos.sum()),), generator=g)
    return feats, labels


def _head(d, c):
    torch.manual_seed(0)
    return torch.nn.Linear(d, c).double()


N_PER_RANK, C, D = (12, 20), 5, 4  # unequal shards so that num_pos differs between ranks


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        res = {}
        t = torch.tensor([rank + 1.0, 10.0 * rank])
        before = t.clone()
        m = distributed.reduce_mean(t)
        res["mean"] = m
        res["input_unchanged"] = torch.equal(t, before) and m is not t
        res["int_mean"] = distributed.reduce_mean(torch.tensor(rank + 1))
        everyone = dist.new_group([0, 1])
        res["group_mean"] = distributed.reduce_mean(t, group=everyone)
        only_0 = dist.new_group([0])
        if rank == 0:
            res["single_group"] = distributed.reduce_mean(t, group=only_0)
        else:
            try:
                distributed.reduce_mean(t, group=only_0)
                res["non_member_error"] = False
            except ValueError:
                res["non_member_error"] = True

        # RetinaNet-style normaliser under data parallelism: sum / reduce_mean(num_pos) on each rank,
        # then the gradients averaged over ranks as DDP does (all-reduce SUM / world size; done by
        # hand here: constructing a DistributedDataParallel costs seconds of imports per process).
        feats, labels = _ddp_batch(sum(N_PER_RANK), C, D, seed=11)
        lo = sum(N_PER_RANK[:rank])
        feats, labels = feats[lo:lo + N_PER_RANK[rank]], labels[lo:lo + N_PER_RANK[rank]]
        model = _head(D, C)
        num_pos = distributed.reduce_mean((labels < C).sum().to(torch.float64)).clamp(min=1.0)
        loss = fl.sigmoid_focal(model(feats), labels, reduction="sum") / num_pos
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size
        res["loss"] = loss.detach()
        res["grads"] = [p.grad.detach().clone() for p in model.parameters()]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reduce_mean_two_processes_gloo(tmp_path):
    world_size = 2
    torch.multiprocessing.spawn(_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
                                nprocs=world_size, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for r in range(world_size):
        assert torch.equal(res[r]["mean"], torch.tensor([1.5, 5.0]))
        assert res[r]["input_unchanged"]
        assert res[r]["int_mean"].is_floating_point() and float(res[r]["int_mean"]) == 1.5
        assert torch.equal(res[r]["group_mean"], torch.tensor([1.5, 5.0]))
    assert torch.equal(res[0]["single_group"], torch.tensor([1.0, 0.0]))
    assert res[1]["non_member_error"]

    # one process on the concatenated batch, normalised by the global num_pos
    feats, labels = _ddp_batch(sum(N_PER_RANK), C, D, seed=11)
    model = _head(D, C)
    n_pos = (labels < C).sum()
    loss = fl.sigmoid_focal(model(feats), labels, reduction="sum") / n_pos.clamp(min=1)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    # with averaged gradients, each rank's gradient is that of the global loss
    for r in range(world_size):
        for g_ddp, g_one in zip(res[r]["grads"], grads):
            assert_rel_close(g_ddp, g_one, TOL[torch.float64], f"rank {r} grad")
    assert_rel_close((res[0]["loss"] + res[1]["loss"]) / world_size, loss.detach(), TOL[torch.float64], "loss")
    # and the rank-local normaliser would not have given it: the shards hold different num_pos
    local = _head(D, C)
    for r in range(world_size):
        lo, hi = sum(N_PER_RANK[:r]), sum(N_PER_RANK[:r + 1])
        n_local = (labels[lo:hi] < C).sum().clamp(min=1)
        (fl.sigmoid_focal(local(feats[lo:hi]), labels[lo:hi], reduction="sum") / n_local / world_size).backward()
    assert rel_error(local.weight.grad, grads[0]) > 1e-2
