"""Regression tests of CUDA kernel bugs found by the emulator (run by `make test-cuda-emu`, which
sets FL_CUDA_EMU; tests/cuda_emu/backend.py). The broad coverage is the cuda_emu half of
tests/test_compiled_backends.py and tests/test_backward.py; these are the cases that need the
emulator's controls (recorded device asserts, schedules).

Bugs:
* Out-of-range targets with device asserts compiled out were zeroed in the loss kernels but
  still counted in the 'mean' denominator (count_valid), in GHM-C's n_valid and bin 0 of its
  softmax histogram, and could be kept by OHEM (log p_t = 0 sorts as the easiest row, but a
  keep count larger than the valid rows kept it, and the threshold mode's n_valid counted it).
  Now such a row is treated exactly as an ignored one: the result equals the call with that
  target replaced by ignore_index, and the assert is recorded.
* OHEM on channel-second logits (N, C, d...) failed on CUDA: the validity mask kept the
  target's (N, d...) shape while log p_t is per row (the cuda_emu OHEM cases of
  test_compiled_backends.py cover it; one direct case here).
"""
from __future__ import annotations

import pytest
import torch

from tests.cuda_emu import backend as cuda_emu
from tests.utils import sigmoid_case, softmax_case

pytestmark = pytest.mark.skipif(not cuda_emu.available(), reason=cuda_emu.reason())

IGNORE = -100


@pytest.fixture
def recorded_asserts():
    """Device asserts recorded instead of raised (as with asserts compiled out); yields the
    function that returns and clears them."""
    with cuda_emu.configured("asserts=record"):
        cuda_emu.take_device_asserts()
        yield cuda_emu.take_device_asserts
        cuda_emu.take_device_asserts()


def _assert_same(got, want, what):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        assert torch.equal(g, w), f"{what}: {g} != {w}"


def _with_bad_targets(target, bad_values):
    """(target with some entries out of range, the same with those entries ignored)."""
    bad = target.clone().reshape(-1)
    ignored = target.clone().reshape(-1)
    for i, value in zip((1, 4, 6), bad_values):
        bad[i] = value
        ignored[i] = IGNORE
    return bad.reshape(target.shape), ignored.reshape(target.shape)


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_targets_are_ignored_softmax_focal(recorded_asserts, shape, reduction):
    logits, target = softmax_case(shape, torch.float32, seed=3)
    bad, ignored = _with_bad_targets(target, (shape[1], -3, 1000))
    ops = cuda_emu.ops()
    got = ops.softmax_focal_forward(logits, bad, None, 1.0, 2.0, IGNORE, reduction, True, True)
    messages = recorded_asserts()
    want = ops.softmax_focal_forward(logits, ignored, None, 1.0, 2.0, IGNORE, reduction, True, True)
    _assert_same(got, want, f"focal {shape} {reduction}")
    assert messages and all("out of range" in m for m in messages), messages


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_labels_are_ignored_sigmoid_focal(recorded_asserts, reduction):
    logits, labels = sigmoid_case((11, 6), torch.float32, kind="labels", seed=4)
    bad, ignored = _with_bad_targets(labels, (7, -2, 99))  # C = 6: label 6 is background, 7 is out of range
    ops = cuda_emu.ops()
    got = ops.sigmoid_focal_forward(logits, bad, 0.25, 2.0, IGNORE, reduction, True)
    messages = recorded_asserts()
    want = ops.sigmoid_focal_forward(logits, ignored, 0.25, 2.0, IGNORE, reduction, True)
    _assert_same(got, want, f"sigmoid_focal {reduction}")
    assert messages and all("out of range" in m for m in messages), messages


@pytest.mark.parametrize("mode", ["count", "fraction", "thresh"])
def test_out_of_range_targets_are_never_kept_by_ohem(recorded_asserts, mode):
    logits, target = softmax_case((2, 5, 3, 4), torch.float32, seed=5)
    bad, ignored = _with_bad_targets(target, (5, -1, 17))
    args = {"count": (0.0, 100, None, 0), "fraction": (0.5, 0, None, 0), "thresh": (0.0, 0, 0.7, 30)}[mode]
    ops = cuda_emu.ops()
    for reduction in ("mean", "none"):
        got = ops.ohem_forward(logits, bad, *args, IGNORE, reduction, True)
        messages = recorded_asserts()
        want = ops.ohem_forward(logits, ignored, *args, IGNORE, reduction, True)
        _assert_same(got, want, f"ohem {mode} {reduction}")
        assert messages, "the stats pass must assert on the out-of-range targets"


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_out_of_range_targets_are_ignored_by_ghmc(recorded_asserts, use_sigmoid):
    if use_sigmoid:
        logits, target = sigmoid_case((12, 4), torch.float32, kind="labels", seed=6)
        bad, ignored = _with_bad_targets(target, (5, -7, 40))
    else:
        logits, target = softmax_case((12, 4), torch.float32, seed=6, scale=6.0)
        bad, ignored = _with_bad_targets(target, (4, -7, 40))
    ops = cuda_emu.ops()
    states = [torch.zeros(10), torch.zeros(10)]
    weights = []
    for t, state in zip((bad, ignored), states):
        weights.append(ops.ghmc_bin_weights(logits, t, state, 10, 0.75, use_sigmoid, IGNORE))
    messages = recorded_asserts()
    _assert_same(weights[:1], weights[1:], "ghmc bin weights (n_valid and the histogram)")
    _assert_same(states[:1], states[1:], "ghmc EMA state")
    for reduction in ("mean", "none"):
        got = ops.ghmc_forward(logits, bad, weights[1], use_sigmoid, IGNORE, reduction, True)
        want = ops.ghmc_forward(logits, ignored, weights[1], use_sigmoid, IGNORE, reduction, True)
        _assert_same(got, want, f"ghmc forward {reduction}")
    assert messages, "the histogram pass must assert on the out-of-range targets"


def test_out_of_range_target_raises_by_default():
    """With asserts on (the default), the launch fails like a GPU's device-side assert."""
    logits, target = softmax_case((4, 3), torch.float32, seed=7)
    target[2] = 3
    with cuda_emu.configured("asserts=raise"):
        with pytest.raises(RuntimeError, match="device-side assert.*out of range"):
            cuda_emu.ops().softmax_focal_forward(logits, target, None, 1.0, 2.0, IGNORE, "mean", True, True)
    cuda_emu.take_device_asserts()


@pytest.mark.parametrize("thresh", [None, 0.7])
def test_ohem_channel_second_logits(thresh):
    """Was: RuntimeError 'The size of tensor a (...) must match the size of tensor b' (the
    (N, d...) validity mask against the per-row log p_t)."""
    logits, target = softmax_case((2, 5, 3, 4), torch.float32, ignore_frac=0.2, seed=8)
    ops = cuda_emu.ops()
    keep = (0.0, 5, thresh, 6) if thresh is not None else (0.5, 0, None, 0)
    loss, grad = ops.ohem_forward(logits, target, *keep, IGNORE, "none", True)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 5)
    flat_loss, flat_grad = ops.ohem_forward(flat_logits, target.reshape(-1), *keep, IGNORE, "none", True)
    # The same rows through the spatial and the row kernel (sums in another order: ulps apart).
    torch.testing.assert_close(loss.reshape(-1), flat_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.permute(0, 2, 3, 1).reshape(-1, 5), flat_grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(loss.reshape(-1) != 0, flat_loss != 0)  # the same rows kept
