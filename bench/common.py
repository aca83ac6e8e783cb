"""Shared pieces of the benchmark scripts: machine description, load gate, timing, tables, JSON.

Also `TrainStep`, our training step exactly as `train.py` runs it, so that `train_step.py` and
`pipeline.py` time the same code.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere finds the package and train.py
    sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxForPreTraining  # noqa: E402
from modeling_corinfomax.data import TwoViewAugmentation  # noqa: E402
from modeling_corinfomax.training import (  # noqa: E402
    TwoViews,
    checked_forward,
    make_optimizer,
    peak_learning_rate,
    undo_forward,
)
from modeling_corinfomax.wrappers import unwrap  # noqa: E402


def user_launch(train_flags: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`accelerate launch train.py <train_flags>` as a user types it: no launcher flag and a shell without
    a thread setting (OMP_NUM_THREADS / MKL_NUM_THREADS), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", str(ROOT / "train.py"), *train_flags]
    return subprocess.run(command, env=env, check=True, **kwargs)


def pick_device(name: str | None = None) -> torch.device:
    """`--device` if given, else CUDA when present, else CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    """Everything a results table needs to be comparable: date, CPU, cores, versions, load, device."""
    import timm  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def wait_for_quiet(max_load: float | None, max_wait_s: float = 1800.0, poll_s: float = 60.0) -> float:
    """Block until the 1-minute load average is below `max_load` (or `max_wait_s` has passed).

    Returns the load average seen last. Timings on a shared 2-core machine are meaningless while
    other jobs run, so the scripts accept `--max_load` and record the load next to each table.
    """
    load = os.getloadavg()[0]
    if max_load is None:
        return load
    waited = 0.0
    while load >= max_load and waited < max_wait_s:
        print(f"load average {load:.2f} >= {max_load}: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)
        waited += poll_s
        load = os.getloadavg()[0]
    if load >= max_load:
        print(f"warning: load average still {load:.2f} after {waited:.0f} s; measuring anyway", flush=True)
    return load


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `steps` calls (the device is synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of one call of `fn` over `repeats` timed calls, after one untimed warm-up call (the device
    is synchronised after each call)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def alternate(runs: dict, repeats: int, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Time every entry of `runs` (name -> zero-argument step) `repeats` times, interleaved.

    The order rotates each repeat, so a slow spell of a noisy machine hits every entry alike.
    Returns name -> list of seconds per step.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(runs[name], steps, device))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    `VmHWM` rather than `getrusage`'s `ru_maxrss`: a child started from a big process inherits the
    parent's peak in `ru_maxrss` (across fork and exec); `VmHWM` starts afresh at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    """A GitHub-markdown table, so the output pastes into RESULTS.md as is."""
    if title:
        print(f"\n{title}")

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def write_json(name: str, payload: dict, path: str | None = None) -> Path:
    """Write `payload` to `path`, or to `bench/results/<name>.json`."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {out}")
    return out


class TrainStep:
    """Our pretraining step as `train.py`'s `train_one_epoch` runs it, from the same pieces
    (`modeling_corinfomax.training.TwoViews`, `checked_forward`, `undo_forward`, then backward, optimizer
    step and `zero_grad`) on `CorInfoMaxForPreTraining` in channels_last, prepared by an `Accelerator`
    (which wraps the forward in bf16 autocast under `mixed_precision="bf16"`), with timm's optimizer.

    Only one `Accelerator` mixed-precision setting can exist per process, so `accelerator=None` builds
    the fp32 variant without one: that is what `prepare` does under `mixed_precision="no"` on one
    process (move to the device, nothing else).
    """

    def __init__(
        self,
        config: CorInfoMaxConfig,
        augmentation: TwoViewAugmentation,
        device: torch.device,
        accelerator: Accelerator | None = None,
        lr: float = 0.5,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        exclude_bias_and_norm_from_wd: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        seed: int = 0,
        state_dict: dict | None = None,
    ):
        torch.manual_seed(seed)
        model = CorInfoMaxForPreTraining(config)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(
            model, optimizer, lr, momentum, weight_decay, exclude_bias_and_norm_from_wd
        )
        if accelerator is not None:
            model, self.optimizer = accelerator.prepare(model, self.optimizer)
        else:
            model = model.to(device)
        self.model = torch.compile(model) if compile else model
        self.model.train()
        self.two_views = TwoViews(
            augmentation, config.image_mean, config.image_std, device, seed=seed, channels_last=channels_last
        )
        self.accelerator, self.statistics = accelerator, unwrap(self.model).batchnorm_statistics()
        self.device, self.step_count = device, 0

    @classmethod
    def from_args(cls, targs, device: torch.device, accelerator: Accelerator | None = None) -> TrainStep:
        """The step for `train.parse_args(...)`'s resolved arguments, at train.py's peak learning rate."""
        return cls(
            targs.model_config,
            targs.two_view_augmentation,
            device,
            accelerator=accelerator,
            lr=peak_learning_rate(targs.learning_rate, targs.total_batch_size, targs.lr_reference_batch_size),
            optimizer=targs.optimizer,
            momentum=targs.momentum,
            weight_decay=targs.weight_decay,
            exclude_bias_and_norm_from_wd=targs.exclude_bias_and_norm_from_wd,
            channels_last=targs.channels_last,
            compile=targs.torch_compile,
            seed=targs.seed,
        )

    def views(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) crops -> the two normalised float views on the device."""
        return self.two_views.make(view1, view2, self.step_count)

    def update(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """Forward, fault check, backward, optimizer step on ready views. Returns the detached loss."""
        saved = [buffer.clone() for buffer in self.statistics]
        with self.accelerator.accumulate(self.model) if self.accelerator else contextlib.nullcontext():
            out, fault = checked_forward(self.model, v1, v2)
            if fault is None:
                self.accelerator.backward(out.loss) if self.accelerator else out.loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if fault is not None:
            undo_forward(self.optimizer, self.statistics, saved)
            raise FloatingPointError(f"step {self.step_count + 1}: {fault}")
        self.step_count += 1
        return out.loss.detach()

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """One training step from uint8 crops (augmentation on the device included)."""
        return self.update(*self.views(view1, view2))
