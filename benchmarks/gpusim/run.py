#!/usr/bin/env python3
"""`make gpu-sim`: the project's real CUDA kernels under GPGPU-Sim (simulated, uncalibrated).

Builds the standalone drivers of benchmarks/gpusim/ (no torch at run time) for the simulator
(compute_80 PTX, the simulator's shared libcudart), runs every case in a run folder holding the
config, parses `gpu_sim_cycle` of the measured kernel, runs ../shared/gpusim/copy.cu moving the
same bytes (read + write) with its own persistent grid, prints a table and writes
benchmarks/results/gpu-sim-<config>.json.

Grid: the launchers' grid_for rule, multiprocessors (the config's clusters x cores) x resident
blocks per multiprocessor. The resident blocks come from the sm_90 resources of the kernel
instance (ptxas -v of the same driver for sm_90: registers, shared memory; H100 limits), the
value cudaOccupancyMaxActiveBlocksPerMultiprocessor gives on an H100; the simulator's own
occupancy API is recorded too (`occupancy_api`) but not used (see README.md here).

Run it through make (the simulator's env.sh must be sourced):
    make gpu-sim SIM_CONFIG=slice-dram [GPU_SIM_CASES="focal80 sigmoid80"] [GPU_SIM_DTYPES=fp32]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # run as a script (make gpu-sim): the repository's benchmarks package
from benchmarks import gpu_budget  # noqa: E402  (the H100 occupancy rule)
GPUSIM = (ROOT / ".." / "shared" / "gpusim").resolve()
NVCC_SIM = ["-O3", "-std=c++20", "-cudart", "shared", "-gencode", "arch=compute_80,code=compute_80"]
NVCC_SM90 = ["-O3", "-std=c++20", "-cubin", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"]
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
NVCC = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")


@dataclass
class Case:
    name: str      # case id (--cases)
    driver: str    # benchmarks/gpusim/<driver>.cu
    kernel: str    # regex on the (mangled) kernel name of the measured launch
    instance: dict  # dtype -> the demangled sm_90 instance's name up to "(" ({T}: the C++ type)
    C: int
    rows: dict     # config name -> rows (N * S for channel-second); "default" for others
    S: int = 1     # channel-second spatial size (rows = N * S)
    label_bytes: int = 8  # int64 target per row

    def rows_for(self, config: str) -> int:
        return self.rows.get(config, self.rows["default"])


# rows: the grid (SMs x resident blocks) sweeps the problem several times over (the simulator's
# README). C = 80 on slice-dram: 16384 rows, 10.7 passes of the fp32 focal grid (48 blocks x 32
# rows), 4 of the bf16 one (64 x 64 rows; 2.7 with the 48 x 128 of before b72fbcb), 7-16 of the sigmoid grids (a 16-byte pack per
# thread); on the whole chip 65536 rows (fp32 focal: 396 x 32 rows, 5.2 passes). At 4096 rows (before 2026-12-07 08:00) the focal grids made 1-2.7 passes: the start
# (every warp waiting for its first loads) and the uneven last pass were a third of the time.
# instance: the demangled sm_90 kernel the launcher picks for these arguments ({T}: the C++ type
# of the dtype); softmax: pick_rows_kernel / softmax_launch_for (C = 80: fp32 20 16-byte packs per
# row, 8 lanes x 3 packs; bf16 20 8-byte packs, 4 lanes x 5; C = 1203: not a multiple of the pack, single
# values, a warp per row in registers; channel-second C = 19 <= 32: in registers). Update these
# when the launcher's choice changes (run.py fails when no sm_90 instance matches).
CASES = [
    Case("focal80", "softmax_driver", r"softmax_rows_kernel",
         {"fp32": "softmax_rows_kernel<{T}, {T}, 4, 8, 3>(", "bf16": "softmax_rows_kernel<{T}, {T}, 4, 4, 5>("}, 80,
         {"default": 16384, "h100-dram": 65536}),
    Case("focal1203", "softmax_driver", r"softmax_rows_kernel",
         {"fp32": "softmax_rows_kernel<{T}, {T}, 1, 32, 40>(", "bf16": "softmax_rows_kernel<{T}, {T}, 1, 32, 40>("},
         1203, {"default": 1024, "h100-dram": 8192}),
    Case("focal19cs", "softmax_driver", r"softmax_spatial_kernel",
         {"fp32": "softmax_spatial_kernel<{T}, {T}, 32, false>(", "bf16": "softmax_spatial_kernel<{T}, {T}, 32, false>("},
         19, {"default": 32768, "h100-dram": 262144}, S=16384),
    Case("sigmoid80", "sigmoid_driver", r"sigmoid_focal_kernel",
         {"fp32": "sigmoid_focal_kernel<{T}, float, {T}, true, 2>(", "bf16": "sigmoid_focal_kernel<{T}, float, {T}, true, 2>("},
         80, {"default": 16384, "h100-dram": 65536}),
]
CTYPE = {"fp32": "float", "bf16": "simbf16::bf16"}  # sim_bf16.h: the drivers' bf16 type


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def config_dir(config: str) -> Path:
    p = Path(config)
    if p.is_dir():
        return p.resolve()
    p = GPUSIM / "configs" / config
    if not p.is_dir():
        sys.exit(f"gpu-sim: no config folder {config} (names: {sorted(x.name for x in (GPUSIM / 'configs').iterdir())})")
    return p


def config_sms(cfg: Path) -> int:
    text = (cfg / "gpgpusim.config").read_text()
    clusters = int(re.search(r"^-gpgpu_n_clusters\s+(\d+)", text, re.M).group(1))
    cores = int(re.search(r"^-gpgpu_n_cores_per_cluster\s+(\d+)", text, re.M).group(1))
    return clusters * cores


def git_commit() -> str:
    rev = sh(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT).stdout.strip()
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT).stdout.strip()
    return rev + ("-dirty" if dirty else "")


def build(src: Path, out: Path, extra=()) -> Path:
    """nvcc for the simulator; rebuilt when the driver or any csrc header is newer."""
    deps = [src] + list((ROOT / "csrc").rglob("*.cuh")) + list((ROOT / "csrc").glob("*.h")) + list(HERE.glob("*.h"))
    if out.exists() and out.stat().st_mtime > max(d.stat().st_mtime for d in deps):
        return out
    print(f"gpu-sim: nvcc {src.relative_to(ROOT.parent) if ROOT.parent in src.parents else src}", flush=True)
    sh([NVCC, *NVCC_SIM, *extra, "-I", str(ROOT / "csrc"), "-o", str(out), str(src)])
    return out


def sm90_resources(src: Path, out_dir: Path, extra=()) -> dict:
    """{demangled kernel name: (registers, static shared bytes)} of the driver's kernels for sm_90."""
    res = sh([NVCC, *NVCC_SM90, *extra, "-I", str(ROOT / "csrc"), "-o", str(out_dir / (src.stem + ".sm90.cubin")), str(src)])
    kernels, current = {}, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[current] = (int(m.group(1)), int(smem.group(1)) if smem else 0)
        if "spill" in line and current and not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line):
            print(f"gpu-sim: warning: {current}: {line.strip()}", file=sys.stderr)
    names = list(kernels)
    demangled = sh(["c++filt"], input="\n".join(names)).stdout.splitlines() if names else []
    return {d: kernels[k] for k, d in zip(names, demangled)}


def h100_blocks_per_sm(regs: int, smem: int, threads: int = 256) -> int:
    """cudaOccupancyMaxActiveBlocksPerMultiprocessor on sm_90: the H100 occupancy rule of
    benchmarks/gpu_budget.py (warps_per_sm), in blocks; at least 1."""
    return max(1, gpu_budget.warps_per_sm(regs, smem, threads) // (threads // 32))


COLLECT = False  # --collect: parse the run folders of an earlier (possibly interrupted) run instead


def sim_launches(stdout: str) -> list[tuple[str, int]]:
    """(kernel name, gpu_sim_cycle) of every launch the simulator printed."""
    launches, name = [], None
    for line in stdout.splitlines():
        m = re.match(r"kernel_name = (\S+)", line)
        if m:
            name = m.group(1)
        m = re.match(r"gpu_sim_cycle = (\d+)", line)
        if m and name:
            launches.append((name, int(m.group(1))))
            name = None
    return launches


def run_sim(binary: Path, args, cfg: Path, run_dir: Path):
    """Runs binary under the simulator in run_dir (a copy of the config); returns (stdout, [(kernel, cycles)])."""
    if COLLECT:
        out = run_dir / "stdout.txt"
        if not out.exists():
            raise RuntimeError(f"--collect: no finished run in {run_dir}")
        stdout = out.read_text()
        launches = sim_launches(stdout)
        # the simulator's own total (wall seconds of the finished run, all its launches)
        m = re.findall(r"gpgpu_simulation_time = .*\((\d+) sec\)", stdout)
        return stdout, launches, float(m[-1]) if m else None
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for f in cfg.iterdir():
        shutil.copy(f, run_dir)
    t0 = time.time()
    p = subprocess.run([str(binary), *map(str, args)], cwd=run_dir, text=True, capture_output=True)
    (run_dir / "stdout.txt").write_text(p.stdout)
    (run_dir / "stderr.txt").write_text(p.stderr)
    launches = sim_launches(p.stdout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
        raise RuntimeError(f"{binary.name} {' '.join(map(str, args))}: exit {p.returncode} in {run_dir}\n{tail}")
    return p.stdout, launches, time.time() - t0


def driver_line(stdout: str, key: str) -> dict:
    """The `key k=v k=v ...` line a driver prints."""
    for line in stdout.splitlines():
        if line.startswith(key + " "):
            return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="slice-dram")
    ap.add_argument("--cases", default="", help="space/comma separated case names (default: all)")
    ap.add_argument("--dtypes", default="fp32 bf16")
    ap.add_argument("--rows", type=int, default=0, help="override the rows of every case")
    ap.add_argument("--build-dir", default=str(ROOT / "build" / "gpusim"))
    ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/gpu-sim-<config>.json)")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--collect", action="store_true",
                    help="no simulation: read the run folders an earlier run of the same cases left (its stdout.txt)")
    ap.add_argument("--commit", default="", help="with --collect: the git commit the runs were made at")
    args = ap.parse_args()
    global COLLECT
    COLLECT = args.collect

    if "gpgpu" not in os.environ.get("LD_LIBRARY_PATH", "") and "GPGPUSIM_ROOT" not in os.environ:
        sys.exit("gpu-sim: the simulator's env.sh is not sourced (run through `make gpu-sim`)")
    cfg = config_dir(args.config)
    config = cfg.name
    sms = config_sms(cfg)
    bdir = Path(args.build_dir).resolve()
    bdir.mkdir(parents=True, exist_ok=True)
    wanted = [c for c in re.split(r"[ ,]+", args.cases.strip()) if c]
    cases = [c for c in CASES if not wanted or c.name in wanted]
    dtypes = [d for d in re.split(r"[ ,]+", args.dtypes.strip()) if d]
    commit = args.commit or git_commit()
    print(f"gpu-sim: config {config} ({sms} SMs), git {commit}; simulated (GPGPU-Sim, uncalibrated)", flush=True)

    copy_bin = build(GPUSIM / "copy.cu", bdir / "copy")
    copy_cache: dict = {}
    results = []
    failed: list = []
    drivers: dict = {}
    for case in cases:
        rows = args.rows or case.rows_for(config)
        for dtype in dtypes:
            key = (case.driver, dtype)
            if key not in drivers:
                src = HERE / f"{case.driver}.cu"
                flag = [f"-DGPUSIM_DTYPE_{dtype.upper()}"]
                drivers[key] = (build(src, bdir / f"{case.driver}_{dtype}", flag), sm90_resources(src, bdir, flag))
            binary, resources = drivers[key]
            # The instance the driver launches for this dtype: its sm_90 registers size the grid.
            pattern = case.instance[dtype].format(T=CTYPE[dtype])
            found = [k for k in resources if pattern in k]
            if len(found) != 1:
                raise RuntimeError(f"{case.name} {dtype}: {len(found)} sm_90 kernels match {pattern!r}: {found or list(resources)}")
            kname = found[0]
            regs, smem = resources[kname]
            per_sm = h100_blocks_per_sm(regs, smem)
            resident = sms * per_sm
            try:
                stdout, launches, secs = run_sim(binary, [case.name, dtype, rows, case.C, case.S, resident, sms], cfg,
                                                 bdir / "run" / config / f"{case.name}-{dtype}")
            except RuntimeError as err:
                print(f"gpu-sim: {case.name} {dtype} FAILED: {err}", flush=True)
                failed.append(f"{case.name} {dtype}")
                continue
            check = driver_line(stdout, "CHECK")
            info = driver_line(stdout, "CASE")
            mine = [(k, c) for k, c in launches if re.search(case.kernel, k)]
            if len(mine) != 1:
                raise RuntimeError(f"{case.name} {dtype}: expected one launch matching {case.kernel}, got {launches}")
            cycles = mine[0][1]
            bytes_moved = int(info["bytes"])
            # copy.cu moves n floats (read + write: 8 n bytes); n a multiple of 4 (float4 loads).
            n = max(4, (bytes_moved // 8 + 3) // 4 * 4)
            if n not in copy_cache:
                cstdout, claunches, csecs = run_sim(copy_bin, [n, 1, sms * 8], cfg, bdir / "run" / config / f"copy-{n}")
                if "mismatches=0" not in cstdout:
                    raise RuntimeError(f"copy {n}: wrong result")
                copy_cache[n] = claunches[-1][1]
            copy_cycles = copy_cache[n]
            ok = check.get("ok") == "1"
            rec = {
                "case": case.name, "dtype": dtype, "C": case.C, "rows": rows, "S": case.S,
                "kernel": kname, "grid": int(info.get("grid", resident)), "grid_for_sm90": resident, "blocks_per_sm_sm90": per_sm,
                "regs_sm90": regs, "sim_blocks_per_sm": info.get("occupancy_api", "?"),
                "bytes": bytes_moved, "cycles": cycles, "copy_cycles": copy_cycles,
                "pct_copy": round(100.0 * copy_cycles / cycles, 1),
                "sim_insn": int(info["insn"]) if "insn" in info else None,
                "git_commit": commit, "config": config, "sms": sms,
                "result_check": ("ok" if ok else "FAILED") + f": loss rel {check.get('loss_rel', '?')}, "
                                 f"grad rel L2 {check.get('grad_rel', '?')} vs float64 on the CPU",
                "label": "simulated, GPGPU-Sim, uncalibrated", "cpu_seconds": None if secs is None else round(secs, 1),
            }
            results.append(rec)
            print(f"  {case.name:10s} {dtype:5s} C={case.C:<5d} rows={rows:<7d} grid={rec['grid']:<5d} "
                  f"cycles={cycles:<8d} copy={copy_cycles:<8d} {rec['pct_copy']:5.1f}% of copy  "
                  f"[{rec['result_check']}] ({'?' if secs is None else f'{secs:.0f}'} s)", flush=True)

    print()
    print(f"Simulated (GPGPU-Sim, config {config}, {sms} SMs, uncalibrated), git {commit}:")
    print(f"| case | dtype | C | rows | grid | regs (sm_90) | cycles | copy cycles | % of copy | check |")
    print(f"|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['case']} | {r['dtype']} | {r['C']} | {r['rows']} | {r['grid']} | {r['regs_sm90']} | {r['cycles']} "
              f"| {r['copy_cycles']} | {r['pct_copy']}% | {r['result_check'].split(':')[0]} |")
    if not args.no_json and results:
        out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu-sim-{config}.json"
        old = []
        if out.exists():  # keep the cases/dtypes this run did not redo
            done = {(r["case"], r["dtype"]) for r in results}
            old = [r for r in json.loads(out.read_text()) if (r["case"], r["dtype"]) not in done]
        out.write_text(json.dumps(old + results, indent=1) + "\n")
        print(f"gpu-sim: wrote {out}")
    if failed:
        print(f"gpu-sim: did not run: {', '.join(failed)}")
    return 0 if not failed and all(r["result_check"].startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
