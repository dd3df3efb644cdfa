"""A missing or broken compiled extension: the real cause, the fix, and one warning.

Each case runs in a fresh interpreter (the extension is loaded once per process, at import):
  - missing: a copy of the package without its .so files (a checkout or install never built);
  - broken: an import hook makes fused_losses._C (or _C_cuda) fail to load with the error a
    torch upgrade gives (undefined symbol), before fused_losses is imported;
  - stale: an import hook puts modules registering no ops in their place (an old build);
  - only the GPU missing (this machine, or any CPU-only one): no warning at all.
The losses must still be right (they run on the reference backend) and the warning must come once,
at the first call that falls back, not at import.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_losses import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fails the import of the module named BROKEN with the error an ABI mismatch gives (the file is
# "found", so this is a broken extension, not a missing one).
BREAK_MODULE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class _BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == BROKEN else None

        def create_module(self, spec):
            raise ImportError(f"/site-packages/{spec.name.replace('.', '/')}.abi3.so: undefined symbol: "
                              "_ZN3c1017RegisterOperatorsD1Ev")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _BrokenExtension())
""")

# Imports fused_losses (no warning allowed there), then calls losses on CPU tensors twice and
# reports the warnings, the backends, and the largest difference from the float64 reference.
CALL_LOSSES = textwrap.dedent("""
    import json, warnings
    import torch
    warnings.simplefilter("error")          # importing fused_losses must not warn
    import fused_losses as fl
    from fused_losses import reference
    status = {k: [v.available, v.reason] for k, v in fl.backends().items()}
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (16,))
    errors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            errors.append(float((fl.focal(x, t) - reference.focal(x, t)).abs()))
            errors.append(float((fl.ohem(x, t) - reference.ohem(x, t)).abs()))
            errors.append(float((fl.sigmoid_focal(x, t, reduction="sum")
                                 - reference.sigmoid_focal(x, t, reduction="sum")).abs()))
    try:
        fl.focal(x, t, backend="cpu")
        explicit = None
    except RuntimeError as exc:
        explicit = str(exc)
    print(json.dumps({"status": status, "max_error": max(errors), "explicit_cpu": explicit,
                      "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
""")


def _run(code: str, cwd: str = REPO) -> dict:
    env = dict(os.environ, PYTHONPATH=cwd)
    env.pop("FUSED_LOSSES_BACKEND", None)  # the automatic choice is under test
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fused_warnings(result: dict) -> list:
    return [message for category, message in result["warnings"] if "fused_losses" in message]


def _assert_names_the_fix(reason: str) -> None:
    assert "pip install --no-build-isolation --force-reinstall" in reason and "make build" in reason, reason
    assert "circular import" not in reason, reason


# What an editable install of another source tree adds to sys.meta_path: a finder, after the
# path-based one, that answers for fused_losses' submodules from that tree (here: the repo).
OTHER_TREE_FINDER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class _OtherTree(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("fused_losses."):
                return importlib.machinery.PathFinder.find_spec(name, [OTHER_TREE])
            return None

    sys.meta_path.append(_OtherTree())
""")


@pytest.mark.parametrize("other_tree", [False, True], ids=["alone", "beside_another_built_tree"])
def test_missing_extension_warns_once_with_cause_and_fix(tmp_path, other_tree):
    # A copy of the package without any compiled module: what a source checkout or an install
    # without a build looks like. Beside another, built tree (an editable install of it in the
    # same venv), that tree's .so must not be loaded in place of the missing one.
    shutil.copytree(os.path.join(REPO, "fused_losses"), tmp_path / "fused_losses",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    prefix = f"OTHER_TREE = {os.path.join(REPO, 'fused_losses')!r}\n" + OTHER_TREE_FINDER if other_tree else ""
    result = _run(prefix + CALL_LOSSES, cwd=str(tmp_path))

    available, reason = result["status"]["cpu"]
    assert not available
    assert "fused_losses._C is missing" in reason and str(tmp_path / "fused_losses") in reason, reason
    if other_tree:  # (the venv's own editable install, if any, may answer before the test's finder)
        assert "another copy of fused_losses, is not used" in reason, reason
    _assert_names_the_fix(reason)
    assert result["max_error"] < 1e-12  # the reference ran, and it is right
    warned = _fused_warnings(result)
    assert len(warned) == 1, result["warnings"]  # two rounds of three losses: one warning
    assert result["warnings"][0][0] == "UserWarning"
    assert "cpu tensors run on the slower 'reference' backend" in warned[0] and reason in warned[0]
    assert result["explicit_cpu"] is not None and "fused_losses._C is missing" in result["explicit_cpu"]


def test_broken_extension_warns_once_with_the_abi_cause():
    result = _run("BROKEN = 'fused_losses._C'\n" + BREAK_MODULE + CALL_LOSSES)

    available, reason = result["status"]["cpu"]
    assert not available
    assert "fused_losses._C is broken" in reason and "ABI mismatch" in reason, reason
    assert "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev" in reason, reason  # the original text
    assert torch.__version__ in reason
    _assert_names_the_fix(reason)
    assert not result["status"]["cuda"][0]
    assert result["max_error"] < 1e-12
    warned = _fused_warnings(result)
    assert len(warned) == 1 and reason in warned[0], result["warnings"]


def test_stale_extension_warns_once():
    # An extension older than the Python code: it loads, but registers none of the ops (here: an
    # empty module in place of each compiled one).
    stale = textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys, types

        class _OldBuild(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name in ("fused_losses._C", "fused_losses._C_cuda"):
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                return types.ModuleType(spec.name)

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, _OldBuild())
    """)
    result = _run(stale + CALL_LOSSES)
    available, reason = result["status"]["cpu"]
    assert not available and "fused_losses._C lacks the ops" in reason and "softmax_focal_forward" in reason, reason
    _assert_names_the_fix(reason)
    assert result["max_error"] < 1e-12
    warned = _fused_warnings(result)
    assert len(warned) == 1 and reason in warned[0], result["warnings"]


def test_no_warning_when_only_the_gpu_is_missing():
    # The extension is fine; no GPU (or its absence simulated on a GPU machine): every CPU call
    # runs on the fused cpu kernels and nothing warns.
    code = "import torch\ntorch.cuda.is_available = lambda: False\n" + CALL_LOSSES
    result = _run(code)
    assert result["status"]["cpu"][0], result["status"]["cpu"]
    assert not result["status"]["cuda"][0] and "no CUDA device is visible" in result["status"]["cuda"][1]
    assert result["warnings"] == [] and result["explicit_cpu"] is None
    assert result["max_error"] < 1e-12


def test_cuda_part_never_built_does_not_warn_but_a_broken_one_does(tmp_path):
    # Without a GPU, a CUDA tensor cannot be made, so the fallback hook is called directly with
    # what the automatic choice passes for a CUDA tensor that lands on 'triton'.
    probe = textwrap.dedent("""
        import json, warnings
        import torch
        torch.cuda.is_available = lambda: False
        from fused_losses import _ext
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _ext.warn_fallback("cuda", "triton")
            _ext.warn_fallback("cuda", "triton")
            _ext.warn_fallback("cpu", "reference")
        cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fused_losses::softmax_focal_forward", "CUDA")
        print(json.dumps({"loaded": _ext.loaded(), "cuda": _ext.compiled_with_cuda(), "cuda_error": _ext.cuda_load_error(),
                          "cuda_kernel": cuda_kernel,
                          "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
    """)
    # Never built: a copy of the package holding _C but not _C_cuda.
    package = tmp_path / "fused_losses"
    shutil.copytree(os.path.join(REPO, "fused_losses"), package,
                    ignore=shutil.ignore_patterns("_C_cuda*.so", "__pycache__"))
    absent = _run(probe, cwd=str(tmp_path))
    assert absent["loaded"] and not absent["cuda"] and "built without its CUDA part" in absent["cuda_error"]
    assert not absent["cuda_kernel"]  # _C alone holds no CUDA code: the CPU-only build is complete
    assert absent["warnings"] == []

    broken = _run("BROKEN = 'fused_losses._C_cuda'\n" + BREAK_MODULE + probe)
    assert broken["loaded"] and not broken["cuda"]
    assert "fused_losses._C_cuda is broken" in broken["cuda_error"], broken["cuda_error"]
    assert len(broken["warnings"]) == 1, broken["warnings"]
    category, message = broken["warnings"][0]
    assert category == "UserWarning" and "cuda tensors run on the slower 'triton' backend" in message
    assert broken["cuda_error"] in message


def test_this_process_loaded_the_extension_it_reports():
    # The in-repo test run imports the repo's package, with its compiled module next to it.
    import fused_losses

    assert os.path.dirname(fused_losses.__file__) == os.path.join(REPO, "fused_losses")
    assert _ext.loaded(), _ext.load_error()
    assert os.path.dirname(sys.modules["fused_losses._C"].__file__) == os.path.join(REPO, "fused_losses")
