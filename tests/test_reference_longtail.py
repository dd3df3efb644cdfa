"""The long-tail references (issue #25: Seesaw, EQLv2, EFL) against the peers' own definitions, written
out here in a few lines of float64 torch each, independently of fused_losses.reference's code path,
over several consecutive steps with the state carried:

- mmdet 3.x mmdet/models/losses/seesaw_loss.py (SeesawLoss.forward: cum_samples updated with the
  batch's labels BEFORE the loss; seesaw_ce_loss; the C + 2 objectness layout, return_dict) with
  cross_entropy_loss.py (cross_entropy) and utils.py (weight_reduce_loss, 3.x's float32 eps);
- the EQLv2 authors' code, tztztztztz/eqlv2 mmdet/models/losses/eqlv2.py (EQLv2: three buffers,
  weights from the statistics of the previous steps, collect_grad in forward after the loss), and
  the same statistics gathered by a real backward hook on the logits (|dL/dx| x n_i);
- ModelTC/United-Perception up/tasks/det/plugins/efl/models/losses/efl.py (EqualizedFocalLoss) with
  its statistics from a real backward hook on the logits (its GradientCollector), _reduce.
The peer commits read are listed in docs/losses/longtail.md. The peers keep their buffers in
float32 (registered buffers); the paraphrases here do too, and compute everything else in float64.
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
STEPS = 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, seed, scale=3.0, dtype=F64):
    return (scale * torch.randn(shape, generator=_gen(seed), dtype=F64)).to(dtype)


def _long_tail_labels(n, c, seed, bg=None, ignore_frac=0.0):
    """Labels drawn from a long-tailed law over [0, c) (class k with weight 1 / (k + 1)^1.5, so the last
    classes are rarely or never seen), a fraction of background label `bg` and of ignored rows."""
    g = _gen(seed + 500)
    probs = torch.tensor([1.0 / (k + 1) ** 1.5 for k in range(c)], dtype=F64)
    labels = torch.multinomial(probs, n, replacement=True, generator=g)
    if bg is not None:
        labels[torch.rand(n, generator=g) < 0.4] = bg
    if ignore_frac > 0:
        labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return labels


def _row_weight(n, seed, zeros=True):
    w = torch.rand(n, generator=_gen(seed + 900), dtype=F64) + 0.5
    if zeros and n >= 3:
        w[1] = 0.0
    return w


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
    assert reduction == "none"
    return loss


def mmdet_seesaw_ce_loss(cls_score, labels, label_weights, cum_samples, num_classes, p, q, eps, reduction,
                         avg_factor):
    """mmdet 3.x seesaw_ce_loss: the factors as a product of powers, then logits + log(w) (1 - onehot)."""
    onehot = F.one_hot(labels, num_classes)
    seesaw_weights = cls_score.new_ones(onehot.size())
    if p > 0:
        n = cum_samples.to(F64)  # mmdet: its float32 buffer (exact integer counts), ratio in float32
        ratio = n[None, :].clamp(min=1) / n[:, None].clamp(min=1)
        index = (ratio < 1.0).to(F64)
        seesaw_weights = seesaw_weights * (ratio.pow(p) * index + (1 - index))[labels, :]
    if q > 0:
        scores = F.softmax(cls_score.detach(), dim=1)
        self_scores = scores[torch.arange(len(scores)), labels]
        score_matrix = scores / self_scores[:, None].clamp(min=eps)
        index = (score_matrix > 1.0).to(F64)
        seesaw_weights = seesaw_weights * (score_matrix.pow(q) * index + (1 - index))
    cls_score = cls_score + seesaw_weights.log() * (1 - onehot)
    loss = F.cross_entropy(cls_score, labels, reduction="none")
    return mmdet_weight_reduce_loss(loss, label_weights, reduction, avg_factor)


class MMDetSeesaw:
    """mmdet 3.x SeesawLoss (use_sigmoid=False, loss_weight=1): a float32 cum_samples buffer of
    C + 1, updated with every label of the batch first; logits (N, C + 2)."""

    def __init__(self, num_classes, p=0.8, q=2.0, eps=1e-2, return_dict=True):
        self.c, self.p, self.q, self.eps, self.return_dict = num_classes, p, q, eps, return_dict
        self.cum_samples = torch.zeros(num_classes + 1, dtype=torch.float32)

    def __call__(self, cls_score, labels, label_weights=None, avg_factor=None, reduction="mean"):
        pos = labels < self.c
        obj_labels = (labels == self.c).long()
        for u in labels.unique():
            self.cum_samples[u] += (labels == u.item()).sum()
        label_weights = (label_weights if label_weights is not None
                         else labels.new_ones(labels.size(), dtype=F64))
        classes, objectness = cls_score[..., :-2], cls_score[..., -2:]
        if pos.sum() > 0:
            loss_classes = mmdet_seesaw_ce_loss(classes[pos], labels[pos], label_weights[pos],
                                                self.cum_samples[:self.c], self.c, self.p, self.q, self.eps,
                                                reduction, avg_factor)
        else:
            loss_classes = classes[pos].sum()
        loss_obj = mmdet_weight_reduce_loss(F.cross_entropy(objectness, obj_labels, reduction="none"),
                                            label_weights, reduction, avg_factor)
        if self.return_dict:
            return {"loss_cls_objectness": loss_obj, "loss_cls_classes": loss_classes}
        return loss_classes + loss_obj


class AuthorsEQLv2:
    """tztztztztz/eqlv2 EQLv2 (newer version: three float32 buffers, pos_neg starting at 100), logits
    (N, C + 1) with the last column the background/objectness logit; loss_weight 1.
    hook=False: collect_grad in forward, right after the loss, from the detached logits, as the
    authors do. hook=True: the statistics from a real backward hook on the logits: the gradient of
    sum(w * BCE) / n_i is w (sigmoid(x) - y) / n_i, so |grad| * n_i."""

    def __init__(self, num_classes, gamma=12.0, mu=0.8, alpha=4.0, hook=False):
        self.c, self.gamma, self.mu, self.alpha, self.hook = num_classes, gamma, mu, alpha, hook
        self.pos_grad = torch.zeros(num_classes, dtype=torch.float32)
        self.neg_grad = torch.zeros(num_classes, dtype=torch.float32)
        self.pos_neg = torch.ones(num_classes, dtype=torch.float32) * 100

    def get_weight(self, n_i, n_c):
        f = 1 / (1 + torch.exp(-self.gamma * (self.pos_neg.to(F64) - self.mu)))
        neg_w = torch.cat([f, torch.ones(1, dtype=F64)])
        pos_w = 1 + self.alpha * (1 - neg_w)
        return pos_w.view(1, -1).expand(n_i, n_c), neg_w.view(1, -1).expand(n_i, n_c)

    def collect(self, grad, target):
        pos_grad = torch.sum(grad * target, dim=0)[:-1]
        neg_grad = torch.sum(grad * (1 - target), dim=0)[:-1]
        self.pos_grad += pos_grad
        self.neg_grad += neg_grad
        self.pos_neg = self.pos_grad / (self.neg_grad + 1e-10)

    def __call__(self, cls_score, label):
        n_i, n_c = cls_score.size()
        target = cls_score.new_zeros(n_i, n_c)
        target[torch.arange(n_i), label] = 1
        pos_w, neg_w = self.get_weight(n_i, n_c)
        weight = pos_w * target + neg_w * (1 - target)
        cls_loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        cls_loss = torch.sum(cls_loss * weight) / n_i
        if self.hook:
            def hook(grad):
                self.collect(torch.abs(grad.detach()) * n_i, target)
            cls_score.register_hook(hook)
        else:
            prob = torch.sigmoid(cls_score.detach())
            grad = torch.abs(target * (prob - 1) + (1 - target) * prob)
            self.collect(grad * weight.detach(), target)
        return cls_loss

    def state(self):
        return torch.stack([self.pos_grad, self.neg_grad, self.pos_neg])


def _loss_grad(fn, x, seed=7):
    """(loss, d loss / dx) for a scalar or tensor loss (a fixed random cotangent for tensors)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    total = (out * torch.randn(out.shape, generator=_gen(seed), dtype=out.dtype)).sum() if out.dim() else out
    (grad,) = torch.autograd.grad(total, x)
    return out.detach(), grad


# ---------------------------------------------------------------------------------------------
# Seesaw
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.8, 0.0), (0.0, 2.0), (1.5, 1.0)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction,avg", [("mean", None), ("sum", None), ("mean", 7.0)])
def test_seesaw_objectness_matches_mmdet_over_steps(p, q, weighted, reduction, avg):
    c, n = 9, 24
    peer = MMDetSeesaw(c, p=p, q=q, return_dict=True)
    cum = torch.zeros(c + 1, dtype=torch.float32)
    kw = dict(p=p, q=q, objectness=True, reduction=reduction, avg_factor=None if avg is None else avg + MMDET_EPS,
              return_dict=True)
    for step in range(STEPS):
        x = _logits((n, c + 2), seed=10 * step + 1)
        labels = _long_tail_labels(n, c, seed=step, bg=c)
        w = _row_weight(n, step) if weighted else None
        ours_copy, peer_copy = cum.clone(), MMDetSeesaw(c, p=p, q=q)
        peer_copy.cum_samples = peer.cum_samples.clone()
        lo, go = _loss_grad(lambda z: sum(R.seesaw(z, labels, cum, weight=w, **kw).values()), x)
        lp, gp = _loss_grad(lambda z: sum(peer(z, labels, w, avg, reduction).values()), x)
        assert torch.equal(cum, peer.cum_samples), f"step {step}: cum_samples"
        assert cum.dtype == torch.float32 and cum.shape == (c + 1,)
        assert_rel_close(lo, lp, 1e-12, f"step {step} loss")
        assert_rel_close(go, gp, 1e-12, f"step {step} grad")
        d, pd = R.seesaw(x, labels, ours_copy, weight=w, **kw), peer_copy(x, labels, w, avg, reduction)
        for key in ("loss_cls_objectness", "loss_cls_classes"):
            assert_rel_close(d[key], pd[key], 1e-12, f"step {step} {key}")


def test_seesaw_update_before_loss_and_counts():
    """mmdet's order: the batch's own labels are counted before its loss (a class seen for the first
    time in this batch has N_i >= 1 there), background rows count at index C, ignored rows nowhere."""
    c = 4
    cum = torch.tensor([5.0, 0.0, 0.0, 0.0, 3.0])
    labels = torch.tensor([1, 1, 4, -100, 0])
    x = _logits((5, c + 2), seed=3)
    R.seesaw(x, labels, cum, objectness=True, q=0.0)
    assert torch.equal(cum, torch.tensor([6.0, 2.0, 0.0, 0.0, 4.0]))
    # the loss used the counts after this batch's update: row 0 (label 1, N = 2) mitigates class 0? no:
    # N_0 = 6 > N_1 = 2, so only the classes with fewer samples (2, 3: N = 0 -> 1) get (1/2)^p
    log_f = R.seesaw_log_factors(cum[:c], torch.tensor([1]), x[:1, :c], p=0.8, q=0.0, eps=1e-2)
    expect = torch.tensor([[0.0, 0.0, 0.8 * math.log(0.5), 0.8 * math.log(0.5)]], dtype=F64)
    assert torch.equal(log_f, expect)


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (2.0, 3.0)])
def test_seesaw_plain_matches_mmdet_ce_over_steps(p, q):
    """objectness=False: mmdet's seesaw_ce_loss on (N, C) with SeesawLoss's order of updates (the
    batch counted first); ignored rows are rows removed (mmdet has no ignore_index)."""
    c, n = 7, 20
    cum = torch.zeros(c, dtype=torch.float32)
    peer_cum = torch.zeros(c, dtype=torch.float32)
    for step in range(STEPS):
        x = _logits((n, c), seed=step + 40)
        labels = _long_tail_labels(n, c, seed=step + 40, ignore_frac=0.2)
        w = _row_weight(n, step)
        keep = labels != -100
        lo, go = _loss_grad(lambda z: R.seesaw(z, labels, cum, p=p, q=q, weight=w), x)
        for u in labels[keep].unique():
            peer_cum[u] += (labels[keep] == u).sum()
        lp, gp_kept = _loss_grad(
            lambda z: mmdet_seesaw_ce_loss(z, labels[keep], w[keep], peer_cum, c, p, q, 1e-2, "mean", None), x[keep])
        assert torch.equal(cum, peer_cum)
        assert_rel_close(lo, lp, 1e-12, f"step {step} loss")
        assert_rel_close(go[keep], gp_kept, 1e-12, f"step {step} grad")
        assert torch.equal(go[~keep], torch.zeros_like(go[~keep]))
        assert torch.equal(go[1], torch.zeros_like(go[1]))  # zero weight (row 1)


def test_seesaw_gradient_is_softmax_of_adjusted_logits():
    """The factors carry no gradient (mmdet detaches the scores; the counts are a buffer):
    d loss_i / dx = w_i (softmax(x + L) - onehot) / n for 'mean'."""
    c, n = 6, 10
    cum = torch.tensor([50.0, 20.0, 5.0, 1.0, 0.0, 0.0])
    x = _logits((n, c), seed=5)
    labels = _long_tail_labels(n, c, seed=5)
    _, g = _loss_grad(lambda z: R.seesaw(z, labels, cum.clone()), x)
    after = cum + torch.bincount(labels, minlength=c).float()
    z = x + R.seesaw_log_factors(after, labels, x, p=0.8, q=2.0, eps=1e-2)
    expect = (torch.softmax(z, dim=-1) - F.one_hot(labels, c)) / n
    assert_rel_close(g, expect, 1e-13, "grad")


def test_seesaw_edges():
    c = 5
    x = _logits((6, c + 2), seed=8)
    labels = torch.tensor([c, c, -100, c, -100, c])  # no foreground row
    cum = torch.zeros(c + 1)
    d = R.seesaw(x, labels, cum, objectness=True, return_dict=True)
    assert d["loss_cls_classes"].item() == 0.0 and torch.equal(cum, torch.tensor([0.0] * c + [4.0]))
    mm = MMDetSeesaw(c)
    pd = mm(x[labels != -100], labels[labels != -100])
    assert_rel_close(d["loss_cls_objectness"], pd["loss_cls_objectness"], 1e-12, "objectness only")
    # every row ignored: 0 loss, 0 gradient, state untouched
    cum = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    before = cum.clone()
    lo, go = _loss_grad(lambda z: R.seesaw(z, torch.full((6,), -100), cum, objectness=True), x)
    assert lo.item() == 0.0 and torch.equal(go, torch.zeros_like(go)) and torch.equal(cum, before)
    # zero weight: a NaN logit there gives 0 loss, 0 gradient, and the row is still counted (mmdet counts labels)
    xn = x.clone()
    xn[0] = math.nan
    cum = torch.zeros(c + 1)
    w = torch.ones(6, dtype=F64)
    w[0] = 0.0
    labels = torch.tensor([2, 0, 1, c, 2, 0])
    lo, go = _loss_grad(lambda z: R.seesaw(z, labels, cum, objectness=True, weight=w), xn)
    assert torch.isfinite(lo) and torch.equal(go[0], torch.zeros_like(go[0]))
    assert torch.equal(cum, torch.tensor([2.0, 1.0, 2.0, 0.0, 0.0, 1.0]))
    # 'none': (N,) per loss, 0 on background/ignored rows; return_dict=False: the sum
    labels = torch.tensor([2, c, -100, 0, 1, c])
    nd = R.seesaw(x, labels, torch.zeros(c + 1), objectness=True, reduction="none", return_dict=True)
    assert nd["loss_cls_classes"].shape == (6,) and nd["loss_cls_objectness"].shape == (6,)
    assert torch.equal(nd["loss_cls_classes"][[1, 2, 5]], torch.zeros(3, dtype=F64))
    assert nd["loss_cls_objectness"][2].item() == 0.0
    total = R.seesaw(x, labels, torch.zeros(c + 1), objectness=True)
    parts = R.seesaw(x, labels, torch.zeros(c + 1), objectness=True, return_dict=True)
    assert torch.equal(total, parts["loss_cls_classes"] + parts["loss_cls_objectness"])
    with pytest.raises(ValueError, match="avg_factor"):
        R.seesaw(x, labels, torch.zeros(c + 1), objectness=True, reduction="sum", avg_factor=3.0)


def test_seesaw_never_seen_class_and_p_zero():
    """N = 0 counts as 1 (mmdet's clamp(min=1)); p = 0 and q = 0 is plain cross entropy."""
    c = 4
    x = _logits((5, c), seed=11)
    labels = torch.tensor([0, 0, 1, 0, 1])
    cum = torch.zeros(c)
    ours = R.seesaw(x, labels, cum, p=0.0, q=0.0)
    assert_rel_close(ours, F.cross_entropy(x, labels), 1e-14, "p = q = 0")
    # classes 2, 3 never seen (N = 0 -> 1): mitigation (1 / N_i)^p on them for every row
    log_f = R.seesaw_log_factors(cum, labels, x, p=0.8, q=0.0, eps=1e-2)
    n_i = cum[labels].to(F64)
    assert torch.equal(log_f[:, 2], 0.8 * torch.log(1 / n_i)) and torch.equal(log_f[:, 2], log_f[:, 3])


def test_seesaw_gradcheck_state_frozen():
    c = 5
    x = _logits((6, c + 2), seed=12, scale=1.0).requires_grad_(True)
    labels = torch.tensor([0, 1, c, 3, -100, 1])
    cum = torch.tensor([10.0, 4.0, 0.0, 1.0, 2.0, 7.0])
    w = _row_weight(6, 0)
    # q = 0: the loss is a smooth function of x (the compensation factor is detached by design, so
    # finite differences of q > 0 see a dependence autograd deliberately cuts)
    assert gradcheck(lambda z: R.seesaw(z, labels, cum.clone(), q=0.0, objectness=True, weight=w), (x,))
    plain = labels.clamp_max(c - 1)
    assert gradcheck(lambda z: R.seesaw(z[:, :c], plain, cum[:c].clone(), q=0.0, reduction="sum"), (x,))


def test_seesaw_float32_inputs_and_state_in_place():
    c, n = 8, 16
    x64 = _logits((n, c + 2), seed=13)
    labels = _long_tail_labels(n, c, seed=13, bg=c)
    cum64, cum32 = torch.zeros(c + 1), torch.zeros(c + 1)
    ptr = cum32.data_ptr()
    for _ in range(3):
        l64, g64 = _loss_grad(lambda z: R.seesaw(z, labels, cum64, objectness=True), x64)
        l32, g32 = _loss_grad(lambda z: R.seesaw(z, labels, cum32, objectness=True), x64.float())
        assert l32.dtype == torch.float32 and g32.dtype == torch.float32
        assert_rel_close(l32, l64, 1e-5, "fp32 loss")
        assert_rel_close(g32, g64, 1e-5, "fp32 grad")
    assert cum32.data_ptr() == ptr and torch.equal(cum32, cum64) and cum32.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# EQLv2
# ---------------------------------------------------------------------------------------------
def test_eqlv2_initial_weights_are_one():
    """The authors' first versions used weights 1 before any statistics; the newer pos_neg = 100
    gives f = sigmoid(12 * 99.2) = 1 exactly (float32 and float64), so both read the same."""
    pos, neg = R.eqlv2_class_weights(R.eqlv2_initial_state(7), gamma=12.0, mu=0.8, alpha=4.0)
    assert torch.equal(pos, torch.ones(7, dtype=F64)) and torch.equal(neg, torch.ones(7, dtype=F64))
    assert R.eqlv2_initial_state(7).dtype == torch.float32


@pytest.mark.parametrize("gamma,mu,alpha", [(12.0, 0.8, 4.0), (6.0, 0.5, 2.0)])
@pytest.mark.parametrize("hook", [False, True])
def test_eqlv2_objectness_matches_authors_over_steps(gamma, mu, alpha, hook):
    """Our forward-time update equals the authors' forward-time collect_grad AND a backward hook run
    in a training step (forward k, backward k, forward k + 1): the weights of step k use the
    statistics after step k - 1 either way."""
    c, n = 8, 30
    peer = AuthorsEQLv2(c, gamma, mu, alpha, hook=hook)
    state = R.eqlv2_initial_state(c)
    for step in range(STEPS):
        x = _logits((n, c + 1), seed=step + 70)
        labels = _long_tail_labels(n, c, seed=step + 70, bg=c)
        xo = x.clone().requires_grad_(True)
        lo = R.eqlv2(xo, labels, state, gamma=gamma, mu=mu, alpha=alpha, objectness=True)
        (go,) = torch.autograd.grad(lo, xo)
        xp = x.clone().requires_grad_(True)
        lp = peer(xp, labels)
        (gp,) = torch.autograd.grad(lp, xp)  # runs the hook (hook=True) before the next step
        assert_rel_close(lo, lp, 1e-12, f"step {step} loss")
        assert_rel_close(go, gp, 1e-12, f"step {step} grad")
        ps = peer.state()
        assert_rel_close(state, ps, 0.0 if not hook else 1e-6, f"step {step} state")
        assert state.dtype == torch.float32 and state.shape == (3, c)
    # the statistics moved the weights away from 1 (the test is not trivially at the initial state)
    pos_w, neg_w = R.eqlv2_class_weights(state, gamma=gamma, mu=mu, alpha=alpha)
    assert (neg_w < 0.99).any() and (pos_w > 1.01).any()


def test_eqlv2_hook_equals_forward_statistics():
    """The peer's two orders of update agree: collecting in forward == collecting in a backward hook
    (|dL/dx| n_i), to float32 rounding of the buffers, over consecutive steps."""
    c, n = 6, 25
    fwd, hk = AuthorsEQLv2(c), AuthorsEQLv2(c, hook=True)
    for step in range(STEPS):
        x = _logits((n, c + 1), seed=step + 90)
        labels = _long_tail_labels(n, c, seed=step + 90, bg=c)
        for peer in (fwd, hk):
            xp = x.clone().requires_grad_(True)
            peer(xp, labels).backward()
        assert_rel_close(fwd.state(), hk.state(), 1e-6, f"step {step}")


def test_eqlv2_plain_layout_is_objectness_without_the_background_column():
    """objectness=False on x[:, :C] == objectness=True on x minus the background column's BCE / n
    (weights 1 there); the statistics are the same."""
    c, n = 7, 20
    s1, s2 = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    for step in range(STEPS):
        x = _logits((n, c + 1), seed=step + 110)
        labels = _long_tail_labels(n, c, seed=step + 110, bg=c)
        l1, g1 = _loss_grad(lambda z: R.eqlv2(z, labels, s1, objectness=True), x)
        l2, g2 = _loss_grad(lambda z: R.eqlv2(z[:, :c], labels, s2), x)
        bg = F.binary_cross_entropy_with_logits(x[:, c], (labels == c).to(F64), reduction="sum") / n
        assert_rel_close(l2 + bg, l1, 1e-13, f"step {step} loss")
        assert_rel_close(g2[:, :c], g1[:, :c], 1e-13, f"step {step} grad")
        assert torch.equal(s1, s2)


def test_eqlv2_ignored_and_weighted_rows():
    """Ignored rows are rows removed (loss, count, statistics); a per-row weight w scales the loss and
    the statistics (|d(sum loss)/dx|); zero weight with a NaN logit: 0 loss, 0 gradient, no statistics."""
    c, n = 5, 18
    state, peer = R.eqlv2_initial_state(c), AuthorsEQLv2(c)
    for step in range(STEPS):
        x = _logits((n, c + 1), seed=step + 130)
        labels = _long_tail_labels(n, c, seed=step + 130, bg=c, ignore_frac=0.25)
        keep = labels != -100
        lo, go = _loss_grad(lambda z: R.eqlv2(z, labels, state, objectness=True), x)
        lp, gp = _loss_grad(lambda z: peer(z, labels[keep]), x[keep])
        assert_rel_close(lo, lp, 1e-12, f"step {step} loss")
        assert_rel_close(go[keep], gp, 1e-12, f"step {step} grad")
        assert torch.equal(go[~keep], torch.zeros_like(go[~keep]))
        assert torch.equal(state, peer.state())
    # weights: integer row weight k == the row repeated k times (loss sum, grad and statistics)
    x = _logits((4, c), seed=150)
    labels = torch.tensor([0, 2, c, 1])
    w = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=F64)
    xn = x.clone()
    xn[2] = math.nan
    sa, sb = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    for k in range(2):  # second step: non-trivial weights from the first step's statistics
        la, ga = _loss_grad(lambda z: R.eqlv2(z, labels, sa, weight=w, reduction="sum"), xn)
        rep = torch.tensor([0, 1, 1, 1, 3, 3])
        lb = R.eqlv2(x[rep], labels[rep], sb, reduction="sum")
        assert_rel_close(la, lb, 1e-13, f"step {k} weighted == repeated")
        assert torch.equal(ga[2], torch.zeros(c, dtype=F64))
        assert_rel_close(sa[:2], sb[:2], 1e-6, f"step {k} statistics")
    # every row ignored: 0 loss and gradient; pos/neg unchanged and pos_neg recomputed from them, as the
    # authors' collect_grad on an empty batch (documented trap: the initial 100 becomes 0 / 1e-10 = 0)
    st = R.eqlv2_initial_state(c)
    lo, go = _loss_grad(lambda z: R.eqlv2(z, torch.full((4,), -100), st), x)
    assert lo.item() == 0.0 and torch.equal(go, torch.zeros_like(go))
    assert torch.equal(st[:2], torch.zeros(2, c)) and torch.equal(st[2], torch.zeros(c))


def test_eqlv2_per_element_weight_and_reductions():
    c, n = 4, 6
    x = _logits((n, c), seed=160)
    labels = torch.tensor([0, 1, c, 3, c, 2])
    we = torch.rand((n, c), generator=_gen(161), dtype=F64)
    st = R.eqlv2_initial_state(c)
    st[0] = torch.tensor([1.0, 2.0, 0.5, 0.0])
    st[1] = torch.tensor([2.0, 2.0, 4.0, 3.0])
    st[2] = st[0] / (st[1] + 1e-10)
    none = R.eqlv2(x, labels, st.clone(), weight=we, reduction="none")
    assert none.shape == (n, c) and none.dtype == F64
    pos_w, neg_w = R.eqlv2_class_weights(st, gamma=12.0, mu=0.8, alpha=4.0)
    y = F.one_hot(labels, c + 1)[:, :c].to(F64)
    expect = we * (pos_w * y + neg_w * (1 - y)) * F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert_rel_close(none, expect, 1e-13, "elementwise")
    assert_rel_close(R.eqlv2(x, labels, st.clone(), weight=we), expect.sum() / n, 1e-13, "mean over rows")
    assert_rel_close(R.eqlv2(x, labels, st.clone(), weight=we, avg_factor=2.5), expect.sum() / 2.5, 1e-13, "avg_factor")
    s2 = st.clone()
    R.eqlv2(x, labels, s2, weight=we)
    g = (torch.sigmoid(x) - y).abs() * (pos_w * y + neg_w * (1 - y)) * we
    assert_rel_close(s2[0], (st[0].to(F64) + (g * y).sum(0)).float(), 0.0, "pos_grad")
    assert_rel_close(s2[1], (st[1].to(F64) + (g * (1 - y)).sum(0)).float(), 0.0, "neg_grad")


def test_eqlv2_gradcheck_state_frozen():
    c = 4
    st = R.eqlv2_initial_state(c)
    st[0] = torch.tensor([1.0, 2.0, 0.5, 0.0])
    st[1] = torch.tensor([2.0, 2.0, 1.0, 3.0])
    st[2] = st[0] / (st[1] + 1e-10)
    x = _logits((5, c + 1), seed=170, scale=1.0).requires_grad_(True)
    labels = torch.tensor([0, c, 2, -100, 1])
    w = _row_weight(5, 1)
    assert gradcheck(lambda z: R.eqlv2(z, labels, st.clone(), objectness=True, weight=w), (x,))
    assert gradcheck(lambda z: R.eqlv2(z[:, :c], labels, st.clone(), reduction="none"), (x,))


def test_eqlv2_float32_inputs_float32_state():
    c, n = 6, 40
    x64 = _logits((n, c), seed=180)
    labels = _long_tail_labels(n, c, seed=180, bg=c)
    s64, s32 = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    ptr = s32.data_ptr()
    for _ in range(3):
        l64, g64 = _loss_grad(lambda z: R.eqlv2(z, labels, s64), x64)
        l32, g32 = _loss_grad(lambda z: R.eqlv2(z, labels, s32), x64.float())
        assert l32.dtype == torch.float32
        assert_rel_close(l32, l64, 1e-5, "fp32 loss")
        assert_rel_close(g32, g64, 1e-5, "fp32 grad")
        assert_rel_close(s32, s64, 1e-5, "fp32 state")
    assert s32.data_ptr() == ptr and s32.dtype == torch.float32 and not s32.requires_grad


# ---------------------------------------------------------------------------------------------
# EFL (United-Perception EqualizedFocalLoss)
# ---------------------------------------------------------------------------------------------
class UPEqualizedFocal:
    """ModelTC/United-Perception EqualizedFocalLoss (loss_weight 1) with its statistics from a real
    backward hook on the logits (its GradientCollector hooks the classifier's output gradient):
    labels 0 = background, k = class k - 1, ignore_index -1; _reduce('mean') = sum / normalizer,
    the normalizer 1.0 when not given."""

    def __init__(self, num_classes, gamma=2.0, alpha=0.25, scale_factor=8.0):
        self.c, self.gamma, self.alpha, self.scale = num_classes, gamma, alpha, scale_factor
        self.pos_grad = torch.zeros(num_classes, dtype=torch.float32)
        self.neg_grad = torch.zeros(num_classes, dtype=torch.float32)
        self.pos_neg = torch.ones(num_classes, dtype=torch.float32)

    def __call__(self, x, target, reduction="mean", normalizer=None):
        n_i = x.shape[0]
        expand = x.new_zeros(n_i, self.c + 1)
        expand[torch.arange(n_i), target] = 1
        expand = expand[:, 1:]
        mask = target != -1
        pred = torch.sigmoid(x[mask])
        t = expand[mask]
        pred_t = pred * t + (1 - pred) * (1 - t)
        ff = (self.gamma + self.scale * (1 - self.pos_neg.to(F64))).view(1, -1).expand(n_i, self.c)[mask]
        wf = ff / self.gamma
        loss = -torch.log(pred_t) * torch.pow(1 - pred_t, ff) * wf
        if self.alpha >= 0:
            loss = (self.alpha * t + (1 - self.alpha) * (1 - t)) * loss
        normalizer = 1.0 if normalizer is None else normalizer
        out = loss if reduction == "none" else loss.sum() / normalizer if reduction == "mean" else loss.sum()

        def hook(grad):
            g = torch.abs(grad.detach())[mask]
            self.pos_grad += torch.sum(g * t, dim=0)
            self.neg_grad += torch.sum(g * (1 - t), dim=0)
            self.pos_neg = torch.clamp(self.pos_grad / (self.neg_grad + 1e-10), min=0, max=1)
        x.register_hook(hook)
        return out

    def state(self):
        return torch.stack([self.pos_grad, self.neg_grad, self.pos_neg])


def _to_up_labels(labels, c):
    """Ours (C = background, -100 ignored) -> United-Perception's (0 = background, -1 ignored)."""
    return torch.where(labels == -100, -1, torch.where(labels == c, 0, labels + 1))


@pytest.mark.parametrize("reduction,normalizer", [("mean", 7.5), ("mean", None), ("sum", None)])
@pytest.mark.parametrize("alpha,scale", [(0.25, 8.0), (-1.0, 4.0)])
def test_efl_matches_united_perception_hook_over_steps(reduction, normalizer, alpha, scale):
    """The statistics of step k come from the gradient of step k's loss (the peer: its backward hook;
    ours: computed in forward), and the focusing factors of step k from steps 1..k - 1."""
    c, n = 6, 30
    peer = UPEqualizedFocal(c, alpha=alpha, scale_factor=scale)
    state = R.efl_initial_state(c)
    for step in range(STEPS):
        x = _logits((n, c), seed=step + 200, scale=2.0)
        labels = _long_tail_labels(n, c, seed=step + 200, bg=c, ignore_frac=0.15)
        keep = labels != -100
        # the peer's 'mean' without a normalizer is the sum (normalizer 1.0): ours 'sum'
        ours_red = "sum" if (reduction == "mean" and normalizer is None) else reduction
        xo = x.clone().requires_grad_(True)
        lo = R.efl(xo, labels, state, alpha=alpha, scale_factor=scale, reduction=ours_red, avg_factor=normalizer)
        (go,) = torch.autograd.grad(lo, xo)
        xp = x.clone().requires_grad_(True)
        lp = peer(xp, _to_up_labels(labels, c), reduction, normalizer)
        (gp,) = torch.autograd.grad(lp, xp)
        assert_rel_close(lo, lp, 1e-12, f"step {step} loss")
        assert_rel_close(go, gp, 1e-12, f"step {step} grad")
        assert torch.equal(go[~keep], torch.zeros_like(go[~keep]))
        assert_rel_close(state, peer.state(), 1e-6, f"step {step} state")
    assert (state[2] < 0.9).any()  # the focusing factors moved away from plain focal


def test_efl_initial_state_is_sigmoid_focal_and_none_reduction():
    c, n = 5, 12
    x = _logits((n, c), seed=230)
    labels = _long_tail_labels(n, c, seed=230, bg=c)
    ours = R.efl(x, labels, R.efl_initial_state(c), reduction="none")
    assert ours.shape == (n, c)
    assert_rel_close(ours, R.sigmoid_focal(x, labels, reduction="none"), 1e-13, "pos_neg = 1: sigmoid focal")
    # 'none': the statistics are those of the sum
    s_none, s_sum = R.efl_initial_state(c), R.efl_initial_state(c)
    R.efl(x, labels, s_none, reduction="none")
    R.efl(x, labels, s_sum, reduction="sum")
    assert torch.equal(s_none, s_sum)
    # 'mean' without avg_factor: / non-ignored rows, statistics divided alike
    s_mean = R.efl_initial_state(c)
    assert_rel_close(R.efl(x, labels, s_mean), ours.sum() / n, 1e-13, "mean over rows")
    assert_rel_close(s_mean[:2], s_sum[:2] / n, 1e-6, "mean statistics")


def test_efl_gradcheck_state_frozen():
    c = 4
    st = R.efl_initial_state(c)
    st[2] = torch.tensor([1.0, 0.5, 0.1, 0.0])
    x = _logits((5, c), seed=240, scale=1.0).requires_grad_(True)
    labels = torch.tensor([0, c, 2, -100, 1])
    w = _row_weight(5, 2)
    assert gradcheck(lambda z: R.efl(z, labels, st.clone(), weight=w), (x,))


def test_efl_row_weight_is_repetition():
    """An integer row weight k == the row repeated k times: loss, gradient and statistics ('sum');
    zero weight with a NaN logit: 0 loss, 0 gradient, no statistics."""
    c = 5
    x = _logits((4, c), seed=250)
    labels = torch.tensor([0, 2, c, 1])
    w = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=F64)
    xn = x.clone()
    xn[2] = math.nan
    sa, sb = R.efl_initial_state(c), R.efl_initial_state(c)
    rep = torch.tensor([0, 1, 1, 1, 3, 3])
    for k in range(3):
        la, ga = _loss_grad(lambda z: R.efl(z, labels, sa, weight=w, reduction="sum"), xn)
        lb = R.efl(x[rep], labels[rep], sb, reduction="sum")
        assert_rel_close(la, lb, 1e-13, f"step {k} weighted == repeated")
        assert torch.equal(ga[2], torch.zeros(c, dtype=F64))
        assert_rel_close(sa, sb, 1e-6, f"step {k} statistics")


def test_efl_ratio_clamped_to_one():
    """A class whose accumulated positive gradient exceeds its negative one: pos_neg clamps to 1 (the
    peer's clamp), so its gamma never drops below the base gamma; checked against the peer's hook."""
    c, n = 4, 10
    peer = UPEqualizedFocal(c)
    peer.pos_grad = torch.tensor([50.0, 0.0, 1.0, 0.0])
    peer.neg_grad = torch.tensor([1.0, 2.0, 3.0, 0.0])
    state = peer.state().clone()
    x = _logits((n, c), seed=260)
    labels = _long_tail_labels(n, c, seed=260, bg=c)
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.autograd.grad(R.efl(xo, labels, state, avg_factor=4.0), xo)
    torch.autograd.grad(peer(xp, _to_up_labels(labels, c), "mean", 4.0), xp)
    assert state[2, 0].item() == 1.0
    assert_rel_close(state, peer.state(), 1e-6, "state")


def test_efl_float32_inputs_float32_state():
    c, n = 6, 40
    x64 = _logits((n, c), seed=270)
    labels = _long_tail_labels(n, c, seed=270, bg=c)
    s64, s32 = R.efl_initial_state(c), R.efl_initial_state(c)
    for _ in range(3):
        l64, g64 = _loss_grad(lambda z: R.efl(z, labels, s64, avg_factor=5.0), x64)
        l32, g32 = _loss_grad(lambda z: R.efl(z, labels, s32, avg_factor=5.0), x64.float())
        assert l32.dtype == torch.float32 and s32.dtype == torch.float32
        assert_rel_close(l32, l64, 1e-5, "fp32 loss")
        assert_rel_close(g32, g64, 1e-5, "fp32 grad")
        assert_rel_close(s32, s64, 1e-5, "fp32 state")
