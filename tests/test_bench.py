"""Smoke test of benchmarks/bench.py: one tiny case in-process, checking the files and their
columns. No timing is asserted (timings are not test material); numbers are only checked to be
numbers."""
import csv
import math

import pytest
import torch

import fused_losses as fl
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
    assert suite["scaling"]  # 1 vs N thread scaling of the fused and compiled fwd+bwd
    shapes = {name: bench.CASES_BY_NAME[name].shapes["cpu"] for name in suite["cases"]}
    seg = (4, 19, 128, 256)
    assert shapes == {"classify_focal_80": (262144, 80), "retinanet_float": (262144, 80),
                      "retinanet_labels": (262144, 80), "retinanet_weighted": (262144, 80), "cityscapes_focal": seg,
                      "cityscapes_ohem": seg, "cityscapes_ghmc": seg}
    gen = torch.Generator().manual_seed(0)
    tiny = {"classify_focal_80": (16, 80), "retinanet_float": (16, 80), "retinanet_labels": (16, 80),
            "cityscapes_focal": (1, 19, 4, 8)}
    built = {n: bench.CASES_BY_NAME[n].build(tiny[n], torch.device("cpu"), torch.float32, gen) for n in tiny}
    assert bench.CASES_BY_NAME["classify_focal_80"].loss == "focal"
    assert built["classify_focal_80"].kwargs == dict(gamma=2.0, reduction="mean")
    assert built["retinanet_float"].args[1].is_floating_point()
    labels = bench.CASES_BY_NAME["retinanet_labels"].build((4096, 80), torch.device("cpu"), torch.float32, gen)
    assert not labels.args[1].is_floating_point() and labels.kwargs["reduction"] == "sum"
    ignored = (labels.args[1] == labels.kwargs["ignore_index"]).double().mean().item()
    assert 0.06 < ignored < 0.10  # ~8% of the anchors ignored
    # mmdet's RetinaNet call: ignored anchors get label C and weight 0, 'mean' with avg_factor = num_pos
    weighted = bench.CASES_BY_NAME["retinanet_weighted"].build((4096, 80), torch.device("cpu"), torch.float32, gen)
    x, lab = weighted.args
    kw = weighted.kwargs
    assert kw["reduction"] == "mean" and kw["weight"].shape == (4096,) and kw["avg_factor"].dim() == 0
    assert int(lab.max()) == 80 and 0.06 < float((kw["weight"] == 0).double().mean()) < 0.10
    assert float(kw["avg_factor"]) == float((lab < 80).sum())
    ref = bench._reference_fn("sigmoid_focal")(x, lab, **bench._reference_kwargs("sigmoid_focal", weighted))
    want = fl.sigmoid_focal(x.double(), lab, reduction="none", backend="reference")
    assert torch.allclose(ref.double(), (want * kw["weight"][:, None]).sum() / kw["avg_factor"], rtol=1e-5)
    assert bench.CASES_BY_NAME["cityscapes_focal"].loss == "focal"
    assert built["cityscapes_focal"].kwargs["ignore_index"] == 255
    # the segmentation OHEM / GHM-C cases at the suite's shape: mmseg's thresh 0.7 with min_kept 6250 per
    # 128 x 256 image (25000 in all), softmax GHM-C with 10 bins; both read the logits twice
    ohem = bench.CASES_BY_NAME["cityscapes_ohem"].build(seg, torch.device("cpu"), torch.float32, gen)
    assert ohem.kwargs == dict(thresh=0.7, ignore_index=255, min_kept=6250)
    assert fl.reference.ohem_min_kept_total(ohem.args[0], ohem.kwargs["min_kept"]) == 25000
    ghmc = bench.CASES_BY_NAME["cityscapes_ghmc"]
    assert ghmc.loss == "ghmc" and ghmc.build((1, 19, 4, 8), torch.device("cpu"), torch.float32, gen).kwargs == dict(
        bins=10, use_sigmoid=False, ignore_index=255)
    assert bench.fused_bytes(bench.CASES_BY_NAME["cityscapes_ohem"], ohem) == ohem.floor_fwdbwd + ohem.floor_fwd
    assert bench.fused_bytes(bench.CASES_BY_NAME["classify_focal_80"], built["classify_focal_80"]) == \
        built["classify_focal_80"].floor_fwdbwd


def test_scaling_columns_and_isa_header(tmp_path):
    """--scaling with 2 threads adds the 1-thread time and the scaling ratio of the timed fused / compiled rows,
    and every result header names the CPU's instruction sets."""
    result = bench.main(["--cases", "longtail_focal_1000", "--providers", "eager", "--device", "cpu", "--threads",
                         "2", "--scaling", "--repeats", "2", "--warmup-s", "0", "--rep-s", "0.01", "--out-dir",
                         str(tmp_path), "--no-plot"])
    text = result["md"].read_text()
    assert "- CPU ISA: " in text and "ATen CPU capability" in text
    assert "| MB floor / fused | 1-thread ms | scaling | note |" in text
    assert all(r["isa"] == result["meta"]["isa"] for r in result["rows"])
    isa = bench.cpu_isa()
    flags = open("/proc/cpuinfo").read()
    assert ("avx2" in isa) == (" avx2" in flags) and ("avx512f" in isa.split(";")[0].replace("no avx512f", "")) == (
        " avx512f" in flags)
    # eager is not a scaled provider; a fused stand-in is (the reference behind the 'cpu' name)
    assert all(math.isnan(r["ms_1thread"]) for r in result["rows"])


@pytest.mark.parametrize("case", [c.name for c in bench.CASES])
def test_every_case_builds_and_validates(case):
    """Each case's inputs pass the public API's validation (tiny shapes, no timing)."""
    c = bench.CASES_BY_NAME[case]
    shape = next(iter(c.shapes.values()))
    tiny = (16, shape[1]) if len(shape) == 2 else (1, shape[1], 4, 8)  # keep the class count
    inp = c.build(tiny, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    kwargs = bench._reference_kwargs(c.loss, inp)
    loss = bench._reference_fn(c.loss)(*inp.args, **kwargs)
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
    assert math.isnan(rows[("fused-cpu", "fwdbwd")]["ms_1thread"])  # 1 thread: no scaling measured
    scaled = bench.main(["--cases", "longtail_ib_1000", "--device", "cpu", "--threads", "2", "--scaling",
                         "--repeats", "2", "--warmup-s", "0", "--rep-s", "0.01", "--out-dir", str(tmp_path),
                         "--no-plot", "--providers", "fused,eager"])
    rows = {(r["provider"], r["mode"]): r for r in scaled["rows"]}
    fb = rows[("fused-cpu", "fwdbwd")]
    assert fb["ms_1thread"] > 0 and fb["thread_scaling"] == pytest.approx(fb["ms_1thread"] / fb["ms_median"])
    assert math.isnan(rows[("fused-cpu", "fwd")]["ms_1thread"]) and math.isnan(rows[("eager", "fwdbwd")]["ms_1thread"])
    assert "| longtail_ib_1000 | 256x1000 | float32 | fused-cpu |" in result["md"].read_text()
