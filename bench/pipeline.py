#!/usr/bin/env python
"""What the data pipeline costs: `train.py`-style end-to-end images/s against the pure compute step.

    python bench/pipeline.py                          # bundled Fashion-MNIST, the demo's settings
    python bench/pipeline.py --image_cache off --workers 0 1 2   # per-image crops, worker counts
    python bench/pipeline.py --synthetic 4096         # random 32x32 PNGs in an image folder instead
    python bench/pipeline.py --mixed_precision bf16   # a faster step makes the pipeline's share larger

The settings are `train.DEFAULTS` (the no-argument demo), and the loader is the one `train.py`
builds (`train.build_dataloaders`, prepared by Accelerate), in the two modes of `--image_cache`:
`on`, the split decoded once and both views' crops made a batch at a time in the main process
(`InMemoryTwoViewDataset`, what the demo uses), and `off`, decode + two random-resized crops per image
in DataLoader workers (`ImageViewDataset`, `ExampleCollator`). Per repeat, alternately:

- end to end: a fresh epoch iterator (`train.py` restarts its workers every epoch), the time to the
  first batch (worker start-up), then `--steps` training steps fed by the loader;
- compute + batch augmentation: the same steps on pre-made uint8 crops (`BatchViewAugment` on the
  device, then the step);
- compute: the same steps on pre-made, already augmented float views.

pipeline share = 1 - compute time / end-to-end time, in the steady state and per epoch (with the
worker start-up spread over one epoch of the given dataset). Also reported: the single-core cost of
producing one batch (decode, crops, collation) and of the two `BatchViewAugment` calls.
Results go to `bench/results/pipeline.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only local data is read
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import (  # noqa: E402
    TrainStep,
    machine_info,
    median,
    print_table,
    synchronize,
    timed,
    wait_for_quiet,
    write_json,
)


def write_synthetic_imagefolder(root: Path, n: int, size: int) -> Path:
    """`n` random RGB PNGs of `size` px in 10 class folders (an `imagefolder` for `--train_dir`)."""
    from PIL import Image  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:06d}.png")
    return root


def train_args(args, workers: int, image_cache: str, data_dir: Path | None, output_dir: str):
    """`train.py`'s own resolved arguments for the demo, with the few overrides of this benchmark."""
    from modeling_corinfomax.cli import train  # noqa: PLC0415

    argv = ["--dataloader_num_workers", str(workers), "--output_dir", output_dir, "--no-do_eval"]
    argv += ["--image_cache", image_cache]
    if data_dir is not None:
        argv += ["--train_dir", str(data_dir), "--validation_split", "train"]
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    if args.mixed_precision:
        argv += ["--mixed_precision", args.mixed_precision]
    if args.batch_size:
        argv += ["--total_batch_size", str(args.batch_size)]
    targs = train.parse_args(argv)
    targs.per_device_train_batch_size = targs.total_batch_size  # one process, as train.main resolves it
    return targs


def bench_workers(
    args, workers: int, image_cache: str, data_dir: Path | None, accelerator, scratch: str
) -> dict:
    from modeling_corinfomax.cli import train  # noqa: PLC0415
    from modeling_corinfomax.data import InMemoryTwoViewDataset  # noqa: PLC0415

    targs = train_args(args, workers, image_cache, data_dir, scratch)
    started = time.perf_counter()
    rows, sampler, loader, _, _ = train.build_dataloaders(targs, accelerator)
    build_s = time.perf_counter() - started  # loading the dataset, and decoding it for the image cache
    collate = loader.collate_fn  # train.py's: per-image rows' collator, or the decoded split's batched crops
    loader = accelerator.prepare(loader)
    step = TrainStep.from_args(targs, accelerator.device, accelerator)
    device, batch_size = accelerator.device, targs.per_device_train_batch_size
    steps = min(args.steps, len(loader) - 1)

    # Pre-made inputs from the same loader, and the one-core costs of the two pipeline stages.
    single = torch.utils.data.DataLoader(
        rows, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0
    )
    it = iter(single)
    started = time.perf_counter()
    made = [next(it) for _ in range(2)]
    produce_s = (time.perf_counter() - started) / len(made)
    crops = [(b["view1"].to(device), b["view2"].to(device)) for b in made]
    views = [step.views(*c) for c in crops]
    augment_s = timed(lambda: step.views(*crops[0]), 3, device)
    for _ in range(args.warmup):
        step.update(*views[0])

    def compute():
        for i in range(steps):
            step.update(*views[i % len(views)])

    def compute_and_augment():
        for i in range(steps):
            step(*crops[i % len(crops)])

    first_batch_s: list[float] = []

    def end_to_end():
        started = time.perf_counter()
        iterator = iter(loader)
        batch = next(iterator)
        first_batch_s.append(time.perf_counter() - started)
        for _ in range(steps):  # train.py's step per loaded batch; the first batch was waited for above
            step(batch["view1"], batch["view2"])
            batch = next(iterator)
        del iterator  # shuts the workers down, as the end of an epoch does

    times: dict[str, list[float]] = {"end_to_end": [], "compute_and_augment": [], "compute": []}
    runs = {"end_to_end": end_to_end, "compute_and_augment": compute_and_augment, "compute": compute}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        names = list(runs)[r % 3 :] + list(runs)[: r % 3]
        for name in names:
            synchronize(device)
            started = time.perf_counter()
            runs[name]()
            synchronize(device)
            elapsed = time.perf_counter() - started
            if name == "end_to_end":
                elapsed -= first_batch_s[-1]
            times[name].append(elapsed / steps)
    load_after = os.getloadavg()[0]
    t = {k: median(v) for k, v in times.items()}
    startup = median(first_batch_s)
    epoch_steps = len(loader)
    per_epoch_e2e = (startup + epoch_steps * t["end_to_end"]) / epoch_steps
    return {
        "workers": workers,
        "image_cache": image_cache,
        "cached": isinstance(rows, InMemoryTwoViewDataset),
        "build_loader_s": build_s,
        "dataset_rows": len(rows),
        "batch_size": batch_size,
        "steps_per_repeat": steps,
        "steps_per_epoch": epoch_steps,
        "mixed_precision": accelerator.mixed_precision,
        "backbone": targs.backbone,
        "image_size": targs.image_size,
        "projector_dims": targs.projector_dims,
        "times_s_per_step": times,
        "first_batch_s": first_batch_s,
        "one_core_produce_batch_s": produce_s,
        "augment_two_views_s": augment_s,
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "row": {
            "image cache": image_cache,
            "workers": 0 if isinstance(rows, InMemoryTwoViewDataset) else workers,  # of the training loader
            "e2e img/s": batch_size / t["end_to_end"],
            "compute+aug img/s": batch_size / t["compute_and_augment"],
            "compute img/s": batch_size / t["compute"],
            "pipeline share": 1 - t["compute"] / t["end_to_end"],
            "of which loader": 1 - t["compute_and_augment"] / t["end_to_end"],
            "worker start s": startup,
            "share per epoch": 1 - t["compute"] / per_epoch_e2e,
            "batch on 1 core s": produce_s,
            "augment s": augment_s,
            "load data s": build_s,
            "load": f"{load_before:.2f}/{load_after:.2f}",
        },
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--image_cache",
        nargs="+",
        choices=["on", "off"],
        default=["on", "off"],
        help="train.py's --image_cache modes to compare (on: batched crops of the decoded split)",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        help="DataLoader worker counts with --image_cache off (default: train.py's choice for this machine)",
    )
    p.add_argument("--synthetic", type=int, metavar="N", help="use N random PNGs instead of the bundled data")
    p.add_argument("--synthetic_size", type=int, default=32, help="side of the synthetic images")
    p.add_argument("--max_train_samples", type=int, help="train.py's flag: rows of the dataset used")
    p.add_argument("--batch_size", type=int, help="train.py's --total_batch_size (default: the demo's)")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], help="default: the demo's")
    p.add_argument("--steps", type=int, default=12, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max_load", type=float, help="wait until the 1-min load average is below this")
    p.add_argument("--output", help="JSON path (default bench/results/pipeline.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from accelerate import Accelerator  # noqa: PLC0415

    from modeling_corinfomax.cli import train  # noqa: PLC0415

    # The demo's precision as train.py resolves it (bf16 for the bundled data, the launcher's otherwise).
    resolved = train.parse_args(
        ["--output_dir", tempfile.gettempdir()] + (["--train_dir", "."] if args.synthetic else [])
    )
    mixed_precision = args.mixed_precision or resolved.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if args.workers is None:  # train.py's rule for one process
        args.workers = [max(1, min(8, (os.cpu_count() or 2) // accelerator.num_processes - 1))]
    load = wait_for_quiet(args.max_load)
    info = machine_info(accelerator.device)
    info["load_average_1m_when_started_timing"] = round(load, 2)
    print(json.dumps(info, indent=2))
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = None
        if args.synthetic:
            data_dir = write_synthetic_imagefolder(
                Path(scratch) / "images", args.synthetic, args.synthetic_size
            )
        # With the cache the training loader has no workers (the decoding uses train.py's default).
        configs = [("on", args.workers[0])] if "on" in args.image_cache else []
        configs += [("off", w) for w in args.workers] if "off" in args.image_cache else []
        results = [bench_workers(args, w, cache, data_dir, accelerator, scratch) for cache, w in configs]
    first = results[0]
    print_table(
        [r["row"] for r in results],
        list(first["row"]),
        title=(
            f"{'synthetic ' + str(args.synthetic) + ' PNGs' if args.synthetic else 'bundled Fashion-MNIST'} "
            f"({first['dataset_rows']} rows), {first['backbone']} at {first['image_size']} px, projector "
            f"{first['projector_dims']}, batch {first['batch_size']}, mixed precision {first['mixed_precision']}, "
            f"{first['steps_per_repeat']} steps x {args.repeats} repeats"
        ),
    )
    if not math.isfinite(first["row"]["pipeline share"]):
        raise SystemExit("error: no valid timing")
    write_json("pipeline", {"machine": info, "args": vars(args), "results": results}, args.output)


if __name__ == "__main__":
    main()
