"""Build the bundled demo dataset from the real Fashion-MNIST (Debian package `dataset-fashion-mnist`).

    apt-get install -y dataset-fashion-mnist
    python data/make_fashion_mnist.py            # writes modeling_corinfomax/demo_data/fashion_mnist/{train,test}.parquet

The output is `datasets`-native parquet (an `image` column of PNG bytes and a `label` ClassLabel
column), class-balanced, with a fixed seed, so the files are reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from modeling_corinfomax.data import FASHION_MNIST_DIR, read_idx

SOURCE = FASHION_MNIST_DIR
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(picks))


def to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        PILImage.fromarray(a, mode="L").save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    rows = {"image": [{"bytes": png(a), "path": None} for a in images], "label": labels.tolist()}
    return Dataset.from_dict(rows, features=features)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "modeling_corinfomax" / "demo_data" / "fashion_mnist",
    )
    parser.add_argument("--train_per_class", type=int, default=2400)
    parser.add_argument("--test_per_class", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.source / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"{args.source} has no Fashion-MNIST files: run `apt-get install -y dataset-fashion-mnist`."
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, prefix, per_class in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        keep = balanced_subset(labels, per_class, args.seed)
        ds = to_dataset(images[keep], labels[keep])
        path = args.output_dir / f"{split}.parquet"
        ds.to_parquet(str(path))
        print(f"{split}: {len(ds)} images -> {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
