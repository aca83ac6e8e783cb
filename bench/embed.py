#!/usr/bin/env python
"""How fast does `corinfomax-embed` embed images on this machine? (images/s, as the command logs them)

Runs `embed.py` as a user would, on one process (`python embed.py ...`) and on two
(`accelerate launch --multi_gpu --num_processes 2 embed.py ...`), for

- `photos-224`: ResNet-18 at 224 px on 64 real JPEG photos (crops of Debian's `mate-backgrounds` nature
  photographs, short side 480 px, quality 90): decoding and resizing a photo costs about as much as the
  forward pass;
- `fashion-40`: ResNet-18 and the demo's ResNet-10-T at the demo size (40 px) on the bundled Fashion-MNIST
  test split (28 px PNGs): the forward pass is nearly all of it.

The encoders are untrained (`CorInfoMaxModel` of the config; the weights do not change the speed). The
rate is the command's own: images embedded over the seconds from the first batch to the gathered result
(model loading and imports left out); the whole command's wall time is printed next to it.

    python bench/embed.py                       # every case, workers 0 and 1
    python bench/embed.py --cases photos-224 --max_load 1.5
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, cpu_model, wait_for_quiet
from PIL import Image

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxModel

PHOTO_DIR = Path("/usr/share/backgrounds/mate/nature")
# name -> (backbone, image size, data flags)
CASES = {
    "photos-224": ("resnet18", 224, ["--train_dir", "{photos}"]),
    "fashion-40": ("resnet18", 40, ["--max_samples", "{fashion_samples}"]),
    "fashion-40-demo": ("resnet10t", 40, ["--max_samples", "{fashion_samples}"]),
}
LAUNCHERS = {
    "1 process": [sys.executable],
    "2 processes": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"],
}  # fmt: skip


def build_photos(folder: Path, count: int = 64, short_side: int = 480) -> None:
    """`count` JPEG crops (aspect 4:3 or 3:4) of the nature photographs, resized to `short_side`."""
    sources = sorted(PHOTO_DIR.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"error: no photos in {PHOTO_DIR}: `apt-get install mate-backgrounds`.")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as photo:
            picture = photo.convert("RGB")
        w, h = (4, 3) if i % 2 else (3, 4)
        scale = rng.uniform(0.5, 1.0) * min(picture.width / w, picture.height / h)
        cw, ch = int(w * scale), int(h * scale)
        left, top = (
            int(rng.integers(0, picture.width - cw + 1)),
            int(rng.integers(0, picture.height - ch + 1)),
        )
        size = (short_side * w // min(w, h), short_side * h // min(w, h))
        crop = picture.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
        crop.save(folder / f"{i:03d}.jpg", quality=90)


def save_encoder(folder: Path, backbone: str, image_size: int) -> Path:
    """An untrained encoder of `backbone` at `image_size`, saved as a checkpoint embed.py loads."""
    config = CorInfoMaxConfig(backbone=backbone, image_size=image_size, projector_dims=[64, 64, 16])
    CorInfoMaxModel(config, add_projector=False).save_pretrained(folder)
    return folder


def run(launcher: list[str], model: Path, flags: list[str], workers: int, out: Path) -> tuple[float, float]:
    """(images/s the command logged, the command's wall seconds)."""
    command = [*launcher, str(ROOT / "embed.py"), str(model), *flags, "--output", str(out / "e.parquet"),
               "--dataloader_num_workers", str(workers), "--per_device_batch_size", "32"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(out / "cache"))
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = re.search(r"([\d.]+) images/s", result.stdout + result.stderr)
    if result.returncode or not found:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return float(found.group(1)), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="--dataloader_num_workers values")
    p.add_argument("--fashion_samples", type=int, default=1024)
    p.add_argument("--max_load", type=float, default=None, help="wait until the load average is below this")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_photos(root / "photos")
        values = {"photos": root / "photos", "fashion_samples": args.fashion_samples}
        print(f"{cpu_model()}, {os.cpu_count()} cores")
        print(f"{'case':<16} {'launch':<12} {'workers':>7} {'images/s':>9} {'wall s':>7} {'load':>5}")
        for case in args.cases:
            backbone, size, flags = CASES[case]
            model = save_encoder(root / f"{backbone}-{size}", backbone, size)
            flags = [flag.format(**values) for flag in flags]
            for name, launcher in LAUNCHERS.items():
                for workers in args.workers:
                    load = wait_for_quiet(args.max_load)
                    rate, wall = run(launcher, model, flags, workers, root)
                    print(
                        f"{case:<16} {name:<12} {workers:>7} {rate:>9.1f} {wall:>7.1f} {load:>5.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
