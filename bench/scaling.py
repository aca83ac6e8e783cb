#!/usr/bin/env python
"""How the time of a training step grows with the projection size, the batch and the process count.

    python bench/scaling.py                         # all three sweeps at the demo's settings
    python bench/scaling.py --sweeps dims --dims 64 512 2048
    python bench/scaling.py --sweeps processes --process_steps 40

Every sweep starts from `train.py`'s default settings (`train.DEFAULTS`: ResNet-18 at 28 px, projector
1024-1024-64, batch 256, bf16) and changes one thing:

- dims: the projection size D (projector 1024-1024-D). The CorInfoMax loss works on two D x D
  covariances (Cholesky log-dets in float64), so its share of the step grows with D;
- batch: the global batch, in images/s (the step is `TrainStep`, train.py's step on ready crops);
- processes: `accelerate launch --num_processes P` of train.py itself on the bundled data, CPU threads
  split evenly, images/s read from the run's `training_log.json` after the first logging window.

Results go to a table per sweep and to `bench/results/scaling.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    TrainStep,
    alternate,
    machine_info,
    median,
    pick_device,
    print_table,
    wait_for_quiet,
    write_json,
)


def demo_args(extra: list[str] | None = None):
    from modeling_corinfomax.cli import train  # noqa: PLC0415

    return train.parse_args(["--output_dir", tempfile.gettempdir(), *(extra or [])])


def crops(batch: int, size: int, device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
        for _ in "12"
    ]


def time_steps(variants: dict, args, device) -> dict[str, float]:
    """name -> (TrainStep, crops): median seconds per step, variants interleaved."""
    runs = {}
    for name, (step, views) in variants.items():
        for _ in range(args.warmup):
            step(*views)
        runs[name] = lambda s=step, v=views: s(*v)
    times = alternate(runs, args.repeats, args.steps, device)
    return {name: median(t) for name, t in times.items()}


def sweep_dims(args, device, accelerator) -> list[dict]:
    variants = {}
    for dim in args.dims:
        targs = demo_args(["--projector_dims", "1024", "1024", str(dim)])
        variants[str(dim)] = (
            TrainStep.from_args(targs, device, accelerator),
            crops(targs.total_batch_size, targs.image_size, device),
        )
    seconds = time_steps(variants, args, device)
    base = seconds[str(args.dims[0])]
    return [
        {"D": int(d), "s/step": s, "img/s": 256 / s, f"vs D={args.dims[0]}": s / base}
        for d, s in seconds.items()
    ]


def sweep_batch(args, device, accelerator) -> list[dict]:
    targs = demo_args()
    step = TrainStep.from_args(targs, device, accelerator)  # one model: BatchNorm and the loss take any batch
    variants = {str(b): (step, crops(b, targs.image_size, device)) for b in args.batches}
    seconds = time_steps(variants, args, device)
    base = int(args.batches[0]) / seconds[str(args.batches[0])]
    return [
        {
            "batch": int(b),
            "s/step": s,
            "img/s": int(b) / s,
            f"img/s vs batch {args.batches[0]}": int(b) / s / base,
        }
        for b, s in seconds.items()
    ]


def sweep_processes(args) -> list[dict]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = []
    for processes in args.processes:
        threads = max(1, cores // processes)
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", str(processes),
                "--num_machines", "1", "--num_cpu_threads_per_process", str(threads), "--dynamo_backend", "no",
                "--mixed_precision", "bf16", str(ROOT / "train.py"), "--max_train_steps", str(args.process_steps),
                "--logging_steps", str(args.process_steps // 2), "--no-do_eval", "--output_dir", out,
            ]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                raise SystemExit(f"{processes}-process run failed:\n{result.stderr[-3000:]}")
            log = json.loads((Path(out) / "training_log.json").read_text())
        speed = log[-1]["images_per_second"]  # the second window: start-up excluded
        rows.append({"processes": processes, "threads each": threads, "img/s": speed})
    for row in rows:
        row["vs 1 process"] = row["img/s"] / rows[0]["img/s"]
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sweeps", nargs="+", choices=["dims", "batch", "processes"], default=["dims", "batch", "processes"]
    )
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--process_steps", type=int, default=40, help="train.py steps per process-count run")
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--max_load", type=float, help="wait until the 1-min load average is below this")
    p.add_argument("--output", help="JSON path (default bench/results/scaling.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator  # noqa: PLC0415

    device = pick_device(args.device)
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    load = wait_for_quiet(args.max_load)
    info = machine_info(device)
    info["load_average_1m_when_started_timing"] = round(load, 2)
    print(json.dumps(info, indent=2))
    payload: dict = {"machine": info, "args": vars(args)}
    if "dims" in args.sweeps:
        payload["dims"] = sweep_dims(args, device, accelerator)
        print_table(payload["dims"], list(payload["dims"][0]), "step time vs projection size D (batch 256)")
    if "batch" in args.sweeps:
        payload["batch"] = sweep_batch(args, device, accelerator)
        print_table(
            payload["batch"], list(payload["batch"][0]), "throughput vs batch (projector 1024-1024-64)"
        )
    if "processes" in args.sweeps:
        if device.type == "cuda":
            print("\nprocesses sweep: CPU only (use accelerate launch --multi_gpu on GPUs)")
        else:
            payload["processes"] = sweep_processes(args)
            print_table(
                payload["processes"], list(payload["processes"][0]), "train.py throughput vs processes"
            )
    payload["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    write_json("scaling", payload, args.output)


if __name__ == "__main__":
    main()
