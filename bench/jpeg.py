#!/usr/bin/env python
"""The per-image JPEG path at 224 px: what decoding and cropping ImageNet-like photos costs per core, and
what share of a training step it takes.

    python bench/jpeg.py                                    # 512 JPEGs, 224 px, 1 and 2 workers
    python bench/jpeg.py --device cuda --workers 1 2 4 8 12 # + decoding on the GPU against host workers

The photos: crops of the twelve real photographs in Debian's `mate-backgrounds` (nature), resized so that
the short side is 375-500 px (aspect 3:4-4:3, as most of ImageNet), saved as JPEG quality 90, in an image
folder (`<root>/train/<photo>/*.jpg`) and as a `datasets` parquet corpus (the same bytes).

Reported, per core (one process, one thread, files in the page cache):
- decode only: `decode_image_tensor` (PIL, full size);
- full decode + two crops: the path before reduced-scale decoding (`decode_image_tensor`, then both views'
  random resized crop + flip at `--size`);
- ours: `ImageViewDataset`'s row as train.py's workers make it (boxes from the header, then
  `decode_crops`: a JPEG decoded at 1/2-1/8 scale where both boxes allow it, else torchvision's
  `decode_jpeg`);
- torchvision's `decode_jpeg` + the same two crops;
then the whole worker path (DataLoader + `ExampleCollator`, batch 64) with 1, 2, ... workers over the folder
and the corpus; the step's time at `--size` (train.py's default backbone and precision) and the pipeline's
share of a step when both share the cores: p / (p + c), p and c the core-seconds per image of the pipeline
(1 / ours) and of the step (step seconds x threads / batch). With `--device cuda`: the same batches decoded
and cropped on the GPU (`--decode_on_device`), images/s, against the host workers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import TrainStep, machine_info, median_seconds, pick_device, synchronize, write_json  # noqa: E402
from PIL import Image  # noqa: E402

PHOTOS = Path("/usr/share/backgrounds/mate/nature")
GOAL_PER_CORE, GOAL_SHARE = 200.0, 0.10


def build_jpegs(root: Path, count: int, short_side: tuple[int, int], photos: Path, seed: int = 0) -> Path:
    """`count` ImageNet-like JPEGs in `<root>/train/<photo>/` and the same bytes in `<root>/corpus/`."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    sources = sorted(photos.glob("*.jpg"))
    if not sources:
        raise SystemExit(
            f"error: no photos in {photos}: `apt-get install mate-backgrounds`, or --photos DIR."
        )
    rng = np.random.default_rng(seed)
    rows = []
    for label, path in enumerate(sources):
        with Image.open(path) as photo:
            picture = photo.convert("RGB")
        for i in range(label, count, len(sources)):
            side = int(rng.integers(picture.height // 3, int(picture.height * 0.9)))
            aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            w, h = (round(side * aspect), side) if aspect >= 1 else (side, round(side / aspect))
            w, h = min(w, picture.width), min(h, picture.height)
            top, left = (
                int(rng.integers(0, picture.height - h + 1)),
                int(rng.integers(0, picture.width - w + 1)),
            )
            short = int(rng.integers(short_side[0], short_side[1] + 1))
            size = (round(w * short / h), short) if w >= h else (short, round(h * short / w))
            crop = picture.crop((left, top, left + w, top + h)).resize(size, Image.BICUBIC)
            target = root / "train" / path.stem / f"{i:05d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=90)
            target.write_bytes(buffer.getvalue())
            rows.append({"image": {"bytes": buffer.getvalue(), "path": target.name}, "label": label})
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "corpus" / "train-00000-of-00001.parquet")
    return root


def per_core(fn, items: list, min_seconds: float) -> float:
    """Images/s of `fn(item)` on one thread, over the items (repeated until `min_seconds` have passed)."""
    fn(items[0])  # warm-up
    done, started = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def view_differences(paths: list[Path], augmentation, size: int, count: int) -> dict:
    """Pixel differences (0-255) between train.py's crops (`decode_crops`) and the crops of the full decode
    with the same boxes, over the images whose decode was reduced (the others are equal)."""
    from modeling_corinfomax.data import (  # noqa: PLC0415
        apply_crop,
        decode_crops,
        decode_image_tensor,
        open_image,
        reduction_for,
    )

    diffs, reduced = [], 0
    for index, path in enumerate(paths[:count]):
        image = open_image(str(path))
        boxes = augmentation.draw_crops(image.height, image.width, index)
        if reduction_for(boxes, size) == 1:
            continue
        reduced += 1
        full = decode_image_tensor(str(path))
        for box, view in zip(boxes, decode_crops(str(path), image, boxes, size), strict=True):
            diffs.append((view.float() - apply_crop(full, box, size).float()).abs().flatten())
    result = {"images_compared": min(count, len(paths)), "images_reduced": reduced}
    if diffs:
        d = torch.cat(diffs)
        result.update(mean_abs=float(d.mean()), p99_abs=float(d.kthvalue(int(0.99 * d.numel())).values),
                      max_abs=float(d.max()))  # fmt: skip
    return result


def loader_rate(rows, workers: int, batch: int, collate, batches: int = 0, consume=None) -> float:
    """Images/s of a DataLoader over `rows` with `workers` workers (`batches` batches drawn with
    replacement, default one pass), after the first `workers` batches (the workers' start-up)."""
    batches = batches or len(rows) // batch
    sampler = torch.utils.data.RandomSampler(rows, replacement=True, num_samples=batch * batches)
    loader = torch.utils.data.DataLoader(
        rows, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate, drop_last=True,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )  # fmt: skip
    images, started = 0, None
    for i, b in enumerate(loader):
        if consume is not None:
            consume(b)
        if i == min(workers, batches - 2):
            started = time.perf_counter()
        elif started is not None:
            images += batch
    return images / (time.perf_counter() - started)


def device_decoding(folder, size: int, workers: int, collate, device: torch.device, batch: int = 256) -> dict:
    """`--decode_on_device`: the workers' part alone (bytes + boxes), the whole path (workers, then the
    device decodes and crops each batch), and the device's two parts alone on one batch."""
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

    from modeling_corinfomax.data import ImageViewDataset, decode_views  # noqa: PLC0415
    from modeling_corinfomax.data.device_decode import crop_decoded  # noqa: PLC0415

    rows = ImageViewDataset(folder, "image", None, size, mode="jpeg_bytes")
    batch = min(batch, len(rows))

    def decode_and_crop(b: dict) -> None:
        decode_views(b, size, device)
        synchronize(device)

    rates = {
        "workers alone (bytes + boxes)": loader_rate(rows, workers, batch, collate, batches=4 * workers + 8),
        "whole path: workers, then device decode + crops": loader_rate(
            rows, workers, batch, collate, batches=4 * workers + 8, consume=decode_and_crop
        ),
    }
    one = collate([rows[i] for i in range(batch)])
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in one["jpeg"]]

    def seconds(fn) -> float:
        return median_seconds(fn, 5, device)

    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    rates["decode_jpeg alone (one batch)"] = batch / seconds(
        lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    )
    rates["batched crops alone (one batch)"] = batch / seconds(
        lambda: crop_decoded(images, one["jpeg_boxes"], size)
    )
    return rates


def step_seconds(
    root: Path, size: int, batch: int, device: torch.device, scratch: str
) -> tuple[float, object]:
    """train.py's step (its defaults for this folder at `size` px) on `batch` images: seconds per step."""
    from accelerate import Accelerator  # noqa: PLC0415

    from modeling_corinfomax.cli import train  # noqa: PLC0415
    from modeling_corinfomax.hardware import choose_mixed_precision  # noqa: PLC0415

    targs = train.parse_args(["--train_dir", str(root), "--image_size", str(size), "--output_dir", scratch])
    targs.per_device_train_batch_size = targs.total_batch_size = batch
    targs.mixed_precision, _ = choose_mixed_precision(targs.mixed_precision, device)  # train.py's choice
    accelerator = Accelerator(mixed_precision=targs.mixed_precision, cpu=device.type == "cpu")
    step = TrainStep.from_args(targs, accelerator.device, accelerator)
    crops = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, device=accelerator.device)
    return median_seconds(lambda: step(crops[0], crops[1]), 3, accelerator.device), targs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=512, help="JPEGs to build")
    p.add_argument("--short_side", type=int, nargs=2, default=[375, 500])
    p.add_argument("--size", type=int, default=224, help="training resolution of the crops")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64, help="DataLoader batch")
    p.add_argument("--step_batch", type=int, default=16, help="batch of the timed training step")
    p.add_argument("--seconds", type=float, default=8.0, help="per-core timing length of each path")
    p.add_argument("--device", default=None, help="cpu (default) or cuda: the step, and device decoding")
    p.add_argument("--root", help="where the JPEGs are built (default: a temporary folder)")
    p.add_argument("--photos", type=Path, default=PHOTOS, help="folder of the source photographs (*.jpg)")
    p.add_argument("--output", help="JSON path (default bench/results/jpeg.json)")
    p.add_argument("--device_decode", action="store_true", help="time --decode_on_device on a CPU too")
    args = p.parse_args()

    from torchvision.io import decode_jpeg, read_file  # noqa: PLC0415

    from modeling_corinfomax.data import (  # noqa: PLC0415
        ExampleCollator,
        ImageViewDataset,
        decode_image_tensor,
        load_image_dataset,
    )

    device = pick_device(args.device)
    info = machine_info(device)
    info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    print(json.dumps(info, indent=2))
    scratch = tempfile.mkdtemp()
    root = Path(args.root or scratch) / "jpegs"
    if not (root / "train").is_dir():
        build_jpegs(root, args.count, tuple(args.short_side), args.photos)
    paths = sorted((root / "train").rglob("*.jpg"))
    sizes = [Image.open(q).size for q in paths]
    mean_kb = sum(q.stat().st_size for q in paths) / len(paths) / 1024
    print(f"{len(paths)} JPEGs, {min(min(s) for s in sizes)}-{max(min(s) for s in sizes)} px short side, "
          f"mean {mean_kb:.0f} KiB; crops at {args.size} px")  # fmt: skip

    folder = load_image_dataset(None, None, str(root), "train", False, None)
    corpus = load_image_dataset(str(root / "corpus"), None, None, "train", False, None)
    rows = ImageViewDataset(folder, "image", None, args.size)
    corpus_rows = ImageViewDataset(corpus, "image", None, args.size)
    augmentation = rows.augmentation
    cells = [{"path": str(q), "bytes": None} for q in paths]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {
        "decode only (PIL)": per_core(decode_image_tensor, cells, args.seconds),
        "full decode + two crops (before)": per_core(
            lambda c: augmentation.crop_views(decode_image_tensor(c), args.size, 1), cells, args.seconds
        ),
        "ours: train.py's row (reduced-scale decode)": per_core(
            lambda i: rows[i], list(range(len(rows))), args.seconds
        ),
        "ours, from the parquet corpus": per_core(
            lambda i: corpus_rows[i], list(range(len(rows))), args.seconds
        ),
        "torchvision decode_jpeg + two crops": per_core(
            lambda c: augmentation.crop_views(decode_jpeg(read_file(c["path"])), args.size, 1),
            cells,
            args.seconds,
        ),
    }
    differences = view_differences(paths, augmentation, args.size, 128)
    torch.set_num_threads(threads)
    print("\n| per core (1 thread) | images/s | ms per image |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {1000 / rate:.2f} |")
    print(f"reduced-scale decode: {differences}")

    collate = ExampleCollator()
    workers = {}
    for w in args.workers:
        batches = max(len(rows) // args.batch, 4 * w + 8)
        workers[f"folder, {w} worker(s)"] = loader_rate(rows, w, args.batch, collate, batches)
        workers[f"corpus, {w} worker(s)"] = loader_rate(corpus_rows, w, args.batch, collate, batches)
    print(f"\n| whole worker path (DataLoader, batch {args.batch}) | images/s |\n|---|---|")
    for name, rate in workers.items():
        print(f"| {name} | {rate:.0f} |")

    step_s, targs = step_seconds(root, args.size, args.step_batch, device, scratch)
    ours = rates["ours: train.py's row (reduced-scale decode)"]
    pipeline_core_s = 1 / ours
    compute_core_s = step_s * (threads if device.type == "cpu" else 1) / args.step_batch
    share = pipeline_core_s / (pipeline_core_s + compute_core_s)
    print(f"\nstep at {args.size} px ({targs.backbone}, {targs.mixed_precision}, batch {args.step_batch}, "
          f"{threads} threads on {device.type}): {step_s:.2f} s = {args.step_batch / step_s:.1f} images/s")  # fmt: skip
    print(f"pipeline {1000 * pipeline_core_s:.2f} core-ms per image, step {1000 * compute_core_s:.1f} "
          f"{'core-' if device.type == 'cpu' else 'GPU-'}ms per image: pipeline share {100 * share:.1f} %")  # fmt: skip
    print(f"arithmetic: {1000 / ours:.1f} cores per 1,000 images/s (two {args.size} px crops each); "
          f"{1000 / rates['decode only (PIL)']:.1f} for decoding alone")  # fmt: skip

    device_rates = {}
    if device.type == "cuda" or args.device_decode:
        device_rates = device_decoding(folder, args.size, args.workers[-1], collate, device)
        print(
            f"\n| --decode_on_device on {device.type}, {args.workers[-1]} workers, batch 256 | images/s |\n|---|---|"
        )
        for name, rate in device_rates.items():
            print(f"| {name} | {rate:.0f} |")

    goals = {
        f"per core >= {GOAL_PER_CORE:.0f} images/s": ours >= GOAL_PER_CORE,
        f"pipeline share <= {100 * GOAL_SHARE:.0f} %": share <= GOAL_SHARE,
    }
    for goal, ok in goals.items():
        print(f"{'PASS' if ok else 'FAIL'}: {goal}")
    write_json(
        "jpeg",
        {
            "machine": info, "args": vars(args), "images": len(paths), "mean_kib": mean_kb,
            "per_core_images_per_s": rates, "reduced_decode_differences": differences,
            "workers_images_per_s": workers, "step_seconds": step_s, "step_batch": args.step_batch,
            "pipeline_share": share, "device_decode_images_per_s": device_rates,
            "goals": goals,
        },
        args.output,
    )  # fmt: skip


if __name__ == "__main__":
    main()
