"""CPU-kernel specifics (csrc/cpu): every SIMD variant this machine can run, the OHEM radix
selection, ragged row and tile ends.

The fp32 loops of the 'cpu' backend are compiled per instruction set (csrc/cpu/simd_kernels.cpp:
AVX-512 with 16 lanes, AVX2+FMA with 8, a portable baseline with 8 lanes that is also what
aarch64 builds run) and one is picked at load; FUSED_LOSSES_SIMD=baseline|avx2 picks a lower
one. The portable baseline never runs on an AVX2 machine otherwise, so it is checked here in a
subprocess against the float64 reference, on shapes whose rows and tiles end ragged (C = 19 and
80 rows; spatial sizes that are no multiple of 8 or of the 64-wide tile).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_losses as fl
from tests.utils import TOL, assert_rel_close, loss_and_grad, sigmoid_case, softmax_case

pytestmark = pytest.mark.skipif(not fl.backends()["cpu"].available, reason="cpu backend unavailable")

REPO = Path(__file__).resolve().parent.parent


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variants():
    flags = _cpu_flags()
    out = ["baseline"]
    if {"avx2", "fma"} <= flags:
        out.append("avx2")
    if {"avx2", "fma", "avx512f"} <= flags:
        out.append("avx512")
    return out


# The cases each variant runs (inside the subprocess): name -> (loss, logits shape, kwargs, target kind).
CASES = {
    "focal_rows_80": ("focal", (37, 80), dict(gamma=2.0), "index"),
    "focal_rows_19_ragged": ("focal", (37, 19), dict(gamma=0.5, alpha=0.25), "index"),
    "focal_channel_second_ragged": ("focal", (2, 19, 5, 27), dict(gamma=2.0, ignore_index=255), "index"),
    "ohem_topk_rows": ("ohem", (41, 19), dict(keep=0.3), "index"),
    "ohem_thresh_channel_second": ("ohem", (2, 19, 9, 13), dict(thresh=0.7, min_kept=20, ignore_index=255), "index"),
    "ghmc_softmax_channel_second": ("ghmc", (2, 19, 7, 11), dict(use_sigmoid=False, bins=10, ignore_index=255),
                                    "index"),
    "ib_rows": ("ib", (33, 21), dict(alpha=100.0), "index"),
    "sigmoid_labels_gamma2": ("sigmoid_focal", (29, 83), dict(gamma=2.0, ignore_index=-1, reduction="sum"), "labels"),
    "sigmoid_float_gamma1.5": ("sigmoid_focal", (29, 13), dict(gamma=1.5, alpha=-1.0, reduction="mean"), "soft"),
    "sigmoid_labels_gamma0_none": ("sigmoid_focal", (17, 9), dict(gamma=0.0, reduction="none"), "labels"),
    "sigmoid_float_gamma3": ("sigmoid_focal", (17, 24), dict(gamma=3.0, reduction="sum"), "float"),
    "sigmoid_labels_gamma1_mean": ("sigmoid_focal", (17, 10), dict(gamma=1.0, ignore_index=-1, reduction="mean"),
                                   "labels"),
    # Drop-in extras (weight="rows" / "elements": a random weight with zeros, built by _inputs).
    "focal_smooth_alpha_vec_weight_rows": ("focal", (37, 19), dict(gamma=2.0, alpha=[0.1 + 0.04 * c for c in range(19)],
                                                                   label_smoothing=0.1, weight="rows"), "index"),
    "focal_smooth_gamma0_channel_second": ("focal", (2, 19, 5, 27), dict(gamma=0.0, label_smoothing=0.2,
                                                                         ignore_index=255, weight="rows"), "index"),
    "focal_weight_rows_80": ("focal", (37, 80), dict(gamma=2.0, weight="rows"), "index"),
    "ohem_smooth_weight_rows": ("ohem", (41, 19), dict(keep=0.3, label_smoothing=0.1, weight="rows"), "index"),
    "ghmc_softmax_smooth_weight": ("ghmc", (2, 19, 7, 11), dict(use_sigmoid=False, bins=10, ignore_index=255,
                                                                label_smoothing=0.1, weight="rows"), "index"),
    "sigmoid_alpha_vec_weight_rows": ("sigmoid_focal", (29, 83), dict(gamma=2.0, alpha=[0.05 + 0.01 * c for c in range(83)],
                                                                      ignore_index=-1, reduction="sum", weight="rows"),
                                      "labels"),
    "sigmoid_weight_elements_gamma1.5": ("sigmoid_focal", (29, 13), dict(gamma=1.5, reduction="mean",
                                                                          weight="elements"), "soft"),
    "sigmoid_weight_elements_gamma0_none": ("sigmoid_focal", (17, 9), dict(gamma=0.0, alpha=[0.5] * 9,
                                                                            reduction="none", weight="elements"),
                                            "labels"),
}


def _inputs(name):
    loss, shape, kwargs, kind = CASES[name]
    seed = sum(map(ord, name))
    if kind == "index":
        ignore = kwargs.get("ignore_index", -100)
        x, t = softmax_case(shape, torch.float32, ignore_frac=0.0 if loss == "ib" else 0.15, ignore_index=ignore,
                            seed=seed)
    else:
        x, t = sigmoid_case(shape, torch.float32, kind=kind, ignore_frac=0.1 if kind == "labels" else 0.0,
                            ignore_index=kwargs.get("ignore_index", -100), seed=seed)
    extra = (torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) + 0.5,) if loss == "ib" else ()
    if "weight" in kwargs:
        # Per row: the target's shape (softmax) or logits.shape[:-1] (sigmoid); per element: the
        # logits' shape. About a fifth of the weights are 0, the rest in [0, 2).
        kwargs = dict(kwargs)
        sigmoid = kind != "index"
        wshape = shape if kwargs["weight"] == "elements" else (shape[:-1] if sigmoid else t.shape)
        w = 2 * torch.rand(wshape, generator=torch.Generator().manual_seed(seed + 1))
        kwargs["weight"] = torch.where(w < 0.4, torch.zeros(()), w)
    return loss, x, t, extra, kwargs


def _errors(name) -> dict:
    """Relative errors of the cpu backend against the float64 reference (loss, grad) for one case."""
    loss, x, t, extra, kwargs = _inputs(name)
    fn = getattr(fl, loss)
    out, grad = loss_and_grad(fn, x, t, *extra, backend="cpu", **kwargs)
    ref, ref_grad = loss_and_grad(fn, x.double(), t, *[e.double() for e in extra], backend="reference", **kwargs)
    from tests.utils import rel_error
    return {"loss": rel_error(out, ref), "grad": rel_error(grad, ref_grad)}


_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from tests import test_cpu_kernels as m
print(json.dumps({{name: m._errors(name) for name in m.CASES}}))
"""


@pytest.mark.parametrize("variant", _variants())
def test_every_simd_variant_matches_the_float64_reference(variant):
    env = dict(os.environ, FUSED_LOSSES_SIMD=variant, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO))], env=env, capture_output=True,
                          text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {name: e for name, e in errors.items() if not (e["loss"] <= TOL[torch.float32] and
                                                           e["grad"] <= TOL[torch.float32])}
    assert not bad, f"{variant}: relative errors above 1e-5: {bad}"


@pytest.mark.parametrize("name", list(CASES))
def test_cases_in_process(name):
    """The same cases in this process (the variant picked for this CPU), with a readable failure."""
    e = _errors(name)
    assert e["loss"] <= TOL[torch.float32] and e["grad"] <= TOL[torch.float32], e


def _ohem_kept(x, t, **kwargs):
    out = fl.ohem(x, t, reduction="none", backend="cpu", **kwargs)
    ref = fl.ohem(x.double(), t, reduction="none", backend="reference", **kwargs)
    return out != 0, ref != 0


@pytest.mark.parametrize("keep", [0.25, 0.5, 7, 1])
def test_ohem_radix_selection_ties_go_to_the_lower_index(keep):
    """Many rows with bit-identical CE (repeated rows): the kept set is the reference's stable-sort
    rank < k, i.e. among equal keys the lower indices, at every cut through a run of ties."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, generator=g)
    x = base.repeat_interleave(40, dim=0)            # 200 rows, 5 distinct CE values, runs of 40 ties
    t = torch.randint(0, 7, (5,), generator=g).repeat_interleave(40)
    perm = torch.randperm(200, generator=g)          # interleave the runs
    x, t = x[perm].contiguous(), t[perm].contiguous()
    t[::17] = -100
    got, ref = _ohem_kept(x, t, keep=keep)
    assert torch.equal(got, ref)


def test_ohem_nan_rows_rank_first_and_thresh_mode_with_nan():
    x, t = softmax_case((300, 11), seed=8, ignore_frac=0.1)
    x[5, 3] = float("nan")
    x[77] = float("nan")
    got, ref = _ohem_kept(x, t, keep=0.1)
    assert torch.equal(got, ref) and got[5] and got[77]
    got, ref = _ohem_kept(x, t, thresh=0.6, min_kept=40)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("min_kept", [0, 1, 150, 10_000])
def test_ohem_threshold_rank_is_exact(min_kept):
    """The mmseg threshold sorted_p[min(min_kept, n_valid - 1)] from the radix select: the kept mask
    equals the reference's for thresholds below, inside and above the p distribution."""
    x, t = softmax_case((4, 13, 16, 17), seed=9, ignore_frac=0.2, ignore_index=255)
    for thresh in (0.05, 0.7, 1.0):
        got, ref = _ohem_kept(x, t, thresh=thresh, min_kept=min_kept, ignore_index=255)
        assert torch.equal(got, ref), (thresh, min_kept)


def test_confident_rows_keep_their_loss_in_every_simd_path():
    """Targets far above the rest (margins 17 .. 100, ragged C): the loss is -log1p(sum of the
    others) and 1 - p_t is sum_others / sum, so focal's loss keeps full relative accuracy where
    1 + sum_others rounds to 1 in float32."""
    for c in (5, 80):
        x, t = softmax_case((64, c), seed=c)
        rows = torch.arange(64)
        margin = torch.linspace(17.0, 100.0, 64)
        others = x.scatter(1, t[:, None], float("-inf")).max(dim=1).values
        x[rows, t] = others + margin
        out = fl.focal(x, t, gamma=0.0, reduction="none", backend="cpu")
        x64 = x.double()
        ref = -(x64.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(x64, dim=1))
        others_exp = torch.exp(x64 - x64.gather(1, t[:, None]))
        others_exp[rows, t] = 0.0
        exact = torch.log1p(others_exp.sum(dim=1))  # -log p_t from the sum over j != t, in float64
        assert_rel_close(out[margin < 80], exact[margin < 80], 1e-5, f"C={c} confident CE")
        assert ref.shape == out.shape


# --------------------------------------------------------------------------------------------
# Drop-in extras at the op level (weight, label_smoothing, per-class sigmoid alpha,
# ghmc_bin_counts). Accuracy against the float64 reference is tests/test_dropin.py's matrix; these
# pin what is specific to the CPU kernels: zero-weight rows are selected away (a NaN there cannot
# leak), every weighted / smoothed path is bitwise independent of the thread count, and the
# histogram op is the one ghmc_bin_weights uses.
# --------------------------------------------------------------------------------------------
_OPS = torch.ops.fused_losses


def _softmax_calls(x, t, w, eps):
    """(name, loss, grad) of every softmax-family op with weight w and label smoothing eps."""
    out = [("focal", *_OPS.softmax_focal_forward(x, t, None, 0.25, 2.0, 255, "sum", True, True, w, eps)),
           ("focal_alpha_vec", *_OPS.softmax_focal_forward(
               x, t, torch.linspace(0.1, 0.9, x.shape[1], dtype=w.dtype), 1.0, 1.5, 255, "none", True, True, w, eps)),
           ("ohem", *_OPS.ohem_forward(x, t, 0.5, 0, None, 0, 255, "mean", True, w, eps))]
    bw = _OPS.ghmc_bin_weights(x, t, None, 10, 0.0, False, 255, w)
    out.append(("ghmc", *_OPS.ghmc_forward(x, t, bw, False, 255, "mean", True, w, eps)))
    return out


def _sigmoid_calls(x, y, w):
    out = [("sigmoid_focal", *_OPS.sigmoid_focal_forward(x, y, 0.25, 2.0, -1, "sum", True, None, w)),
           ("sigmoid_focal_alpha_vec", *_OPS.sigmoid_focal_forward(
               x, y, -1.0, 1.5, -1, "none", True, torch.linspace(0.1, 0.9, x.shape[-1], dtype=w.dtype), w))]
    bw = _OPS.ghmc_bin_weights(x, y, None, 10, 0.0, True, -1, w)
    out.append(("ghmc_sigmoid", *_OPS.ghmc_forward(x, y, bw, True, -1, "mean", True, w, 0.0)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 19), (2, 19, 5, 27)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_zero_weight_rows_are_selected_away_softmax(dtype, shape, eps):
    """NaN / inf logits in zero-weight rows: loss and gradient exactly as if those rows held any
    finite values, and their gradient rows exactly 0 (OHEM: its selection ignores weights, so
    the NaN row is kept and ranks first; its loss and gradient are still 0 and finite)."""
    x, t = softmax_case(shape, dtype, ignore_frac=0.1, ignore_index=255, seed=11)
    md = torch.promote_types(dtype, torch.float32)
    w = torch.rand(t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(md) * 2
    zero_rows = [3, 8, 20]
    w.view(-1)[zero_rows] = 0
    t.view(-1)[zero_rows] = 1
    bad = x.movedim(1, -1).contiguous()
    bad.view(-1, shape[1])[3, 2] = float("nan")
    bad.view(-1, shape[1])[8, :] = float("inf")
    bad.view(-1, shape[1])[20, 0] = -float("inf")
    bad = bad.movedim(-1, 1).contiguous()
    for (name, loss_bad, grad_bad), (_, loss_ok, grad_ok) in zip(_softmax_calls(bad, t, w, eps),
                                                                   _softmax_calls(x, t, w, eps)):
        g_rows = grad_bad.movedim(1, -1).reshape(-1, shape[1])
        assert torch.isfinite(loss_bad).all() and torch.isfinite(grad_bad).all(), name
        assert (g_rows[zero_rows] == 0).all(), name
        if name != "ohem":
            assert torch.equal(loss_bad, loss_ok) and torch.equal(grad_bad, grad_ok), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("per_element", [False, True])
def test_zero_weight_entries_are_selected_away_sigmoid(dtype, kind, per_element):
    x, y = sigmoid_case((23, 37), dtype, kind=kind, ignore_frac=0.1 if kind == "labels" else 0.0, ignore_index=-1,
                        seed=12)
    md = torch.promote_types(dtype, torch.float32)
    g = torch.Generator().manual_seed(2)
    w = (torch.rand((23, 37) if per_element else (23,), generator=g, dtype=torch.float64) * 2).to(md)
    bad = x.clone()
    if per_element:
        w[4, 5] = w[9, 36] = w[10, 0] = 0
        bad[4, 5], bad[9, 36], bad[10, 0] = float("nan"), float("inf"), -float("inf")
    else:
        w[4] = w[9] = 0
        bad[4, 5], bad[9] = float("nan"), float("inf")
    zero = (w == 0) if per_element else (w == 0)[:, None].expand(23, 37)
    for (name, loss_bad, grad_bad), (_, loss_ok, grad_ok) in zip(_sigmoid_calls(bad, y, w), _sigmoid_calls(x, y, w)):
        assert torch.isfinite(loss_bad).all() and torch.isfinite(grad_bad).all(), name
        assert (grad_bad[zero] == 0).all(), name
        assert torch.equal(loss_bad, loss_ok) and torch.equal(grad_bad, grad_ok), name


def test_extras_are_bitwise_independent_of_the_thread_count():
    """Weighted, label-smoothed and per-class-alpha paths over many chunks and tiles: the same
    bits with 1 and 2 threads."""
    x, t = softmax_case((3, 19, 61, 67), ignore_frac=0.1, ignore_index=255, seed=13)
    xr, tr = softmax_case((9000, 21), ignore_frac=0.1, ignore_index=255, seed=14)
    xs, ys = sigmoid_case((6000, 37), kind="labels", ignore_frac=0.1, ignore_index=-1, seed=15)
    g = torch.Generator().manual_seed(3)
    w, wr = torch.rand(t.shape, generator=g) * 2, torch.rand(tr.shape, generator=g) * 2
    w.view(-1)[::7] = 0
    ws_row, ws_el = torch.rand(6000, generator=g), torch.rand(6000, 37, generator=g)

    def run():
        out = []
        for eps in (0.0, 0.1):
            out += _softmax_calls(x, t, w, eps) + _softmax_calls(xr, tr, wr, eps)
        out += _sigmoid_calls(xs, ys, ws_row) + _sigmoid_calls(xs, ys, ws_el)
        out.append(("counts", _OPS.ghmc_bin_counts(x, t, 10, False, 255, w), torch.empty(0)))
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for (name, l1, g1), (_, l2, g2) in zip(one, two):
        assert torch.equal(l1, l2) and torch.equal(g1, g2), name


def _float32_g(x, y, use_sigmoid, ignore_index):
    """GHM-C's g in float32 (reference.ghmc): |sigmoid(x) - y|, or 1 - p_t of a float32 softmax."""
    if use_sigmoid:
        c = x.shape[-1]
        valid = (y != ignore_index)[:, None].expand(-1, c)
        yy = torch.nn.functional.one_hot(torch.where(y == ignore_index, c, y), c + 1)[:, :c].float()
        return (torch.sigmoid(x.float()) - yy).abs(), valid
    c = x.shape[1]
    rows = x.float().movedim(1, -1).reshape(-1, c)
    tf = y.reshape(-1)
    valid = tf != ignore_index
    logp = torch.log_softmax(rows, -1).gather(1, torch.where(valid, tf, 0)[:, None])[:, 0]
    return -torch.expm1(logp), valid


@pytest.mark.parametrize("use_sigmoid", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_ghmc_bin_counts_is_the_histogram_ghmc_bin_weights_uses(use_sigmoid, weighted):
    """ghmc_bin_counts = [counts of the valid entries per bin (not ignored, weight != 0), n_valid];
    the per-bin weights of ghmc_bin_weights (with an EMA state) are reference.ghm_bin_weights of
    exactly these counts."""
    from fused_losses.reference import ghm_bin_weights
    bins = 7
    if use_sigmoid:
        x, y = sigmoid_case((300, 9), kind="labels", ignore_frac=0.1, ignore_index=-1, seed=16)
        w = torch.rand(300, 9, generator=torch.Generator().manual_seed(4))
        ignore = -1
    else:
        x, y = softmax_case((2, 9, 13, 11), ignore_frac=0.1, ignore_index=255, seed=17)
        w = torch.rand(y.shape, generator=torch.Generator().manual_seed(4))
        ignore = 255
    w[w < 0.3] = 0
    wt = w if weighted else None
    g, valid = _float32_g(x, y, use_sigmoid, ignore)
    if weighted:
        valid = valid & (w.reshape(valid.shape) != 0)
    b = torch.clamp_max(torch.floor(g * bins), bins - 1).long()
    expected = torch.cat([torch.bincount(b[valid], minlength=bins), valid.sum().reshape(1)])
    counts = _OPS.ghmc_bin_counts(x, y, bins, use_sigmoid, ignore, wt)
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)
    state = torch.linspace(1.0, 50.0, bins)
    state_ref = state.clone()
    weights = _OPS.ghmc_bin_weights(x, y, state, bins, 0.7, use_sigmoid, ignore, wt)
    ref, new_state = ghm_bin_weights(counts[:bins].float(), counts[bins], state_ref, 0.7, torch.float32)
    assert torch.equal(weights, ref) and torch.equal(state, new_state)


# --------------------------------------------------------------------------------------------
# GHM-C softmax on float32 CPU logits in one softmax pass (cpu_backend._ghmc_softmax_one_pass:
# ghmc_softmax_prepass writes p - onehot, ghmc_softmax_scale scales its rows by the bins'
# weights): the same bins, EMA state and losses as the ghmc_bin_weights + ghmc_forward pair bit
# for bit, gradients within 2 ulp (the two factors are rounded in another order).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(37, 19), (300, 80), (2, 19, 9, 13), (1, 5, 700)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ghmc_one_pass_ops_match_the_op_pair(shape, weighted, reduction):
    g = torch.Generator().manual_seed(hash((shape, weighted, reduction)) % 1000)
    x = 3 * torch.randn(shape, generator=g)
    x[0, 0] = 95.0  # a row (or a tile lane) whose spread passes 87: the exact-range exponential
    tshape = (shape[0],) + shape[2:]
    t = torch.randint(0, shape[1], tshape, generator=g)
    t[torch.rand(tshape, generator=g) < 0.1] = 255
    w = None
    if weighted:
        w = torch.rand(tshape, generator=g)
        w[w < 0.3] = 0
        x.view(shape[0], shape[1], -1)[:, :, 0][w.view(shape[0], -1)[:, 0] == 0] = float("nan")  # never leaks
    s_pair, s_one = torch.full((10,), 5.0), torch.full((10,), 5.0)
    bw_pair = _OPS.ghmc_bin_weights(x, t, s_pair, 10, 0.7, False, 255, w)
    loss_pair, grad_pair = _OPS.ghmc_forward(x, t, bw_pair, False, 255, reduction, True, w, 0.0)
    bw_one, stats, unit = _OPS.ghmc_softmax_prepass(x, t, s_one, 10, 0.7, 255, w)
    loss_one, grad_one = _OPS.ghmc_softmax_scale(x, t, bw_one, stats, unit, 255, reduction, True, w)
    assert torch.equal(bw_one, bw_pair) and torch.equal(s_one, s_pair)
    assert torch.equal(loss_one, loss_pair) or torch.equal(torch.isnan(loss_one), torch.isnan(loss_pair))
    assert torch.equal(torch.isnan(grad_one), torch.isnan(grad_pair))
    ok = ~torch.isnan(grad_pair)
    diff = (grad_one - grad_pair)[ok].abs()
    assert torch.all(diff <= 2 * torch.finfo(torch.float32).eps * grad_pair[ok].abs()), diff.max()


def test_ghmc_public_call_takes_the_one_pass_ops_and_matches_the_reference():
    """fl.ghmc(use_sigmoid=False) on float32 CPU logits runs ghmc_softmax_prepass/_scale (not
    ghmc_forward), updates the module's EMA state like the reference, and its loss and gradient
    are the float64 reference's within the fp32 bound."""
    from fused_losses._backends import cpu_backend
    x, t = softmax_case((2, 19, 9, 13), ignore_frac=0.1, ignore_index=255, seed=21)
    assert cpu_backend._one_pass_ghmc(_OPS, x, False, 0.0, None)
    assert not cpu_backend._one_pass_ghmc(_OPS, x.double(), False, 0.0, None)
    assert not cpu_backend._one_pass_ghmc(_OPS, x, False, 0.1, None)
    calls = []
    real = _OPS.ghmc_softmax_scale

    class Spy:
        def __getattr__(self, name):
            if name == "ghmc_forward":
                calls.append(name)
            return real if name == "ghmc_softmax_scale" and calls.append(name) is None else getattr(_OPS, name)

    orig = cpu_backend._ops_ns
    cpu_backend._ops_ns = lambda: Spy()
    try:
        state = torch.full((10,), 3.0)
        state_ref = state.clone()
        out, grad = loss_and_grad(lambda z: fl.ghmc(z, t, bins=10, momentum=0.75, state=state, use_sigmoid=False,
                                                    ignore_index=255, backend="cpu"), x)
    finally:
        cpu_backend._ops_ns = orig
    assert calls == ["ghmc_softmax_scale"], calls
    ref, ref_grad = loss_and_grad(lambda z: fl.ghmc(z, t, bins=10, momentum=0.75, state=state_ref,
                                                    use_sigmoid=False, ignore_index=255, backend="reference"),
                                  x.double())
    assert torch.allclose(state, state_ref.float())
    assert_rel_close(out, ref, TOL[torch.float32], "ghmc one-pass loss")
    assert_rel_close(grad, ref_grad, TOL[torch.float32], "ghmc one-pass grad")


@pytest.mark.parametrize("variant", _variants())
def test_exponential_fast_and_exact_range_paths_give_subnormals_right(variant):
    """Rows and tiles whose spread is under 87 take the fast exponential, others (and -inf
    logits) the exact-range one: gradients p_c down to the subnormal range equal the float64
    softmax rounded to float32 within 8 eps relative (the exponential's < 2 ulp, the row sum's
    rounding, 1/s and the product), or 2 subnormal steps, in every SIMD variant."""
    code = f"""
import sys, json, torch
sys.path.insert(0, {str(REPO)!r})
import fused_losses as fl
ops = torch.ops.fused_losses
worst = 0.0
for shape in [(6, 80), (6, 19), (2, 19, 3, 37)]:
    for spread in (50.0, 86.9, 87.2, 100.0, 103.9, 120.0):
        g = torch.Generator().manual_seed(int(spread))
        x = torch.rand(shape, generator=g) * -spread
        x.select(1, 0).fill_(0.0)
        if spread == 120.0:
            x.select(1, 2).fill_(float("-inf"))
        t = torch.zeros((shape[0],) + shape[2:], dtype=torch.long)
        _, grad = ops.softmax_focal_forward(x, t, None, 1.0, 0.0, -100, "sum", True, True)
        p = torch.softmax(x.double(), dim=1)
        want = p.clone()
        want.select(1, 0).copy_(-p.narrow(1, 1, shape[1] - 1).sum(1))  # p_t - 1 without float64's cancellation
        want = want.float().double()
        got = grad.double()
        tol = torch.maximum(8 * 2.0 ** -23 * want.abs(), torch.full_like(want, 2 * 2.0 ** -149))
        worst = max(worst, float(((got - want).abs() / tol).max()))
print(json.dumps(worst))
"""
    env = dict(os.environ, FUSED_LOSSES_SIMD=variant, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) <= 1.0


def test_no_function_of_the_extension_takes_a_vector_type():
    """The SIMD loops are compiled once per instruction set (target attributes). A helper they call
    on GCC vector types that the compiler does not inline becomes one out-of-line copy, compiled for
    one instruction set with one calling convention, that every variant calls: the AVX2 sigmoid
    loop once read garbage from such a copy of the log1p series (only in the ragged row ends, where
    GCC chose not to inline). Such helpers are always_inline, so the built extension exports no
    symbol with a vector type."""
    import importlib.util
    import shutil
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    so = importlib.util.find_spec("fused_losses._C").origin
    out = subprocess.run([nm, "-C", so], capture_output=True, text=True, check=True).stdout
    assert "fused_losses::" in out  # the listing is the extension's
    vector_symbols = [line for line in out.splitlines() if "__vector" in line]
    assert not vector_symbols, vector_symbols[:5]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_target_range_op_is_the_validation_scan(dtype):
    """torch.ops.fused_losses.target_range (what _validate._check_range reads for CPU targets):
    min, max and count of the entries that are not ignore_index, in one pass; strided input;
    an all-ignored target counts 0."""
    g = torch.Generator().manual_seed(5)
    t = torch.randint(-3, 40, (3, 70, 90), generator=g).to(dtype)
    t[torch.rand(t.shape, generator=g) < 0.2] = 255
    for view in (t, t[:, ::3, 1:]):
        kept = view[view != 255]
        assert _OPS.target_range(view, 255).tolist() == [int(kept.min()), int(kept.max()), kept.numel()]
    assert _OPS.target_range(torch.full((7,), -100, dtype=dtype), -100).tolist()[2] == 0
    with pytest.raises(ValueError, match=r"target: value -3 is out of range \[0, 39\]"):
        fl.focal(torch.randn(3, 40, 70, 90), t.long(), ignore_index=255, backend="cpu")


@pytest.mark.parametrize("variant", _variants())
def test_target_range_scan_is_exact_in_every_simd_variant(variant):
    """The int64 scan of target_range runs on SIMD lanes (simd_kernels.cpp index_range): every
    length around the lane count and the grain (ragged ends), ignored entries anywhere, the int64
    extremes, all ignored: the exact min, max and count, in every variant."""
    code = f"""
import sys, json, torch
sys.path.insert(0, {str(REPO)!r})
import fused_losses
op = torch.ops.fused_losses.target_range
g = torch.Generator().manual_seed(9)
bad = []
big = 2 ** 63 - 1
for n in list(range(0, 40)) + [32767, 32768, 32769, 100003]:
    for case in range(4):
        t = torch.randint(-50, 50, (n,), generator=g)
        if case == 1 and n:
            t[torch.rand(n, generator=g) < 0.5] = -100
        if case == 2 and n:
            t[torch.randint(0, n, (1,), generator=g)] = big
            t[torch.randint(0, n, (1,), generator=g)] = -big - 1
        if case == 3:
            t.fill_(-100)
        kept = t[t != -100]
        want = [int(kept.min()), int(kept.max()), kept.numel()] if kept.numel() else [big, -big - 1, 0]
        if op(t, -100).tolist() != want:
            bad.append((n, case))
print(json.dumps(bad))
"""
    env = dict(os.environ, FUSED_LOSSES_SIMD=variant, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal"])
def test_cpu_folds_avg_factor_into_the_weight(loss):
    """backend='cpu' with a weight and avg_factor computes sum(weight / avg_factor * loss) in the
    kernel's pass (no second pass over the gradient in the backward): loss and gradient equal the
    float64 reference's sum / avg_factor; an avg_factor tensor that requires grad keeps the
    division outside (its gradient is the reference's)."""
    if loss == "focal":
        x, t = softmax_case((300, 11), seed=31, ignore_frac=0.1)
        kw = dict(gamma=2.0)
        w = torch.rand(300, generator=torch.Generator().manual_seed(1))
    else:
        x, t = sigmoid_case((300, 11), kind="labels", seed=31)
        kw = dict(gamma=2.0, alpha=0.25, reduction="mean")
        w = torch.rand(300, 11, generator=torch.Generator().manual_seed(1))
    w[w < 0.2] = 0
    fn = getattr(fl, loss)
    for avg in (37.0, torch.tensor(37.0)):
        out, g = loss_and_grad(lambda z: fn(z, t, weight=w, avg_factor=avg, backend="cpu", **kw), x)
        ref, rg = loss_and_grad(lambda z: fn(z, t, weight=w.double(), avg_factor=avg, backend="reference", **kw),
                                x.double())
        assert_rel_close(out, ref, TOL[torch.float32], f"{loss} loss")
        assert_rel_close(g, rg, TOL[torch.float32], f"{loss} grad")
    avg = torch.tensor(37.0, requires_grad=True)
    xr = x.clone().requires_grad_()
    fn(xr, t, weight=w, avg_factor=avg, backend="cpu", **kw).backward()
    avg64 = torch.tensor(37.0, dtype=torch.float64, requires_grad=True)
    fn(x.double(), t, weight=w.double(), avg_factor=avg64, backend="reference", **kw).backward()
    assert_rel_close(avg.grad, avg64.grad, TOL[torch.float32], "avg_factor grad")
