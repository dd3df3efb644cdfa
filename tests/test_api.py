"""The public surface of the README's API section: functions, modules, backends() and the build probe."""
import os
import subprocess
import sys

import pytest
import torch

import fused_losses as fl
from fused_losses import _backends, _ext, _validate, reference
from fused_losses._backends import cpu_backend
from tests.utils import assert_rel_close, sigmoid_case, softmax_case


def test_every_function_and_module_exists():
    for name in ("focal", "sigmoid_focal", "ohem", "ghmc", "ib", "class_weights", "backends"):
        assert callable(getattr(fl, name))
    for name in ("FocalLoss", "SigmoidFocalLoss", "OHEMLoss", "GHMCLoss", "IBLoss", "IBFocalLoss"):
        assert issubclass(getattr(fl.nn, name), torch.nn.Module)


def test_backends_report():
    status = fl.backends()
    assert list(status) == ["cuda", "triton", "cpu", "reference"]
    assert status["reference"].available
    for name, st in status.items():
        assert isinstance(st.available, bool) and st.reason, name
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "no CUDA device" in status["cuda"].reason


def test_import_never_fails_and_reports_a_broken_backend(monkeypatch):
    monkeypatch.setitem(_backends._MODULES, "triton", "fused_losses._backends.does_not_exist")
    monkeypatch.delitem(_backends._loaded, "triton", raising=False)
    st = fl.backends()["triton"]
    assert not st.available and "failed to import" in st.reason
    # The automatic choice skips it quietly.
    assert torch.isfinite(fl.focal(torch.randn(3, 2), torch.tensor([0, 1, 1])))
    monkeypatch.delitem(_backends._loaded, "triton")


def test_import_in_a_fresh_interpreter_prints_backends():
    code = "import fused_losses as fl; s = fl.backends(); assert s['reference'].available; print(s)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "reference" in out.stdout


def test_automatic_choice_on_cpu_tensors_runs_everything():
    logits, target = softmax_case((6, 4), seed=1)
    chosen = _backends.select("focal", logits, None)
    assert chosen.availability()[0] and chosen.cannot_run("focal", logits) is None
    assert chosen.name in ("cpu", "reference")


def test_env_override_selects_reference(monkeypatch):
    logits, target = softmax_case((6, 4), seed=1)
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "reference")
    # The public functions resolve the override with _validate.backend_arg before selecting.
    assert _backends.select("focal", logits, _validate.backend_arg(None)).name == "reference"


def test_explicit_reference_backend_equals_reference_module():
    logits, target = softmax_case((9, 5), seed=2, ignore_frac=0.2)
    out = fl.focal(logits, target, gamma=1.5, alpha=0.5, backend="reference")
    assert torch.equal(out, reference.focal(logits, target, gamma=1.5, alpha=0.5))


def test_modules_equal_functions():
    logits, target = softmax_case((8, 4), torch.float64, seed=3, ignore_frac=0.2)
    alpha = [0.1, 0.2, 0.3, 0.4]
    assert_rel_close(fl.nn.FocalLoss(gamma=0.5, alpha=alpha)(logits, target),
                     fl.focal(logits, target, gamma=0.5, alpha=alpha), 1e-7, "FocalLoss")
    assert_rel_close(fl.nn.OHEMLoss(keep=3)(logits, target), fl.ohem(logits, target, keep=3), 0, "OHEMLoss")
    x, labels = sigmoid_case((8, 4), torch.float64, seed=4)
    assert_rel_close(fl.nn.SigmoidFocalLoss(alpha=0.3)(x, labels), fl.sigmoid_focal(x, labels, alpha=0.3), 0,
                     "SigmoidFocalLoss")
    feats = torch.rand(8, 5, dtype=torch.float64)
    assert_rel_close(fl.nn.IBLoss(alpha=100.0)(logits, target.clamp_min(0), feats),
                     fl.ib(logits, target.clamp_min(0), feats, alpha=100.0), 0, "IBLoss")
    assert_rel_close(fl.nn.IBFocalLoss(alpha=100.0)(logits, target.clamp_min(0), feats),
                     fl.ib(logits, target.clamp_min(0), feats, alpha=100.0, gamma=1.0), 0, "IBFocalLoss")


def test_focal_module_alpha_is_a_buffer():
    module = fl.nn.FocalLoss(alpha=[1.0, 2.0, 3.0])
    assert "alpha" in dict(module.named_buffers())
    module = module.to(torch.float64)  # buffers follow .to() like any module state
    assert module.alpha.dtype == torch.float64


def test_ghmc_module_owns_and_updates_its_ema_buffer():
    x, labels = sigmoid_case((32, 4), torch.float32, seed=5)
    module = fl.nn.GHMCLoss(bins=5, momentum=0.75)
    assert torch.all(module.acc_sum == 0) and "acc_sum" in module.state_dict()
    state = torch.zeros(5)
    for _ in range(2):
        out = module(x, labels)
        expected = fl.ghmc(x, labels, bins=5, momentum=0.75, state=state)
        assert torch.equal(out, expected)
    assert torch.equal(module.acc_sum, state) and module.acc_sum.sum() > 0
    no_ema = fl.nn.GHMCLoss(momentum=0.0)
    assert torch.equal(no_ema(x, labels), fl.ghmc(x, labels)) and torch.all(no_ema.acc_sum == 0)


def test_extension_probe_op_runs_through_the_dispatcher():
    assert _ext.loaded(), _ext.load_error()
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    y = torch.ops.fused_losses.build_probe(x)
    assert torch.equal(y, 2 * x + 1) and y.data_ptr() != x.data_ptr()


@pytest.mark.skipif(not (torch.version.cuda and os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                             "bin", "nvcc")))
                    or os.environ.get("FUSED_LOSSES_BUILD_CUDA") == "0",
                    reason="no CUDA toolkit (or FUSED_LOSSES_BUILD_CUDA=0): the extension is built CPU-only")
def test_extension_was_built_with_its_cuda_part():
    # The CUDA kernels are their own module, fused_losses._C_cuda, loaded after _C; `make test`
    # and .ci/run build it whenever nvcc exists (no GPU needed).
    assert _ext.compiled_with_cuda(), _ext.cuda_load_error()
    for name in cpu_backend._REQUIRED_OPS + ("build_probe",):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_losses::{name}", "CUDA"), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extension_probe_op_on_cuda():
    x = torch.arange(6, dtype=torch.float32, device="cuda")
    assert torch.equal(torch.ops.fused_losses.build_probe(x).cpu(), 2 * x.cpu() + 1)


def test_fullgraph_compile_through_the_public_api_on_a_first_call():
    # Runs in a fresh interpreter: the first call of the process is the one being traced, with
    # the default validate=None (no host read while compiling).
    code = """
import torch, fused_losses as fl
x = torch.randn(6, 4, requires_grad=True); t = torch.tensor([0, 1, 2, 3, -100, 1])
fn = torch.compile(lambda x, t: fl.focal(x, t, gamma=2.0), fullgraph=True, backend="aot_eager")
out = fn(x, t); out.backward()
ref = fl.reference.focal(x.detach().double(), t)
assert abs(float(out.detach()) - float(ref)) < 1e-5 * abs(float(ref)), (out, ref)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
