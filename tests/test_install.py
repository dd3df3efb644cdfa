"""Packaging (issue 26): the license and version metadata, what `pip install .` compiles by default
(setup.py's build plan, with and without a visible GPU), and a non-editable wheel that installs
outside the source tree and works from another directory.

The wheel test builds a wheel (`pip wheel --no-build-isolation --no-deps .`, in the tree: ninja
reuses the objects of an earlier in-place build, else it compiles the CPU part, about 3.5 min on 2
cores), so it runs only with FL_TEST_WHEEL=1 (.ci/run sets it).
"""
import json
import os
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import fused_losses

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_pyprojects():
    version = PYPROJECT["project"]["version"]
    assert fused_losses._FALLBACK_VERSION == version
    assert fused_losses.__version__ == version


def test_license_file_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "the fused_losses authors" in text
    assert "Neither the name of the copyright holder" in text
    assert PYPROJECT["project"]["license"] == "BSD-3-Clause"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


# --------------------------------------------------------------------------------------------
# setup.py's build plan: which modules, which archs, and the one line that says so
# --------------------------------------------------------------------------------------------
def _have_nvcc():
    return cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def _plan(monkeypatch, *, flag=None, archs=None, gpus=()):
    """Runs setup.py with setuptools.setup replaced: (extension names, the printed line, the arch
    list it leaves in TORCH_CUDA_ARCH_LIST). gpus: the compute capabilities of the pretend GPUs."""
    import setuptools

    for name, value in (("FUSED_LOSSES_BUILD_CUDA", flag), ("TORCH_CUDA_ARCH_LIST", archs)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", cpp_extension.CUDA_HOME or ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i])
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    ns = runpy.run_path(str(ROOT / "setup.py"))
    names = [ext.name for ext in captured["ext_modules"]]
    (line,) = ns["_BUILD_PLAN"]
    return names, line, os.environ.get("TORCH_CUDA_ARCH_LIST")


needs_cuda_toolchain = pytest.mark.skipif(not (_have_nvcc() and torch.version.cuda),
                                          reason="needs nvcc and a CUDA build of torch")


@needs_cuda_toolchain
def test_no_visible_gpu_builds_the_cpu_part_only(monkeypatch):
    names, line, _ = _plan(monkeypatch)
    assert names == ["fused_losses._C"]
    assert line.startswith("fused_losses build: compiling the CPU part only") and "no GPU is visible" in line
    assert "FUSED_LOSSES_BUILD_CUDA=1" in line


@needs_cuda_toolchain
def test_visible_gpus_give_their_archs(monkeypatch):
    names, line, archs = _plan(monkeypatch, gpus=[(9, 0), (8, 6), (9, 0)])
    assert names == ["fused_losses._C", "fused_losses._C_cuda"]
    assert archs == "8.6;9.0"
    assert "for sm 8.6;9.0 (the visible GPUs" in line


@needs_cuda_toolchain
def test_torch_cuda_arch_list_wins(monkeypatch):
    names, line, archs = _plan(monkeypatch, archs="8.0", gpus=[(9, 0)])
    assert names[-1] == "fused_losses._C_cuda" and archs == "8.0" and "sm 8.0 (TORCH_CUDA_ARCH_LIST)" in line


@needs_cuda_toolchain
def test_build_cuda_switch(monkeypatch):
    names, line, archs = _plan(monkeypatch, flag="1")  # no GPU: the broad default list
    assert names[-1] == "fused_losses._C_cuda" and "FUSED_LOSSES_BUILD_CUDA=1" in line
    assert "9.0" in archs.split(";") and "no GPU visible: the default list" in line
    names, line, _ = _plan(monkeypatch, flag="0", gpus=[(9, 0)])
    assert names == ["fused_losses._C"] and "FUSED_LOSSES_BUILD_CUDA=0" in line
    with pytest.raises(RuntimeError, match="FUSED_LOSSES_BUILD_CUDA='yes'"):
        _plan(monkeypatch, flag="yes")


# --------------------------------------------------------------------------------------------
# The wheel, installed outside the tree
# --------------------------------------------------------------------------------------------
_CHECK = r"""
import json, sys
import torch
import fused_losses as fl
from fused_losses import _C, _ext
x = torch.randn(64, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
t = torch.randint(0, 7, (64,), generator=torch.Generator().manual_seed(1))
loss = fl.focal(x, t, backend="cpu")
loss.backward()
x64 = x.detach().double().requires_grad_()
ref = fl.focal(x64, t, backend="reference")
ref.backward()
from importlib.metadata import metadata
meta = metadata("fused_losses")
print(json.dumps({"file": fl.__file__, "ext": _C.__file__, "version": fl.__version__, "cwd_path": sys.path[:3],
                  "loss_err": abs(float(loss) - float(ref)) / abs(float(ref)),
                  "grad_err": float((x.grad.double() - x64.grad).norm() / x64.grad.norm()),
                  "cuda_part": _ext.compiled_with_cuda(), "cpu": fl.backends()["cpu"].available,
                  "license": meta.get("License-Expression")}))
"""


@pytest.mark.skipif(os.environ.get("FL_TEST_WHEEL") != "1",
                    reason="builds a wheel (minutes without an earlier in-place build): FL_TEST_WHEEL=1 runs it")
def test_wheel_installs_and_works_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_LOSSES_BUILD_CUDA", "PYTHONPATH")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's ninja
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                            "--no-cache-dir", "-w", str(wheels), str(ROOT)], env=env, capture_output=True, text=True,
                           timeout=1800)
    assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
    gpu = torch.cuda.is_available()
    plan = "compiling the CPU part (fused_losses._C) and the CUDA part" if gpu else "compiling the CPU part only"
    assert f"fused_losses build: {plan}" in build.stdout + build.stderr
    (wheel,) = wheels.glob("fused_losses-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_losses/_C.abi3.so" in names and "fused_losses/__init__.py" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    assert gpu or not any("_C_cuda" in name for name in names)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                              str(site), str(wheel)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, (install.stdout + install.stderr)[-5000:]
    # another directory, the install on the path, the source tree not
    run = subprocess.run([sys.executable, "-c", _CHECK], cwd=elsewhere, env=dict(env, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), got
    assert Path(got["ext"]).resolve().is_relative_to(site.resolve()), got
    assert not Path(got["file"]).resolve().is_relative_to(ROOT), got
    assert got["version"] == PYPROJECT["project"]["version"] and got["license"] == "BSD-3-Clause"
    assert got["cpu"] and got["cuda_part"] == gpu
    assert got["loss_err"] <= 1e-5 and got["grad_err"] <= 1e-5, got
