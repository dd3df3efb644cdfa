"""Smoke test of benchmarks/bench.py: one tiny case in-process, checking the files and their
columns. No timing is asserted (timings are not test material); numbers are only checked to be
numbers."""
import csv
import math

import pytest
import torch

from benchmarks import bench


def test_bench_one_case_writes_csv_markdown_and_plot(tmp_path):
    result = bench.main(["--cases", "longtail_focal_1000", "--providers", "eager,cross_entropy,torchvision",
                         "--device", "cpu", "--threads", "1", "--repeats", "2", "--warmup-s", "0",
                         "--rep-s", "0.01", "--out-dir", str(tmp_path)])
    assert result["csv"].parent == tmp_path and result["csv"].name.startswith("small-cpu-")

    with open(result["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_COLUMNS
        rows = list(reader)
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("eager", "cross_entropy") for m in ("fwd", "fwdbwd")}
    for r in rows:
        assert r["case"] == "longtail_focal_1000" and r["shape"] == "256x1000" and r["dtype"] == "float32"
        assert r["device"] == "cpu" and r["threads"] == "1" and r["torch"] == torch.__version__
        assert r["git_commit"] and r["date"] and r["command"].startswith("python -m benchmarks.bench")
        for col in ("ms_median", "ms_p25", "ms_p75", "gbps", "copy_gbps", "pct_copy_bw", "speedup_vs_eager"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, col
        assert int(r["floor_bytes"]) > 0 and r["repeats"] == "2" and r["timer"] == "perf_counter"
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == 1.0 and float(r["rel_err_vs_eager"]) == 0.0
        else:  # cross_entropy is a speed-of-light row here (a different loss): not compared
            assert r["rel_err_vs_eager"] == "nan" and "speed-of-light" in r["note"]
        assert r["speedup_vs_compile"] == "nan"  # compile was not among the providers

    text = result["md"].read_text()
    assert "| case | shape | dtype | provider | fwd ms | fwd+bwd ms | IQR % | vs eager | vs compile |" in text
    assert "| longtail_focal_1000 | 256x1000 | float32 | eager |" in text
    assert "| longtail_focal_1000 | 256x1000 | float32 | cross_entropy |" in text
    assert "| torchvision |" not in text  # a sigmoid-only peer: not applicable to a softmax case
    assert "command: `python -m benchmarks.bench --cases longtail_focal_1000" in text
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run appends to the same CSV (one header)
    bench.main(["--cases", "longtail_focal_1000", "--providers", "eager", "--device", "cpu", "--threads", "1",
                "--repeats", "2", "--warmup-s", "0", "--rep-s", "0.01", "--out-dir", str(tmp_path), "--no-plot"])
    with open(result["csv"], newline="") as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("run_id,") for line in lines) == 1 and len(lines) == 1 + 4 + 2


def test_cpu_suite_is_the_cpu_kernel_issue_cases():
    suite = bench.SUITES["cpu"]
    assert suite["providers"] == ["fused-cpu", "compile", "eager"] and suite["dtypes"] == ["float32"]
    shapes = {name: bench.CASES_BY_NAME[name].shapes["cpu"] for name in suite["cases"]}
    assert shapes == {"classify_focal_80": (262144, 80), "retinanet_float": (262144, 80),
                      "retinanet_labels": (262144, 80), "cityscapes_focal": (4, 19, 128, 256)}
    gen = torch.Generator().manual_seed(0)
    tiny = {"classify_focal_80": (16, 80), "retinanet_float": (16, 80), "retinanet_labels": (16, 80),
            "cityscapes_focal": (1, 19, 4, 8)}
    built = {n: bench.CASES_BY_NAME[n].build(tiny[n], torch.device("cpu"), torch.float32, gen) for n in tiny}
    assert bench.CASES_BY_NAME["classify_focal_80"].loss == "focal"
    assert built["retinanet_float"].args[1].is_floating_point()
    assert not built["retinanet_labels"].args[1].is_floating_point()
    assert bench.CASES_BY_NAME["cityscapes_focal"].loss == "focal"
    assert built["cityscapes_focal"].kwargs["ignore_index"] == 255


@pytest.mark.parametrize("case", [c.name for c in bench.CASES])
def test_every_case_builds_and_validates(case):
    """Each case's inputs pass the public API's validation (tiny shapes, no timing)."""
    c = bench.CASES_BY_NAME[case]
    shape = next(iter(c.shapes.values()))
    tiny = (16, shape[1]) if len(shape) == 2 else (1, shape[1], 4, 8)  # keep the class count
    inp = c.build(tiny, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    kwargs = bench._reference_kwargs(c.loss, inp)
    loss = getattr(bench.reference, c.loss)(*inp.args, **kwargs)
    assert loss.dim() == 0 and inp.floor_fwdbwd > inp.floor_fwd > 0


def test_an_available_fused_backend_is_picked_up(tmp_path, monkeypatch):
    """A backend that fl.backends() reports available shows up as a provider, called through the
    public API (here a stand-in 'cpu' backend that runs the reference)."""
    from fused_losses import _backends, reference
    fake = _backends.Backend(name="cpu", availability=lambda: (True, "stand-in for the test"), device_types=("cpu",),
                             losses={loss: getattr(reference, loss) for loss in _backends.LOSSES})
    monkeypatch.setitem(_backends._loaded, "cpu", fake)
    result = bench.main(["--cases", "longtail_ib_1000", "--device", "cpu", "--threads", "1", "--repeats", "2",
                         "--warmup-s", "0", "--rep-s", "0.01", "--out-dir", str(tmp_path), "--no-plot",
                         "--providers", "fused,eager"])
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("fused-cpu", "eager") for m in ("fwd", "fwdbwd")}
    assert rows[("fused-cpu", "fwdbwd")]["rel_err_vs_eager"] == 0.0
    assert "| longtail_ib_1000 | 256x1000 | float32 | fused-cpu |" in result["md"].read_text()
