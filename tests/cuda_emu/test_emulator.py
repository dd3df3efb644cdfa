"""Self-tests of the CUDA emulator (csrc/cuda_emu): deliberately broken kernels
(tests/cuda_emu/broken_kernels.cpp, compiled through the same layer as csrc/cuda/*.cu) must be
caught under every schedule, and their correct twins must pass under every schedule.

Caught means: a wrong result (a missing barrier reads the 0xFF fill of shared memory, a
butterfly starting at the wrong offset mixes rows, a block-strided loop counts elements twice,
unzeroed shared counters), a reported error (a shuffle some lanes skip, lanes at two different
shuffles, an early exit or a divergent __syncthreads), or, for an off-by-one read past a heap
block, an AddressSanitizer report (the ASan build of the program).
"""
from __future__ import annotations

import functools
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCHEDULES = ["threads=forward,blocks=forward,sms=132", "threads=reverse,blocks=reverse,sms=1",
             "threads=random,seed=3,sms=2"]

CORRECT = ["block_sum", "grid_stride", "group_sum", "histogram", "neighbour_sum"]
WRONG = ["missing_barrier", "broken_grid_stride", "butterfly_wrong_start", "unzeroed_shared"]
ERROR = {  # case -> a phrase of the report
    "divergent_shuffle": "exited",
    "split_shuffle": "divergent shuffle",
    "early_exit_barrier": "early exit",
    "divergent_barrier": "divergent barrier",
}


@functools.lru_cache(maxsize=None)
def _program(asan: bool) -> str:
    out_dir = os.path.join(ROOT, "build", "cuda_emu_selftest")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "broken_kernels_asan" if asan else "broken_kernels")
    sources = [os.path.join(HERE, "broken_kernels.cpp"), os.path.join(ROOT, "csrc", "cuda_emu", "runtime.cpp"),
               os.path.join(ROOT, "csrc", "cuda_emu", "cuda_emu.h")]
    if not os.path.exists(exe) or os.path.getmtime(exe) < max(os.path.getmtime(s) for s in sources):
        flags = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc")]
        if asan:
            flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        tmp = f"{exe}.{os.getpid()}.tmp"  # pytest-xdist workers may build it at the same time
        subprocess.run(["g++", *flags, *sources[:2], "-o", tmp], check=True)
        os.replace(tmp, exe)
    return exe


def _run(case: str, schedule: str, asan: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FL_CUDA_EMU", None)
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    return subprocess.run([_program(asan), case, schedule], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", CORRECT)
def test_correct_kernels_pass(case, schedule):
    result = _run(case, schedule)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok", f"{case} under {schedule}: {result.stdout}"


# Blind spots, kept honest: under reverse thread order the thread that reads the warp sums
# (thread 0) runs last in every round, so every warp has written its sum before the read and the
# missing barrier goes unseen. `make test-cuda-emu` therefore runs forward and random orders.
BLIND = {("missing_barrier", SCHEDULES[1])}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", WRONG)
def test_broken_kernels_give_wrong_results(case, schedule):
    result = _run(case, schedule)
    assert result.returncode == 0, result.stderr
    if (case, schedule) in BLIND:
        assert result.stdout.strip() == "ok", f"{case} under {schedule}: a known blind spot changed: {result.stdout}"
        return
    assert result.stdout.startswith("wrong"), f"{case} under {schedule} went unnoticed: {result.stdout}"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", sorted(ERROR))
def test_broken_kernels_are_reported(case, schedule):
    result = _run(case, schedule)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("error") and ERROR[case] in result.stdout, \
        f"{case} under {schedule}: {result.stdout}"


def test_device_assert_raises_with_its_message_or_is_recorded():
    result = _run("device_assert", "threads=forward,asserts=raise")
    assert result.stdout.startswith("error") and "device-side assert" in result.stdout
    assert "index out of range" in result.stdout and "broken_kernels.cpp" in result.stdout
    recorded = _run("device_assert", "threads=forward,asserts=record")  # the thread continued
    assert recorded.stdout.strip() == "ok", recorded.stdout


def test_off_by_one_read_is_caught_by_address_sanitizer():
    result = _run("off_by_one_read", SCHEDULES[0], asan=True)
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-2000:]
    clean = _run("neighbour_sum", SCHEDULES[0], asan=True)
    assert clean.returncode == 0 and clean.stdout.strip() == "ok", clean.stderr[-2000:]
