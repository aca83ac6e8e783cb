#!/usr/bin/env python
"""Does a short budgeted run on a small folder of images help? (the README's "your own images" path)

Builds image folders (`<root>/{train,test}/<class>/*.png`) and runs, as a user would,

    accelerate launch train.py --train_dir <folder> --time_budget_minutes 9

then prints train.py's final report: kNN and linear-probe accuracy of the pretrained encoder against a
random init and raw pixels, the steps the budget gave, and the wall time.

    python bench/small_folder.py --dataset fashion4k       # tuning set: 4,000 Fashion-MNIST training images
    python bench/small_folder.py --dataset textures        # check set: patches of scikit-image's photos
    python bench/small_folder.py --dataset photos          # check set: JPEG photos of varied sizes
    python bench/small_folder.py --dataset fashion4k --build_only --root /tmp/folders

`fashion4k`: 400 images per class from Debian's `dataset-fashion-mnist` (train) and 200 per class of
its test set. `textures`: 32x32 RGB patches cut from ten of scikit-image's bundled photographs and
textures (class = source picture; training patches from the upper 70 % of each picture, test patches
from the lower 30 %, so the two never overlap): 300 + 100 per class. Needs `pip install scikit-image`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import user_launch  # noqa: E402

from modeling_corinfomax.data import FASHION_MNIST_DIR, read_idx  # noqa: E402

FASHION = FASHION_MNIST_DIR
TEXTURE_SOURCES = ("brick", "grass", "gravel", "camera", "coffee", "coins", "astronaut", "chelsea", "rocket",
                   "hubble_deep_field")  # fmt: skip


def write_split(folder: Path, images, labels) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / f"class_{int(label)}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    )


def build_fashion4k(root: Path) -> None:
    for split, prefix, per_class in (("train", "train", 400), ("test", "t10k", 200)):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        keep = balanced(labels, per_class, seed=1)
        write_split(root / split, images[keep], labels[keep])


def build_textures(root: Path, size: int = 32) -> None:
    from skimage import data  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for label, name in enumerate(TEXTURE_SOURCES):
        picture = getattr(data, name)()
        if picture.ndim == 2:
            picture = np.stack([picture] * 3, axis=-1)
        picture = picture[..., :3]
        cut = int(0.7 * picture.shape[0])
        for split, region, count in (("train", picture[:cut], 300), ("test", picture[cut:], 100)):
            patches = []
            for _ in range(count):
                largest = min(3 * size, *region.shape[:2])
                side = int(rng.integers(size, largest + 1))  # patches of several scales, resized
                top = int(rng.integers(0, region.shape[0] - side + 1))
                left = int(rng.integers(0, region.shape[1] - side + 1))
                patch = Image.fromarray(region[top : top + side, left : left + side]).resize((size, size))
                patches.append(np.asarray(patch))
            offset = label * count
            for i, patch in enumerate(patches):
                target = root / split / f"class_{label}"
                target.mkdir(parents=True, exist_ok=True)
                Image.fromarray(patch).save(target / f"{offset + i:05d}.png")


def build_photos(root: Path) -> None:
    """Photos of varied sizes: JPEG crops (quality 90, short side 150-450 px, aspect 3:4-4:3) of six of the
    real photographs in Debian's `mate-backgrounds` (class = photograph; training crops from the left 70 % of
    each photograph, test crops from the right 30 %): 400 + 100 per class."""
    if not PHOTO_DIR.is_dir():
        raise SystemExit(f"error: {PHOTO_DIR} is missing: `apt-get install mate-backgrounds`.")
    rng = np.random.default_rng(0)
    for name in PHOTO_SOURCES:
        with Image.open(PHOTO_DIR / f"{name}.jpg") as photo:
            picture = photo.convert("RGB")
        cut = int(0.7 * picture.width)
        regions = (("train", (0, cut), 400), ("test", (cut, picture.width), 100))
        for split, (x0, x1), count in regions:
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(rng.integers(picture.height // 5, picture.height // 2))
                side = min(side, x1 - x0)
                top = int(rng.integers(0, picture.height - side + 1))
                left = int(rng.integers(x0, x1 - side + 1))
                short, aspect = (
                    int(rng.integers(150, 451)),
                    float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))),
                )
                size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
                crop = picture.crop((left, top, left + side, top + side)).resize(size, Image.BICUBIC)
                crop.save(target / f"{i:04d}.jpg", quality=90)


PHOTO_DIR = Path("/usr/share/backgrounds/mate/nature")
PHOTO_SOURCES = ("Dune", "GreenMeadow", "LadyBird", "RainDrops", "Storm", "Wood")
BUILDERS = {"fashion4k": build_fashion4k, "textures": build_textures, "photos": build_photos}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(BUILDERS), default="fashion4k")
    p.add_argument("--root", default="bench/results/folders", help="where the image folders are written")
    p.add_argument("--time_budget_minutes", type=float, default=9.0)
    p.add_argument("--build_only", action="store_true")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags (for studies)")
    args = p.parse_args()
    folder = Path(args.root) / args.dataset
    if not (folder / "train").is_dir():
        BUILDERS[args.dataset](folder)
    if args.build_only:
        print(folder)
        return
    out = Path("bench/results") / f"small_folder_{args.dataset}"
    flags = ["--train_dir", str(folder), "--time_budget_minutes", str(args.time_budget_minutes), "--output_dir",
             str(out), *args.extra]  # fmt: skip
    if (out / "checkpoints").exists() or (out / "eval_results.json").exists():
        raise SystemExit(f"error: {out} holds an earlier run: delete it first.")
    start = time.time()
    user_launch(flags)
    wall = time.time() - start
    results = json.loads((out / "eval_results.json").read_text())
    print(f"\n{args.dataset}: {results['global_step']} steps, wall {wall / 60:.1f} min "
          f"(budget {args.time_budget_minutes} min)")  # fmt: skip
    print("| encoder | kNN top-1 | linear top-1 |\n|---|---|---|")
    for name, suffix in (("pretrained", ""), ("random init", "_random_init"), ("raw pixels", "_raw_pixels")):
        print(f"| {name} | {results['knn_top1' + suffix]:.2f} | {results['linear_top1' + suffix]:.2f} |")


if __name__ == "__main__":
    main()
