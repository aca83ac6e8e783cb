#!/usr/bin/env python
"""End-to-end throughput of the command users type first, against the original recipe's fp32 step.

    python bench/end_to_end.py                    # preset cifar10 on a 32 px folder, 30 steps, then 5 official steps

Runs, exactly as a user would (no precision or thread flag, a shell without OMP_NUM_THREADS),

    accelerate launch train.py --preset cifar10 --train_dir <32 px folder> --max_train_steps N --no-do_eval

at train.py's default logging cadence (a record every `--logging_steps`, 10 steps; each record's images/s
covers the steps since the previous record: decoding, crops, augmentation, forward, backward and optimizer,
not the record's own monitoring) and reports the median over the records after the first (which holds the
warm-up steps). An earlier version logged every step, which runs the RankMe probe after every step; it
measured about a quarter fewer images/s than the default cadence on the same machine, for a run users do not
make. The reference is the official code's step rebuilt in `bench/train_step.py` (`BaselineStep`:
torchvision ResNet-18 with the CIFAR stem, fp32, NCHW, the official loss) at the same global batch (512) on
this machine with every core. Images count once each, though each is seen as two views, in both numbers.

On a CPU, train.py keeps the memory a step frees for the next one (`--reuse_host_memory`, glibc's mallopt);
the original code runs with the system's allocator, which returns every large activation to the kernel and
faults it in again each step. The official step is therefore timed twice: as it runs, and (after it) with
the same allocator setting as ours, so that the report separates the allocator's share from the rest.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from common import machine_info, median, pick_device, user_launch
from PIL import Image
from train_step import BaselineStep, case_setup

from modeling_corinfomax.hardware import keep_freed_host_memory
from modeling_corinfomax.presets import DEFAULTS

LOG_EVERY = DEFAULTS["logging_steps"]  # train.py's cadence, which the run keeps

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int) -> Path:
    """`count` bundled Fashion-MNIST images as 32x32 RGB PNGs in class sub-folders (a user's folder)."""
    rows = (
        pq.read_table(ROOT / "modeling_corinfomax" / "demo_data" / "fashion_mnist" / "train.parquet")
        .slice(0, count)
        .to_pylist()
    )
    for i, row in enumerate(rows):
        folder = root / "train" / f"class_{row['label']}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((32, 32)).save(
            folder / f"{i}.png"
        )
    return root


def ours(folder: Path, steps: int, out: Path) -> tuple[float, list[float], str]:
    flags = ["--preset", "cifar10", "--train_dir", str(folder), "--max_train_steps", str(steps), "--no-do_eval",
             "--output_dir", str(out)]  # fmt: skip
    result = user_launch(flags, capture_output=True, text=True)
    chosen = [
        line.split(": ", 2)[-1]
        for line in result.stdout.splitlines()
        if "precision:" in line or "CPU threads:" in line
    ]
    rates = [r["images_per_second"] for r in json.loads((out / "training_log.json").read_text())]
    if len(rates) < 2:
        raise SystemExit(
            f"error: {len(rates)} log record(s) in {steps} steps: pass --steps {2 * LOG_EVERY} or more."
        )
    return median(rates[1:]), rates, "; ".join(chosen)


def official(steps: int, threads: int, device: torch.device, amp: bool = False) -> tuple[float, list[float]]:
    """The official step's images/s on views already on `device` (compute only; `loss.item()` in the step
    synchronises a GPU, so wall-clock timing is exact)."""
    torch.set_num_threads(threads)
    preset, config, batch, lr = case_setup("cifar-r18", 512, device)
    step = BaselineStep(preset, device, lr, amp=amp)
    views = [torch.randn(batch, 3, config.image_size, config.image_size, device=device) for _ in "12"]
    for _ in range(1 if device.type == "cpu" else 5):  # warm-up (cuDNN picks its kernels on a GPU)
        step(*views)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(*views)
        times.append(time.perf_counter() - start)
    return batch / median(times), [batch / t for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps",
        type=int,
        default=3 * LOG_EVERY,
        help=f"train.py steps (the first {LOG_EVERY}, warm-up, are not counted)",
    )
    p.add_argument("--official_steps", type=int, default=5)
    p.add_argument(
        "--device",
        help="where the official step runs (default: cuda when available, else cpu); train.py picks its own",
    )
    p.add_argument("--output", default="bench/results/end_to_end.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "my_images", 1536)
        ours_rate, ours_rates, chosen = ours(folder, args.steps, Path(tmp) / "run")
    threads = len(os.sched_getaffinity(0))
    device = pick_device(args.device)
    official_rate, official_rates = official(args.official_steps, threads, device)
    # On a GPU the original code's usual run is its --amp path (fp16 autocast and a GradScaler).
    amp_rate = official(args.official_steps, threads, device, amp=True)[0] if device.type == "cuda" else None
    reused_rate = reused_rates = None
    if device.type == "cpu" and keep_freed_host_memory() is None:  # from here on, for this process
        reused_rate, reused_rates = official(args.official_steps, threads, device)
    report = {
        "machine": machine_info(device),
        "load_average_1m": os.getloadavg()[0],
        "ours_images_per_second": ours_rate,
        "ours_per_record": ours_rates,
        "train_py_chose": chosen,
        "official_fp32_images_per_second": official_rate,
        "official_per_step": official_rates,
        "official_threads": threads,
        "ratio": ours_rate / official_rate,
        "official_fp32_reused_memory_images_per_second": reused_rate,
        "official_reused_memory_per_step": reused_rates,
        "ratio_to_reused_memory": ours_rate / reused_rate if reused_rate else None,
        "official_amp_fp16_images_per_second": amp_rate,
        "ratio_to_amp": ours_rate / amp_rate if amp_rate else None,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"train.py chose: {chosen}")
    print("| path | images/s (batch 512) |\n|---|---|")
    print(f"| accelerate launch train.py --preset cifar10 --train_dir (end to end) | {ours_rate:.1f} |")
    where = f"{threads} threads" if device.type == "cpu" else str(device)
    print(f"| official recipe's step (fp32, NCHW, {where}, compute only) | {official_rate:.1f} |")
    if reused_rate:
        print(f"| official recipe's step, our allocator setting (fp32, NCHW, {where}) | {reused_rate:.1f} |")
    if amp_rate:
        print(f"| official recipe's step (--amp: fp16 autocast, {where}, compute only) | {amp_rate:.1f} |")
    print(
        f"ratio: {report['ratio']:.2f}x"
        + (f" (to --amp: {report['ratio_to_amp']:.2f}x)" if amp_rate else "")
        + (
            f" (to the step with our allocator setting: {report['ratio_to_reused_memory']:.2f}x)"
            if reused_rate
            else ""
        )
    )


if __name__ == "__main__":
    main()
