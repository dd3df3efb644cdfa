"""The detector-loss references (issue #24) against the peers' own formulas, written out here
in a few lines of float64 torch each, independently of fused_losses.reference's code path:

- mmdet 3.x mmdet/models/losses/gfocal_loss.py (quality_focal_loss, quality_focal_loss_with_prob,
  quality_focal_loss_tensor_target, distribution_focal_loss), varifocal_loss.py (varifocal_loss),
  utils.py (weight_reduce_loss, with 3.x's float32 eps added to avg_factor);
- RT-DETR rtdetr_pytorch/src/zoo/rtdetr/rtdetr_criterion.py (loss_labels_vfl);
- ultralytics ultralytics/utils/loss.py (VarifocalLoss, DFLoss with BboxLoss's weighting);
- timm timm/loss/asymmetric_loss.py (AsymmetricLossMultiLabel: -loss.sum(), and the newer
  'batchmean' default), the ASL paper's code;
- Poly-1: the paper's poly1 CE / poly1 focal, as abhuse/polyloss-pytorch writes them.
The peer commits read are listed in docs/losses/detector.md.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from fused_losses import reference as R
from tests.utils import assert_rel_close

F64 = torch.float64
MMDET_EPS = torch.finfo(torch.float32).eps


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, seed, scale=3.0, dtype=F64):
    return (scale * torch.randn(shape, generator=_gen(seed), dtype=F64)).to(dtype)


def _soft_target(shape, seed, edges=True):
    """Soft targets in [0, 1], with exact 0 and 1 entries (the edge rows) when `edges`."""
    g = _gen(seed + 1000)
    t = torch.rand(shape, generator=g, dtype=F64)
    t[torch.rand(shape, generator=g) < 0.5] = 0.0
    if edges:
        t[torch.rand(shape, generator=g) < 0.1] = 1.0
    return t


def _labels_scores(n, c, seed, q_edges=True):
    """Labels in [0, C] (C = background) and quality scores in [0, 1] with q = 0 and q = 1 rows."""
    g = _gen(seed + 2000)
    labels = torch.randint(0, c + 1, (n,), generator=g)
    scores = torch.rand(n, generator=g, dtype=F64)
    if q_edges and n >= 4:
        scores[0], scores[1] = 0.0, 1.0
        labels[0], labels[1] = 0, c - 1  # both positives
    return labels, scores


def _loss_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    g = torch.randn(out.shape, generator=_gen(7), dtype=out.dtype) if out.dim() else torch.ones((), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad


def _check_vs_peer(ours_fn, peer_fn, x, tol=1e-12, what=""):
    lo, go = _loss_grad(ours_fn, x)
    lp, gp = _loss_grad(peer_fn, x)
    assert_rel_close(lo, lp, tol, f"{what} loss")
    assert_rel_close(go, gp, tol, f"{what} grad")


# ---------------------------------------------------------------------------------------------
# The peers, paraphrased
# ---------------------------------------------------------------------------------------------
def mmdet_weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if reduction == "mean":
        return loss.sum() / (avg_factor + MMDET_EPS)
    if reduction == "none":
        return loss
    raise ValueError("avg_factor can not be used with reduction='sum'")


def mmdet_qfl(pred, label, score, beta=2.0, activated=False):
    """quality_focal_loss (logits) / quality_focal_loss_with_prob (activated): (N,) per row."""
    bce = F.binary_cross_entropy if activated else F.binary_cross_entropy_with_logits
    sig = pred if activated else pred.sigmoid()
    loss = bce(pred, torch.zeros_like(pred), reduction="none") * sig.pow(beta)
    pos = ((label >= 0) & (label < pred.size(1))).nonzero().squeeze(1)
    pl = label[pos].long()
    factor = score[pos] - sig[pos, pl]
    loss[pos, pl] = bce(pred[pos, pl], score[pos], reduction="none") * factor.abs().pow(beta)
    return loss.sum(dim=1)


def mmdet_qfl_dense(pred, target, beta=2.0, activated=False):
    """quality_focal_loss_tensor_target."""
    bce = F.binary_cross_entropy if activated else F.binary_cross_entropy_with_logits
    sig = pred if activated else pred.sigmoid()
    loss = bce(pred, torch.zeros_like(pred), reduction="none") * sig.pow(beta)
    pos = target != 0
    factor = target[pos] - sig[pos]
    loss[pos] = bce(pred[pos], target[pos], reduction="none") * factor.abs().pow(beta)
    return loss.sum(dim=1)


def mmdet_vfl(pred, target, alpha=0.75, gamma=2.0, iou_weighted=True):
    """varifocal_loss before weight_reduce_loss (elementwise)."""
    s = pred.sigmoid()
    pos_w = target if iou_weighted else torch.ones_like(target)
    focal_weight = (pos_w * (target > 0.0).to(pred.dtype)
                    + alpha * (s - target).abs().pow(gamma) * (target <= 0.0).to(pred.dtype))
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def rtdetr_vfl(src_logits, target_classes, ious, num_boxes, alpha=0.75, gamma=2.0):
    """loss_labels_vfl: (B, Q, C) logits, (B, Q) classes (C = no object), (B, Q) IoU targets."""
    c = src_logits.shape[-1]
    target = F.one_hot(target_classes, num_classes=c + 1)[..., :-1]
    target_score = ious.to(src_logits.dtype).unsqueeze(-1) * target
    pred_score = F.sigmoid(src_logits).detach()
    weight = alpha * pred_score.pow(gamma) * (1 - target) + target_score
    loss = F.binary_cross_entropy_with_logits(src_logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() * src_logits.shape[1] / num_boxes


def ultralytics_vfl(pred_score, gt_score, label, alpha=0.75, gamma=2.0):
    """VarifocalLoss.forward (gradient through the modulating factor)."""
    weight = alpha * pred_score.sigmoid().pow(gamma) * (1 - label) + gt_score * label
    return (F.binary_cross_entropy_with_logits(pred_score, gt_score, reduction="none") * weight).mean(1).sum()


def mmdet_dfl(pred, label):
    left = label.long()
    right = left + 1
    w_left = right.to(label.dtype) - label
    w_right = label - left.to(label.dtype)
    return (F.cross_entropy(pred, left, reduction="none") * w_left
            + F.cross_entropy(pred, right, reduction="none") * w_right)


def ultralytics_bbox_dfl(pred_dist, target_ltrb, weight, target_scores_sum, reg_max):
    """DFLoss (clamp to reg_max - 1 - 0.01, mean over the 4 sides) weighted as BboxLoss."""
    target = target_ltrb.clamp(0, reg_max - 1 - 0.01)
    tl = target.long()
    tr = tl + 1
    wl = tr - target
    wr = 1 - wl
    dfl = (F.cross_entropy(pred_dist, tl.view(-1), reduction="none").view(tl.shape) * wl
           + F.cross_entropy(pred_dist, tr.view(-1), reduction="none").view(tl.shape) * wr).mean(-1, keepdim=True)
    return (dfl * weight).sum() / target_scores_sum


def timm_asl(x, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8, disable_grad_focal=False, reduction="sum"):
    """AsymmetricLossMultiLabel.forward: 'sum' is the long-standing -loss.sum(); 'batchmean' the newer default."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not disable_grad_focal):
            pt = xs_pos * y + xs_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * w
    loss = -loss
    return {"sum": loss.sum(), "batchmean": loss.sum() / x.shape[0], "mean": loss.mean(), "none": loss}[reduction]


def poly1_ce(logits, labels, epsilon):
    """Poly1CrossEntropyLoss, per sample."""
    onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    pt = (onehot * F.softmax(logits, dim=-1)).sum(-1)
    return F.cross_entropy(logits, labels, reduction="none") + epsilon * (1 - pt)


def poly1_sigmoid_focal(logits, labels_onehot, epsilon, alpha, gamma):
    """Poly1FocalLoss (sigmoid), elementwise: alpha_t scales the focal part only."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, labels_onehot, reduction="none")
    pt = labels_onehot * p + (1 - labels_onehot) * (1 - p)
    fl = ce * (1 - pt) ** gamma
    if alpha >= 0:
        fl = (alpha * labels_onehot + (1 - alpha) * (1 - labels_onehot)) * fl
    return fl + epsilon * torch.pow(1 - pt, gamma + 1)


# ---------------------------------------------------------------------------------------------
# Quality focal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
@pytest.mark.parametrize("shape", [(9, 4), (16, 80), (1, 1)])
def test_qfl_label_form_vs_mmdet(beta, shape):
    n, c = shape
    x = _logits(shape, seed=n + c)
    labels, scores = _labels_scores(n, c, seed=n)
    _check_vs_peer(lambda z: R.quality_focal(z, labels, score=scores, beta=beta, reduction="none"),
                   lambda z: mmdet_qfl(z, labels, scores, beta), x, what="qfl label")


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_dense_form_vs_mmdet_with_soft_targets_0_and_1(beta):
    x = _logits((12, 7), seed=3)
    t = _soft_target((12, 7), seed=3)
    assert bool((t == 0).any()) and bool((t == 1).any())
    _check_vs_peer(lambda z: R.quality_focal(z, t, beta=beta, reduction="none"),
                   lambda z: mmdet_qfl_dense(z, t, beta), x, what="qfl dense")


def test_qfl_label_form_equals_dense_form_of_the_same_target():
    x = _logits((10, 5), seed=4)
    labels, scores = _labels_scores(10, 5, seed=4)
    dense = F.one_hot(labels, 6)[:, :5].to(F64) * scores[:, None]
    lo, go = _loss_grad(lambda z: R.quality_focal(z, labels, score=scores, reduction="none"), x)
    ld, gd = _loss_grad(lambda z: R.quality_focal(z, dense, reduction="none"), x)
    assert_rel_close(lo, ld, 1e-15, "loss")
    assert_rel_close(go, gd, 1e-15, "grad")


def test_qfl_activated_vs_mmdet_both_forms():
    p = torch.sigmoid(_logits((8, 5), seed=5, scale=2.0))
    labels, scores = _labels_scores(8, 5, seed=5)
    _check_vs_peer(lambda z: R.quality_focal(z, labels, score=scores, activated=True, reduction="none"),
                   lambda z: mmdet_qfl(z, labels, scores, activated=True), p, what="qfl activated label")
    t = _soft_target((8, 5), seed=5)
    _check_vs_peer(lambda z: R.quality_focal(z, t, activated=True, reduction="none"),
                   lambda z: mmdet_qfl_dense(z, t, activated=True), p, what="qfl activated dense")


@pytest.mark.parametrize("reduction,avg", [("none", None), ("mean", None), ("sum", None), ("mean", 3.5)])
def test_qfl_weight_and_reductions_vs_mmdet_weight_reduce_loss(reduction, avg):
    x = _logits((11, 6), seed=6)
    labels, scores = _labels_scores(11, 6, seed=6)
    w = torch.rand(11, generator=_gen(6), dtype=F64)
    w[2] = 0.0
    ours_avg = None if avg is None else avg + MMDET_EPS  # the compat drop-in adds mmdet's eps
    _check_vs_peer(lambda z: R.quality_focal(z, labels, score=scores, weight=w, reduction=reduction,
                                             avg_factor=ours_avg),
                   lambda z: mmdet_weight_reduce_loss(mmdet_qfl(z, labels, scores), w, reduction, avg), x,
                   what=f"qfl {reduction}")


def test_qfl_per_element_weight_applies_before_the_class_sum():
    x = _logits((6, 4), seed=8)
    t = _soft_target((6, 4), seed=8)
    w = torch.rand(6, 4, generator=_gen(8), dtype=F64)

    def peer(z):  # elementwise mmdet QFL (the row sum of mmdet's loss taken after weighting)
        s = z.sigmoid()
        return (F.binary_cross_entropy_with_logits(z, t, reduction="none") * (t - s).abs().pow(2.0) * w).sum(1)

    _check_vs_peer(lambda z: R.quality_focal(z, t, weight=w, reduction="none"), peer, x, what="qfl element weight")


def test_qfl_ignored_rows_and_all_ignored():
    x = _logits((9, 5), seed=9)
    labels, scores = _labels_scores(9, 5, seed=9)
    labels[[3, 6]] = -100
    keep = labels != -100
    lo, go = _loss_grad(lambda z: R.quality_focal(z, labels, score=scores, reduction="mean"), x)
    lp, gp = _loss_grad(lambda z: mmdet_qfl(z[keep], labels[keep], scores[keep]).mean(), x)
    assert_rel_close(lo, lp, 1e-12, "mean over non-ignored rows")
    assert_rel_close(go, gp, 1e-12, "grad")
    assert bool((go[~keep] == 0).all())
    none = R.quality_focal(x, labels, score=scores, reduction="none")
    assert bool((none[~keep] == 0).all())
    labels[:] = -100
    lo, go = _loss_grad(lambda z: R.quality_focal(z, labels, score=scores, reduction="mean"), x)
    assert float(lo) == 0.0 and bool((go == 0).all())


def test_qfl_zero_weight_with_nan_logits():
    x = _logits((6, 3), seed=10)
    labels, scores = _labels_scores(6, 3, seed=10)
    w = torch.ones(6, dtype=F64)
    w[1] = 0.0
    x_nan = x.clone()
    x_nan[1] = float("nan")
    lo, go = _loss_grad(lambda z: R.quality_focal(z, labels, score=scores, weight=w, reduction="sum"), x_nan)
    lp, _ = _loss_grad(lambda z: mmdet_qfl(z, labels, scores)[w != 0].sum(), x)
    assert_rel_close(lo, lp, 1e-12, "loss")
    assert bool(torch.isfinite(go).all()) and bool((go[1] == 0).all())


def test_qfl_extreme_logits_exact_and_finite():
    # y = 1, x = 40: |1 - s|^beta BCE = sigmoid(-x)^beta * softplus(-x), evaluated in log space.
    x = torch.tensor([[40.0, -40.0]], dtype=F64)
    t = torch.tensor([[1.0, 0.0]], dtype=F64)
    out = R.quality_focal(x, t, beta=2.0, reduction="none")
    expected = 2 * math.exp(2 * -40.0) * math.log1p(math.exp(-40.0))  # both entries, by symmetry
    assert abs(float(out[0]) - expected) <= 1e-14 * expected
    xg = x.clone().requires_grad_(True)
    R.quality_focal(xg, t, reduction="sum").backward()
    assert bool(torch.isfinite(xg.grad).all())


def test_vfl_bce_exact_above_softplus_threshold_and_gradient_at_zero():
    # y = 0, x = 25: alpha s^2 (25 + log1p(e^-25)); torch's softplus would drop the e^-25 above 20
    x = torch.tensor([[25.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0]], dtype=F64)
    out = R.varifocal(x, t, reduction="none")
    s = 1.0 / (1.0 + math.exp(-25.0))
    expected = 0.75 * s * s * (25.0 + math.log1p(math.exp(-25.0)))
    assert abs(float(out.detach()[0, 0]) - expected) <= 1e-15 * expected
    out.sum().backward()
    assert float(x.grad[0, 1]) == -0.5  # positive, q = 1, x = 0: q (s - q) = -1/2 exactly


# ---------------------------------------------------------------------------------------------
# Varifocal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iou_weighted", [True, False])
@pytest.mark.parametrize("alpha,gamma", [(0.75, 2.0), (0.25, 1.5)])
def test_vfl_dense_vs_mmdet(iou_weighted, alpha, gamma):
    x = _logits((10, 6), seed=11)
    t = _soft_target((10, 6), seed=11)
    _check_vs_peer(lambda z: R.varifocal(z, t, alpha=alpha, gamma=gamma, iou_weighted=iou_weighted, reduction="none"),
                   lambda z: mmdet_vfl(z, t, alpha, gamma, iou_weighted), x, what="vfl dense")


@pytest.mark.parametrize("reduction,avg", [("mean", None), ("sum", None), ("mean", 4.0)])
def test_vfl_per_element_weight_and_reductions_vs_mmdet(reduction, avg):
    x = _logits((7, 5), seed=12)
    t = _soft_target((7, 5), seed=12)
    w = torch.rand(7, 5, generator=_gen(12), dtype=F64)
    ours_avg = None if avg is None else avg + MMDET_EPS
    _check_vs_peer(lambda z: R.varifocal(z, t, weight=w, reduction=reduction, avg_factor=ours_avg),
                   lambda z: mmdet_weight_reduce_loss(mmdet_vfl(z, t), w, reduction, avg), x, what="vfl weight")


def test_vfl_label_form_detached_is_rtdetr():
    b, q, c = 2, 6, 5
    x = _logits((b, q, c), seed=13)
    g = _gen(13)
    classes = torch.randint(0, c + 1, (b, q), generator=g)
    ious = torch.rand(b, q, generator=g, dtype=F64)
    classes[0, 0], ious[0, 0] = 2, 0.0  # a matched query with IoU 0 (q = 0)
    classes[1, 1], ious[1, 1] = 4, 1.0  # q = 1
    num_boxes = 3.0
    _check_vs_peer(lambda z: R.varifocal(z, classes, score=ious, detach_modulation=True, reduction="mean",
                                         avg_factor=num_boxes),
                   lambda z: rtdetr_vfl(z, classes, ious, num_boxes), x, what="rt-detr vfl")


def test_vfl_label_form_not_detached_is_ultralytics():
    b, q, c = 2, 5, 4
    x = _logits((b, q, c), seed=14)
    g = _gen(14)
    classes = torch.randint(0, c + 1, (b, q), generator=g)
    ious = torch.rand(b, q, generator=g, dtype=F64)
    ious[0, 1] = 0.0
    onehot = F.one_hot(classes, c + 1)[..., :-1].to(F64)
    _check_vs_peer(lambda z: R.varifocal(z, classes, score=ious, reduction="sum") / q,
                   lambda z: ultralytics_vfl(z, onehot * ious[..., None], onehot), x, what="ultralytics vfl")


def test_vfl_q0_positive_label_form_zero_vs_dense_form_negative():
    x = _logits((4, 3), seed=15)
    labels = torch.tensor([1, 3, 0, 2])
    scores = torch.tensor([0.0, 0.5, 1.0, 0.3], dtype=F64)
    lab = R.varifocal(x, labels, score=scores, reduction="none")
    assert float(lab[0, 1]) == 0.0  # RT-DETR/ultralytics: a positive with q = 0 has zero loss
    dense = F.one_hot(labels, 4)[:, :3].to(F64) * scores[:, None]
    den = R.varifocal(x, dense, reduction="none")
    s = torch.sigmoid(x[0, 1])
    expected = 0.75 * s ** 2 * F.softplus(x[0, 1])  # mmdet: y = 0 is a negative
    assert_rel_close(den[0, 1], expected, 1e-14, "dense q = 0")
    mask = torch.ones_like(lab, dtype=torch.bool)
    mask[0, 1] = False
    assert_rel_close(lab[mask], den[mask], 1e-15, "the other entries agree")


def test_vfl_detach_changes_gradient_not_loss():
    x = _logits((8, 5), seed=16)
    t = _soft_target((8, 5), seed=16)
    l1, g1 = _loss_grad(lambda z: R.varifocal(z, t, reduction="sum"), x)
    l2, g2 = _loss_grad(lambda z: R.varifocal(z, t, detach_modulation=True, reduction="sum"), x)
    assert_rel_close(l1, l2, 0.0, "loss")
    assert (g1 - g2).abs().max() > 1e-3
    positive = t > 0
    assert_rel_close(g1[positive], g2[positive], 0.0, "positives have no modulating factor")


def test_vfl_ignored_rows_and_zero_weight_nan():
    x = _logits((6, 4), seed=17)
    labels, scores = _labels_scores(6, 4, seed=17)
    labels[2] = -100
    keep = labels != -100
    onehot = F.one_hot(labels[keep], 5)[:, :4].to(F64)
    lo, go = _loss_grad(lambda z: R.varifocal(z, labels, score=scores, reduction="mean"), x)
    # ultralytics' value is sum / C (its mean over dim 1); ours divides by the non-ignored elements
    lp, gp = _loss_grad(lambda z: ultralytics_vfl(z[keep], onehot * scores[keep, None], onehot) / int(keep.sum()), x)
    assert_rel_close(lo, lp, 1e-12, "mean over non-ignored elements")
    assert_rel_close(go, gp, 1e-12, "grad")
    labels[:] = -100
    lo, go = _loss_grad(lambda z: R.varifocal(z, labels, score=scores, reduction="mean"), x)
    assert float(lo) == 0.0 and bool((go == 0).all())
    t = _soft_target((6, 4), seed=17)
    w = torch.ones(6, 4, dtype=F64)
    w[3, 2] = 0.0
    x_nan = x.clone()
    x_nan[3, 2] = float("nan")
    lo, go = _loss_grad(lambda z: R.varifocal(z, t, weight=w, reduction="sum"), x_nan)
    assert_rel_close(lo, (mmdet_vfl(x, t) * w).sum(), 1e-12, "loss")
    assert bool(torch.isfinite(go).all()) and float(go[3, 2]) == 0.0


# ---------------------------------------------------------------------------------------------
# Distribution focal
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bins", [2, 5, 17])
def test_dfl_vs_mmdet_on_random_and_bin_edge_labels(bins):
    n = bins - 1
    x = _logits((20, bins), seed=bins)
    g = _gen(bins)
    y = n * torch.rand(20, generator=g, dtype=F64) * 0.999
    y[:4] = torch.tensor([0.0, min(1.0, n - 1.0), float(n - 1), 0.5 * n], dtype=F64).floor()  # bin edges below n, 0
    _check_vs_peer(lambda z: R.distribution_focal(z, y, reduction="none"), lambda z: mmdet_dfl(z, y), x, what="dfl")


def test_dfl_label_at_n_is_cross_entropy_to_the_last_bin_and_continuous():
    bins = 9
    n = bins - 1
    x = _logits((3, bins), seed=20)
    y = torch.full((3,), float(n), dtype=F64)
    _check_vs_peer(lambda z: R.distribution_focal(z, y, reduction="none"),
                   lambda z: F.cross_entropy(z, torch.full((3,), n), reduction="none"), x, what="dfl at n")
    below = R.distribution_focal(x, y - 1e-9, reduction="none")
    assert_rel_close(below, R.distribution_focal(x, y, reduction="none"), 1e-8, "continuity at n")
    with pytest.raises((IndexError, RuntimeError)):  # mmdet's own formula indexes bin n + 1 there
        mmdet_dfl(x, y)


def test_dfl_ultralytics_weighting_is_mean_with_avg_factor():
    reg_max = 16
    m = 7
    x = _logits((m * 4, reg_max), seed=21)
    g = _gen(21)
    ltrb = (reg_max - 1 - 0.01) * torch.rand(m, 4, generator=g, dtype=F64)
    weight = torch.rand(m, 1, generator=g, dtype=F64)
    tss = 5.5
    _check_vs_peer(lambda z: R.distribution_focal(z, ltrb.reshape(-1), weight=weight.expand(m, 4).reshape(-1),
                                                  reduction="mean", avg_factor=4 * tss),
                   lambda z: ultralytics_bbox_dfl(z, ltrb, weight, tss, reg_max), x, what="ultralytics dfl")


@pytest.mark.parametrize("reduction,avg", [("mean", None), ("sum", None), ("none", None), ("mean", 4.0)])
def test_dfl_weight_reductions_and_zero_weight_nan(reduction, avg):
    x = _logits((10, 8), seed=22)
    y = 7 * torch.rand(10, generator=_gen(22), dtype=F64)
    w = torch.rand(10, generator=_gen(23), dtype=F64)
    w[4] = 0.0
    x_nan = x.clone()
    x_nan[4, 3] = float("nan")
    ours_avg = None if avg is None else avg + MMDET_EPS
    lo, go = _loss_grad(lambda z: R.distribution_focal(z, y, weight=w, reduction=reduction, avg_factor=ours_avg), x_nan)
    x_ok = x.clone()
    x_ok[4] = 0.0
    lp, gp = _loss_grad(lambda z: mmdet_weight_reduce_loss(mmdet_dfl(z, y), w, reduction, avg), x_ok)
    assert_rel_close(lo, lp, 1e-12, "loss")
    assert_rel_close(go, gp, 1e-12, "grad")
    assert bool(torch.isfinite(go).all()) and bool((go[4] == 0).all())


# ---------------------------------------------------------------------------------------------
# Asymmetric
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(gamma_pos=0.0, gamma_neg=4.0),
                                dict(gamma_pos=2.0, gamma_neg=3.0, clip=0.1),
                                dict(clip=0.0), dict(clip=None, eps=1e-6), dict(gamma_pos=0.0, gamma_neg=0.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_asl_vs_timm(kw, soft):
    x = _logits((9, 12), seed=30)
    y = _soft_target((9, 12), seed=30) if soft else (torch.rand(9, 12, generator=_gen(31)) < 0.3).to(F64)
    _check_vs_peer(lambda z: R.asymmetric(z, y, **kw), lambda z: timm_asl(z, y, **kw), x, tol=1e-11, what="asl")


def test_asl_reductions_vs_timm():
    x = _logits((6, 10), seed=32)
    y = (torch.rand(6, 10, generator=_gen(32)) < 0.4).to(F64)
    for ours, theirs in [(dict(reduction="none"), "none"), (dict(reduction="mean"), "mean"),
                         (dict(reduction="mean", avg_factor=6), "batchmean"), (dict(), "sum")]:
        _check_vs_peer(lambda z: R.asymmetric(z, y, **ours), lambda z: timm_asl(z, y, reduction=theirs), x,
                       tol=1e-11, what=theirs)


def test_asl_detach_focusing_is_timm_disable_grad_and_changes_only_the_gradient():
    x = _logits((8, 7), seed=33)
    y = (torch.rand(8, 7, generator=_gen(33)) < 0.4).to(F64)
    _check_vs_peer(lambda z: R.asymmetric(z, y, detach_focusing=True),
                   lambda z: timm_asl(z, y, disable_grad_focal=True), x, tol=1e-11, what="asl detached")
    l1, g1 = _loss_grad(lambda z: R.asymmetric(z, y), x)
    l2, g2 = _loss_grad(lambda z: R.asymmetric(z, y, detach_focusing=True), x)
    assert_rel_close(l1, l2, 0.0, "loss")
    assert (g1 - g2).abs().max() > 1e-3


def test_asl_probability_shift_below_clip_gives_zero():
    # a negative with p < clip: p_m = 0, the loss and its gradient are exactly 0
    x = torch.tensor([[math.log(0.01 / 0.99), 0.0]], dtype=F64, requires_grad=True)
    y = torch.tensor([[0.0, 0.0]], dtype=F64)
    out = R.asymmetric(x, y, reduction="none")
    out.sum().backward()
    out = out.detach()
    assert float(out[0, 0]) == 0.0 and float(x.grad[0, 0]) == 0.0
    assert_rel_close(out[0, 1], -(0.5 - 0.05) ** 4 * torch.log(torch.tensor(0.55, dtype=F64)), 1e-14, "p = 0.5")


def test_asl_weight_and_zero_weight_nan():
    x = _logits((5, 6), seed=34)
    y = (torch.rand(5, 6, generator=_gen(34)) < 0.4).to(F64)
    w = torch.rand(5, generator=_gen(35), dtype=F64)
    w[2] = 0.0
    x_nan = x.clone()
    x_nan[2] = float("nan")
    lo, go = _loss_grad(lambda z: R.asymmetric(z, y, weight=w), x_nan)
    assert_rel_close(lo, (timm_asl(x, y, reduction="none") * w[:, None]).sum(), 1e-12, "loss")
    assert bool(torch.isfinite(go).all()) and bool((go[2] == 0).all())


# ---------------------------------------------------------------------------------------------
# Poly-1
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [1.0, -1.0, 2.5])
def test_poly1_ce_vs_peer(epsilon):
    x = _logits((12, 6), seed=40)
    t = torch.randint(0, 6, (12,), generator=_gen(40))
    _check_vs_peer(lambda z: R.focal_poly1(z, t, epsilon=epsilon, gamma=0.0, reduction="none"),
                   lambda z: poly1_ce(z, t, epsilon), x, what="poly1 ce")


@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (0.5, [0.2, 0.8, 1.0, 0.5, 0.3])])
def test_poly1_softmax_focal_paper_formula_channel_second_ignored(gamma, alpha):
    x = _logits((2, 5, 3, 4), seed=41)
    t = torch.randint(0, 5, (2, 3, 4), generator=_gen(41))
    t[0, 1, 2] = -100
    eps = 1.5

    def peer(z):
        rows = z.movedim(1, -1).reshape(-1, 5)
        tt = t.reshape(-1)
        keep = tt != -100
        logp = torch.log_softmax(rows[keep], -1).gather(1, tt[keep, None])[:, 0]
        pt = logp.exp()
        a = 1.0 if alpha is None else torch.tensor(alpha, dtype=F64)[tt[keep]]
        return (-a * (1 - pt) ** gamma * logp + eps * (1 - pt) ** (gamma + 1)).sum() / keep.sum()

    ours_alpha = None if alpha is None else torch.tensor(alpha, dtype=F64)  # validated form: a (C,) tensor
    _check_vs_peer(lambda z: R.focal_poly1(z, t, epsilon=eps, gamma=gamma, alpha=ours_alpha), peer, x,
                   what="poly1 focal")


def test_poly1_ce_label_smoothing_paper_code():
    x = _logits((8, 4), seed=42)
    t = torch.randint(0, 4, (8,), generator=_gen(42))
    ls, eps = 0.1, 1.0

    def peer(z):
        q = F.one_hot(t, 4).to(F64) * (1 - ls) + ls / 4
        return F.cross_entropy(z, t, label_smoothing=ls, reduction="none") + eps * (1 - (q * z.softmax(-1)).sum(-1))

    _check_vs_peer(lambda z: R.focal_poly1(z, t, epsilon=eps, gamma=0.0, label_smoothing=ls, reduction="none"), peer, x,
                   what="poly1 smoothing")


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.0)])
def test_poly1_sigmoid_focal_vs_peer(alpha, gamma):
    x = _logits((10, 5), seed=43)
    labels = torch.randint(0, 6, (10,), generator=_gen(43))  # 5 = background
    onehot = F.one_hot(labels, 6)[:, :5].to(F64)
    _check_vs_peer(lambda z: R.sigmoid_focal_poly1(z, labels, epsilon=2.0, alpha=alpha, gamma=gamma),
                   lambda z: poly1_sigmoid_focal(z, onehot, 2.0, alpha, gamma), x, what="poly1 sigmoid")


def test_poly1_epsilon_zero_is_the_existing_focal_and_sigmoid_focal():
    x = _logits((7, 4), seed=44)
    t = torch.randint(0, 4, (7,), generator=_gen(44))
    t[2] = -100
    w = torch.rand(7, generator=_gen(45), dtype=F64)
    assert_rel_close(R.focal_poly1(x, t, epsilon=0.0, weight=w, reduction="none"),
                     R.focal(x, t, weight=w, reduction="none"), 1e-15, "focal")
    labels = torch.randint(0, 5, (7,), generator=_gen(46))
    labels[0] = -100
    assert_rel_close(R.sigmoid_focal_poly1(x, labels, epsilon=0.0, reduction="mean"),
                     R.sigmoid_focal(x, labels, reduction="mean"), 1e-15, "sigmoid focal")


def test_poly1_ignored_and_zero_weight_nan():
    x = _logits((6, 4), seed=47)
    t = torch.randint(0, 4, (6,), generator=_gen(47))
    t[1] = -100
    w = torch.ones(6, dtype=F64)
    w[3] = 0.0
    x_nan = x.clone()
    x_nan[3] = float("nan")
    x_nan[1] = float("inf")
    lo, go = _loss_grad(lambda z: R.focal_poly1(z, t, epsilon=1.0, weight=w, reduction="mean"), x_nan)
    keep = (t != -100) & (w != 0)
    # 'mean' over 5 samples: the ignored one is not counted, the zero-weight one is
    lp, _ = _loss_grad(lambda z: poly1_ce(z[keep], t[keep], 1.0).sum() / 5, x)
    lo0, _ = _loss_grad(lambda z: R.focal_poly1(z, t, epsilon=1.0, gamma=0.0, weight=w, reduction="mean"), x_nan)
    assert_rel_close(lo0, lp, 1e-12, "poly1 ce mean")
    assert bool(torch.isfinite(go).all()) and bool((go[1] == 0).all()) and bool((go[3] == 0).all())
    labels = torch.tensor([0, 4, -100, 2, 1, 3])
    x_nan = x.clone()
    x_nan[2] = float("inf")  # ignored row
    x_nan[3] = float("nan")  # zero-weight row
    lo, go = _loss_grad(lambda z: R.sigmoid_focal_poly1(z, labels, weight=w, reduction="sum"), x_nan)
    assert bool(torch.isfinite(go).all()) and bool((go[2:4] == 0).all())
    onehot = F.one_hot(labels.clamp_min(0), 5)[:, :4].to(F64)
    rows = torch.tensor([0, 1, 4, 5])
    assert_rel_close(lo, poly1_sigmoid_focal(x[rows], onehot[rows], 1.0, 0.25, 2.0).sum(), 1e-12, "sigmoid poly1 sum")


# ---------------------------------------------------------------------------------------------
# Common: gradcheck, avg_factor rules, dtypes
# ---------------------------------------------------------------------------------------------
def _gradcheck_cases():
    labels = torch.tensor([0, 3, 1, 2])
    scores = torch.tensor([0.3, 0.9, 0.0, 0.6], dtype=F64)
    soft = torch.tensor([[0.0, 0.4, 1.0], [0.7, 0.0, 0.0], [0.0, 0.0, 0.2], [1.0, 0.5, 0.0]], dtype=F64)
    multi = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.3, 0.0]], dtype=F64)
    dfl_y = torch.tensor([0.25, 1.5, 2.0, 0.7], dtype=F64)  # 3 bins: n = 2, one label at n
    t = torch.tensor([0, 2, 1, 2])
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=F64)
    return {
        "qfl label": lambda z: R.quality_focal(z, labels, score=scores, weight=w, reduction="sum"),
        "qfl dense": lambda z: R.quality_focal(z, soft, beta=1.5),
        "qfl activated": lambda z: R.quality_focal(torch.sigmoid(z), soft, activated=True),
        "vfl dense": lambda z: R.varifocal(z, soft, reduction="none"),
        "vfl label": lambda z: R.varifocal(z, labels, score=scores, iou_weighted=False, avg_factor=3.0),
        "dfl": lambda z: R.distribution_focal(z, dfl_y, weight=w, reduction="none"),
        "asl": lambda z: R.asymmetric(z, multi, clip=0.0),
        "asl soft": lambda z: R.asymmetric(z, soft, gamma_pos=0.5),
        "poly1 focal": lambda z: R.focal_poly1(z, t, epsilon=1.0, gamma=2.0, label_smoothing=0.1),
        "poly1 sigmoid": lambda z: R.sigmoid_focal_poly1(z, labels, epsilon=-0.5),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_float64(name):
    fn = _gradcheck_cases()[name]
    x = _logits((4, 3), seed=50, scale=1.5).requires_grad_(True)
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dfl_gradcheck_more_bins():
    y = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=F64)  # 0, an edge, between bins, n
    x = _logits((4, 5), seed=51).requires_grad_(True)
    assert gradcheck(lambda z: R.distribution_focal(z, y, reduction="none"), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [
    lambda x: R.quality_focal(x, _soft_target((3, 4), 1), reduction="sum", avg_factor=2.0),
    lambda x: R.varifocal(x, _soft_target((3, 4), 1), reduction="none", avg_factor=2.0),
    lambda x: R.distribution_focal(x, torch.ones(3, dtype=F64), reduction="sum", avg_factor=2.0),
    lambda x: R.asymmetric(x, _soft_target((3, 4), 1), avg_factor=2.0),
])
def test_avg_factor_needs_mean(fn):
    with pytest.raises(ValueError, match="avg_factor"):
        fn(_logits((3, 4), seed=52))


def test_avg_factor_tensor_on_device_no_host_read():
    x = _logits((5, 4), seed=53)
    t = _soft_target((5, 4), seed=53)
    a = torch.tensor(2.5, dtype=torch.float32)
    assert_rel_close(R.varifocal(x, t, avg_factor=a), R.varifocal(x, t, reduction="sum") / 2.5, 1e-15, "avg tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x64 = _logits((16, 6), seed=54, scale=2.0)
    x = x64.to(dtype)
    t = _soft_target((16, 6), seed=54)
    labels, scores = _labels_scores(16, 6, seed=54)
    y = torch.rand(16, generator=_gen(54), dtype=F64) * 5
    cases = [
        lambda z: R.quality_focal(z, labels, score=scores, reduction="sum"),
        lambda z: R.varifocal(z, t, reduction="sum"),
        lambda z: R.distribution_focal(z, y, reduction="sum"),
        lambda z: R.asymmetric(z, (t > 0).to(F64)),
        lambda z: R.sigmoid_focal_poly1(z, labels, reduction="sum"),
        lambda z: R.focal_poly1(z, labels.clamp_max(5), reduction="sum"),
    ]
    for fn in cases:
        out = fn(x)
        assert out.dtype == torch.float32
        # the inputs are rounded to `dtype`; the math itself is float32: compare with float64 on the same inputs
        assert_rel_close(out.double(), fn(x.double()), 1e-5, f"{dtype}")
    assert R.varifocal(x, t, reduction="none").dtype == dtype
    assert R.quality_focal(x, t, reduction="none").shape == (16,)


def test_leading_dims_are_rows():
    # QFL / VFL on (B, A, C) with (B, A) labels, DFL on (B, A, 4, n + 1): the same as flattened rows
    x = _logits((2, 5, 4), seed=60)
    labels = torch.randint(0, 5, (2, 5), generator=_gen(60))
    scores = torch.rand(2, 5, generator=_gen(61), dtype=F64)
    for fn in (R.quality_focal, R.varifocal):
        out = fn(x, labels, score=scores, reduction="none")
        flat = fn(x.reshape(10, 4), labels.reshape(10), score=scores.reshape(10), reduction="none")
        assert_rel_close(out.reshape(flat.shape), flat, 0.0, fn.__name__)
    xd = _logits((2, 3, 4, 6), seed=62)
    y = 5 * torch.rand(2, 3, 4, generator=_gen(62), dtype=F64)
    out = R.distribution_focal(xd, y, reduction="none")
    assert out.shape == (2, 3, 4)
    assert_rel_close(out.reshape(-1), mmdet_dfl(xd.reshape(-1, 6), y.reshape(-1)), 1e-13, "dfl leading dims")


def test_asl_per_class_weight_is_a_per_element_weight_as_newer_timm():
    x = _logits((6, 5), seed=63)
    y = (torch.rand(6, 5, generator=_gen(63)) < 0.4).to(F64)
    wc = torch.rand(5, generator=_gen(64), dtype=F64)
    _check_vs_peer(lambda z: R.asymmetric(z, y, weight=wc.expand(6, 5), reduction="mean", avg_factor=6),
                   lambda z: (timm_asl(z, y, reduction="none") * wc).sum() / 6, x, tol=1e-11, what="per-class weight")


def test_poly1_focal_from_probabilities():
    x = _logits((7, 4), seed=65)
    t = torch.randint(0, 4, (7,), generator=_gen(65))
    probs = torch.softmax(x, -1)
    assert_rel_close(R.focal_poly1(probs, t, epsilon=1.0, from_logits=False, reduction="none"),
                     R.focal_poly1(x, t, epsilon=1.0, reduction="none"), 1e-13, "from_logits=False")
