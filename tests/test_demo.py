"""The demo (`python -m fused_losses.demo`, `make demo`) end to end on a tiny run.

Checks the plumbing only: the output files, the table's and CSV's columns, one row per loss.
Accuracies are not checked (a 1-epoch run on 100 digits learns next to nothing).
"""
import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from fused_losses import demo  # noqa: E402  (after the skips: demo.run needs the three above)

# 10 digits per class: 8 training, 2 test; the minority digit keeps max(1, 0.01 x 8) = 1 image.
TINY_ARGS = ["--epochs", "1", "--per-class", "10", "--batch-size", "16", "--no-progress"]


def test_tiny_run_end_to_end(tmp_path):
    # One test, not a module fixture shared by several: under pytest-xdist each worker would
    # repeat the run.
    rows = demo.run(demo.parse_args(TINY_ARGS + ["--out", str(tmp_path)]))
    loss_names = [spec.name for spec in demo.LOSSES]

    png = tmp_path / "results.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(tmp_path / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == demo.RESULT_COLUMNS
        csv_rows = list(reader)
    assert [row["loss"] for row in csv_rows] == loss_names
    for row in csv_rows:
        for column in demo.RESULT_COLUMNS[1:]:
            value = float(row[column])
            assert np.isfinite(value) and value >= 0
            if column.endswith("_pct"):
                assert value <= 100

    table = demo.format_table(rows, minority=6).splitlines()
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == [
        "loss", "digit 6 acc %", "overall acc %", "macro-F1 %", "train time s"]
    assert [line.split("|")[1].strip() for line in table[2:]] == loss_names


def test_minority_cut_keeps_at_least_one_image():
    labels = np.repeat(np.arange(demo.NUM_CLASSES), 50)
    train, test = demo.stratified_split(labels)
    assert np.bincount(labels[test], minlength=10).tolist() == [10] * 10
    assert not set(train) & set(test)
    for ratio, kept in [(0.01, 1), (0.1, 4), (1.0, 40)]:
        cut = demo.cut_class(train, labels, minority=6, ratio=ratio, seed=0)
        counts = np.bincount(labels[cut], minlength=10)
        assert counts[6] == kept and all(counts[k] == 40 for k in range(10) if k != 6)


def test_bad_flags_are_rejected():
    for bad in (["--ratio", "0"], ["--ratio", "1.5"], ["--minority", "10"], ["--epochs", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)


# Makes the demo's own dependencies unimportable (as after a plain `pip install .`), before
# anything imports them; torch works without numpy.
_HIDE_DEMO_DEPENDENCIES = textwrap.dedent("""
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("numpy", "tqdm", "matplotlib", "mlxtend"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    import runpy
    sys.argv = ["python -m fused_losses.demo"] + sys.argv[1:]
    runpy.run_module("fused_losses.demo", run_name="__main__", alter_sys=True)
""")


def _demo_with_only_torch(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", _HIDE_DEMO_DEPENDENCIES, *args], cwd=repo, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=repo))


def test_help_works_with_only_torch_and_missing_dependencies_are_listed_at_once():
    shown = _demo_with_only_torch("--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "usage: python -m fused_losses.demo" in shown.stdout and "--seed" in shown.stdout

    failed = _demo_with_only_torch("--epochs", "1", "--per-class", "10", "--no-progress")
    assert failed.returncode == 1
    # One message naming all four, with the command that installs them (torch itself may warn
    # first that it found no NumPy).
    lines = failed.stderr.splitlines()
    first = [k for k, line in enumerate(lines) if line.startswith("python -m fused_losses.demo needs")]
    assert len(first) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "needs numpy, tqdm, matplotlib, mlxtend, which are not installed" in lines[first[0]]
    assert lines[first[0] + 1].strip() == f"{sys.executable} -m pip install numpy tqdm matplotlib mlxtend"
    assert '.[demo]' in failed.stderr
