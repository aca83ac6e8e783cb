"""Thread and precision choices (modeling_corinfomax.hardware) against the rules the README states."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_corinfomax import hardware


def cpuinfo_flags() -> set[str]:
    line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo")
def test_cpu_bf16_detection_agrees_with_the_kernels_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert hardware.cpu_runs_bf16_fast() == bool({"amx_bf16", "avx512_bf16"} & cpuinfo_flags())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below bf16: it would emulate it
    assert not hardware.cpu_runs_bf16_fast()


def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16():
    excludes = hardware.onednn_isa_cap_excludes_bf16
    for cap in ("AVX2", "avx2", "AVX512_CORE", "AVX512_CORE_VNNI", "SSE41", "AVX2_VNNI"):
        assert excludes({"ONEDNN_MAX_CPU_ISA": cap}) and excludes({"DNNL_MAX_CPU_ISA": cap}), cap
    for cap in ("", "ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10_1_512_AMX"):
        assert not excludes({"ONEDNN_MAX_CPU_ISA": cap}), cap
    assert not excludes({})


def test_precision_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_runs_bf16_fast", lambda: True)
    assert hardware.choose_mixed_precision("auto", cpu, {})[0] == "bf16"
    assert hardware.choose_mixed_precision("auto", cpu, {"ACCELERATE_MIXED_PRECISION": "no"})[0] == "bf16"
    assert hardware.choose_mixed_precision("auto", cpu, {"ACCELERATE_MIXED_PRECISION": "fp16"})[0] == "fp16"
    assert hardware.choose_mixed_precision("no", cpu, {"ACCELERATE_MIXED_PRECISION": "bf16"})[0] == "no"
    monkeypatch.setattr(hardware, "cpu_runs_bf16_fast", lambda: False)
    assert hardware.choose_mixed_precision("auto", cpu, {})[0] == "no"
    assert hardware.choose_mixed_precision("bf16", cpu, {})[0] == "bf16"


def spawn_child(parent_env: dict, parent_args: list[str], child_env: dict) -> tuple[int, str] | None:
    """`requested_threads` as seen by a child whose parent (a stand-in for a launcher) ran with
    `parent_env` and `parent_args`."""
    code = (
        "import json, os, subprocess, sys;"
        "child = {**os.environ, **json.loads(sys.argv[1])};"
        "print(subprocess.run([sys.executable, '-c', 'from modeling_corinfomax import hardware;"
        "print(hardware.requested_threads())'], env=child, capture_output=True, text=True).stdout.strip())"
    )
    import json

    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(child_env), *parent_args],
        env=parent_env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout.strip()
    return eval(out)  # noqa: S307  (a tuple or None printed by our own child)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the parent through /proc")
def test_a_launchers_default_of_one_thread_is_not_a_request_but_the_users_settings_are():
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    launched = {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    assert spawn_child(base, [], launched) is None  # the launcher's own 1
    assert spawn_child(base, ["--num_cpu_threads_per_process", "1"], launched)[0] == 1
    assert spawn_child({**base, "OMP_NUM_THREADS": "1"}, [], launched) == (
        1,
        "OMP_NUM_THREADS set before the launcher",
    )
    assert spawn_child(base, [], {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")  # no launcher


def test_default_thread_count_shares_the_cores_between_local_processes(monkeypatch):
    monkeypatch.setattr(hardware, "requested_threads", lambda: None)
    assert hardware.choose_cpu_threads(None, 1, cores=16)[0] == 16
    assert hardware.choose_cpu_threads(None, 4, cores=16)[0] == 4
    assert hardware.choose_cpu_threads(None, 32, cores=16)[0] == 1
    assert hardware.choose_cpu_threads(2, 1, cores=16) == (2, "--num_threads")


STEPS_OF_ALLOCATIONS = """
import resource, sys, torch
from modeling_corinfomax.hardware import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory() is None
torch.set_num_threads(1)
faults = []
for _ in range(9):  # a training step's activations: several large tensors, written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(mib * 2**18) for mib in (40, 8, 40, 16, 64)]
    del kept
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_host_memory_is_reused_by_the_next_step_instead_of_faulted_in_again():
    # The kernel's page-fault count is the independent witness: with glibc's default every block over 32 MiB is
    # unmapped on free and faulted in (zeroed) again by the next step; kept, the steady state faults nothing.
    def faults(mode: str) -> list[int]:
        run = subprocess.run(
            [sys.executable, "-c", STEPS_OF_ALLOCATIONS, mode], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return [int(x) for x in run.stdout.split()]

    default, kept = faults("default"), faults("keep")
    pages = 168 * 2**20 // 4096  # one step's 168 MiB in 4 KiB pages
    # Medians after the first steps: while the kept heap settles, a step may still grow it once.
    assert statistics.median(default[2:]) > pages // 4  # the 40 and 64 MiB tensors at least
    assert statistics.median(kept[2:]) < pages // 100
