"""What the machine runs fast: CPU threads per process and the mixed precision to train in.

The first command users type carries no thread or precision flag, so train.py decides both here:

- threads: `accelerate launch` and `torchrun` give each process one thread (OMP_NUM_THREADS=1) unless
  told otherwise, which leaves most of a CPU idle. A thread count the user asked for is honoured (a
  train.py flag, `accelerate launch --num_cpu_threads_per_process N`, or OMP_NUM_THREADS exported
  before the command); the launchers' own default of 1 is not a request and is replaced by the cores
  available to the process divided by the processes on the machine.
- host memory (CPU training): glibc hands every block over 32 MiB to the kernel on `free` and maps it
  afresh on the next `malloc`, so each step's activations (128 MiB tensors at batch 512) are page-faulted
  and zeroed by the kernel again, step after step. `keep_freed_host_memory` tells glibc to keep them.
- precision: bf16 autocast where the hardware runs it fast (CUDA devices with native bf16, CPUs with
  AMX or AVX512-BF16), fp32 elsewhere. A launcher or `accelerate config` setting of fp16/bf16 wins over
  that guess; an explicit train.py `--mixed_precision` wins over both.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

# Set by `accelerate launch` (every launcher mode) and by torchrun in the processes they start.
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits and `taskset` narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parent_launch_settings(pid: int) -> tuple[list[str], dict[str, str]] | None:
    """The command line and initial environment of process `pid` (Linux /proc), or None if unreadable."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in cmdline if a]
    env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
    return args, env


def requested_threads(
    environ: Mapping[str, str] | None = None, parent_pid: int | None = None
) -> tuple[int, str] | None:
    """The thread count the user asked for outside train.py, as `(threads, where it came from)`, or None.

    Without a launcher, OMP_NUM_THREADS in the environment is the user's. Under a launcher it may be the
    launcher's default: it counts as the user's when the launcher was given `--num_cpu_threads_per_process`
    or itself started with OMP_NUM_THREADS set (both read from the parent process). Where the parent
    cannot be read, any value but the launchers' default of 1 counts as the user's.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if not value.isdigit() or int(value) < 1:
        return None
    threads = int(value)
    if not any(marker in environ for marker in LAUNCHER_MARKERS):
        return threads, "OMP_NUM_THREADS"
    parent = _parent_launch_settings(os.getppid() if parent_pid is None else parent_pid)
    if parent is None:
        return (threads, "OMP_NUM_THREADS") if threads != 1 else None
    parent_args, parent_env = parent
    if any(a.startswith("--num_cpu_threads_per_process") for a in parent_args):
        return threads, "the launcher's --num_cpu_threads_per_process"
    if "OMP_NUM_THREADS" in parent_env:
        return threads, "OMP_NUM_THREADS set before the launcher"
    return None


def choose_cpu_threads(flag: int | None, local_processes: int, cores: int | None = None) -> tuple[int, str]:
    """Threads per process on a CPU, and why: `flag` (train.py's `--num_threads`), else a count the user
    asked for elsewhere (`requested_threads`), else the available cores shared by the local processes."""
    if flag is not None:
        return flag, "--num_threads"
    requested = requested_threads()
    if requested is not None:
        return requested
    cores = available_cores() if cores is None else cores
    local_processes = max(1, local_processes)
    return max(1, cores // local_processes), f"{cores} cores / {local_processes} process(es) on this machine"


def onednn_isa_cap_excludes_bf16(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the user capped oneDNN (`ONEDNN_MAX_CPU_ISA`/`DNNL_MAX_CPU_ISA`) below its native bf16 kernels
    (AVX512_CORE_BF16, AMX, AVX10): convolutions then emulate bf16 even on a CPU that has it. (This is also
    how an AVX2-only CPU is reproduced on a newer one: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.)"""
    environ = os.environ if environ is None else environ
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return bool(cap) and cap not in ("ALL", "DEFAULT") and not any(k in cap for k in ("BF16", "AMX", "AVX10"))


def cpu_runs_bf16_fast() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16) that oneDNN may use."""
    if onednn_isa_cap_excludes_bf16():
        return False
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    try:  # older torch without the probes: the kernel's list of CPU flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def device_runs_bf16_fast(device: torch.device) -> bool:
    """Whether bf16 autocast is faster than fp32 on `device` (not merely supported, or emulated)."""
    if device.type == "cuda":
        # Ampere and newer have bf16 tensor cores; `is_bf16_supported` is also True on emulating GPUs.
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_runs_bf16_fast()
    return False


def expected_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """The device the run will train on (CUDA unless there is none or `ACCELERATE_USE_CPU` is set), known
    without initialising Accelerate's process state (which must come from the launcher's settings)."""
    environ = os.environ if environ is None else environ
    use_cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher says the job has (`accelerate launch`, `torchrun`, MPI or a cluster
    launcher's WORLD_SIZE-style variables; 1 without a launcher)."""
    environ = os.environ if environ is None else environ
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if environ.get(name, "").strip().isdigit():
            return int(environ[name])
    return 1


def choose_mixed_precision(
    flag: str, device: torch.device, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The mixed precision for Accelerate (`"no"`, `"fp16"`, `"bf16"`, ...), and why.

    `flag` is train.py's `--mixed_precision`: anything but `"auto"` is used as given. With `"auto"`, a
    launcher's fp16/bf16 (from `accelerate launch --mixed_precision` or `accelerate config`) holds; a
    launcher's `"no"` is its default, not a request, so the hardware decides (`device_runs_bf16_fast`).
    """
    if flag != "auto":
        return flag, f"--mixed_precision {flag}"
    environ = os.environ if environ is None else environ
    launcher = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", ""):
        return launcher, f"accelerate launch/config mixed_precision={launcher}"
    if device_runs_bf16_fast(device):
        what = "this GPU" if device.type == "cuda" else "this CPU (AMX or AVX512-BF16)"
        return "bf16", f"auto: {what} runs bf16 natively"
    return "no", f"auto: {device.type} has no fast bf16, so fp32"


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_host_memory() -> str | None:
    """Make glibc keep the memory this process frees for its next allocations: no block is served by its own
    `mmap` (`M_MMAP_MAX` 0) and the heap is never trimmed (`M_TRIM_THRESHOLD` at its maximum), so a training
    step reuses the previous step's activation memory instead of page-faulting fresh zeroed pages. The price
    is a peak RSS that stays at its high-water mark (about 25% above the default's on ResNet-18 at batch 512).
    Takes effect for allocations made after the call. Returns None when set, else why not (not glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'})"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 is converted to the largest size_t by glibc: never trim.
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
        return "glibc refused mallopt"
    return None


def use_every_core(device: torch.device, num_processes: int) -> str | None:
    """For a command without a thread flag (eval.py, embed) on a CPU: set `choose_cpu_threads`' count (the
    user's OMP_NUM_THREADS or launcher setting, else the cores shared by the processes on this machine, not
    the launcher's default of 1) and return the log line; None on a GPU."""
    if device.type != "cpu":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))  # processes on this machine
    threads, reason = choose_cpu_threads(None, local)
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} per process ({reason})"


def reuse_host_memory(flag: bool, device: torch.device) -> str | None:
    """Apply `--reuse_host_memory` for a run on `device` (`keep_freed_host_memory` on a CPU), and return the
    log line that says what holds, or None where there is nothing to say (a GPU run, or the flag is off)."""
    if device.type != "cpu" or not flag:
        return None
    why_not = keep_freed_host_memory()
    if why_not is not None:
        return f"host memory: the system's allocator ({why_not})"
    return (
        "host memory: each batch reuses the memory the previous one freed (glibc: no mmap, no trim; "
        "--no-reuse_host_memory to return it to the system)"
    )


__all__ = [
    "available_cores",
    "choose_cpu_threads",
    "choose_mixed_precision",
    "cpu_runs_bf16_fast",
    "device_runs_bf16_fast",
    "expected_device",
    "keep_freed_host_memory",
    "onednn_isa_cap_excludes_bf16",
    "requested_threads",
    "use_every_core",
    "reuse_host_memory",
]
