"""Data for CorInfoMax: `datasets` loading, image modes, and the paper's two-view augmentation.

The pipeline is split so that the expensive part runs batched:
- in DataLoader workers, per image: decode, convert to RGB, random-resized-crop + flip twice, as uint8
  tensors (`TwoViewDataset`);
- in the training step, per batch, on the training device: colour jitter, grayscale, Gaussian blur,
  solarisation and normalisation with per-sample random parameters (`BatchViewAugment`).

Every random draw is a function of `(seed, epoch, sample index)` or `(seed, step, rank)`, so an
interrupted and resumed run sees exactly the same views.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "fashion_mnist"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target")


class DataError(ValueError):
    """A dataset problem that is reported before (or instead of) a stack trace from a worker."""


def data_error_message(error: DataError) -> str:
    """The one-line message of a `DataError`, also of one raised in a DataLoader worker (which the
    DataLoader re-raises as a new `DataError` whose message is the worker's whole traceback)."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].split("DataError: ", 1)[-1]
    return text


# ---------------------------------------------------------------------------------------------------
# Loading


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
):
    """Load one split of an image corpus: a Hub dataset, a local image folder, or the bundled default.

    - `dataset_name`: anything `datasets.load_dataset` accepts (a Hub id, or a local folder of
      parquet/arrow files);
    - `train_dir`: a folder of images (`imagefolder`; class sub-folders give labels);
    - neither: the bundled Fashion-MNIST subset in `data/fashion_mnist`.
    """
    import datasets  # noqa: PLC0415  (heavy import, only for entry points)

    if dataset_name and train_dir:
        raise DataError("pass either --dataset_name or --train_dir, not both.")
    if train_dir and not Path(train_dir).is_dir():
        raise DataError(f"--train_dir {train_dir!r} is not a folder of images.")
    files = {s: str(BUNDLED_DATA_DIR / f"{s}.parquet") for s in ("train", "test")}
    if not (train_dir or dataset_name or all(Path(f).exists() for f in files.values())):
        raise DataError(
            f"the bundled dataset is missing from {BUNDLED_DATA_DIR}: run `python data/make_fashion_mnist.py` "
            "(needs `apt-get install dataset-fashion-mnist`) or pass --dataset_name/--train_dir."
        )
    try:
        if train_dir:
            ds = datasets.load_dataset(
                "imagefolder", data_dir=train_dir, streaming=streaming, cache_dir=cache_dir
            )
        elif dataset_name:
            ds = datasets.load_dataset(
                dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, revision=revision
            )
        else:
            ds = datasets.load_dataset("parquet", data_files=files, streaming=streaming, cache_dir=cache_dir)
    except (OSError, ValueError) as error:  # no such dataset, a folder without images, a missing config, ...
        source = (
            f"--train_dir {train_dir}" if train_dir else f"--dataset_name {dataset_name or files['train']}"
        )
        raise DataError(f"cannot load {source}: {type(error).__name__}: {error}") from None
    if split not in ds:
        raise DataError(
            f"split {split!r} not found; available splits: {sorted(ds)}. Use --train_split/--validation_split."
        )
    return ds[split]


def resolve_columns(
    dataset, image_column: str | None = None, label_column: str | None = None, need_label=False
):
    """Find the image column (and the label column, which is optional) of a dataset.

    Returns `(image_column, label_column_or_None)`; raises `DataError` naming the columns when ambiguous.
    """
    from datasets import ClassLabel  # noqa: PLC0415
    from datasets import Image as ImageFeature  # noqa: PLC0415

    features = dataset.features or {}
    columns = list(features) if features else list(getattr(dataset, "column_names", None) or [])
    if image_column is None:
        typed = [c for c, f in features.items() if isinstance(f, ImageFeature)]
        named = [c for c in IMAGE_COLUMN_CANDIDATES if c in columns]
        options = typed or named
        if len(options) != 1:
            raise DataError(
                f"cannot tell which column holds the images among {columns}: pass --image_column "
                f"({'candidates: ' + ', '.join(options) if options else 'no column has the Image feature'})."
            )
        image_column = options[0]
    elif image_column not in columns:
        raise DataError(
            f"--image_column {image_column!r} is not a column of the dataset; its columns are {columns}."
        )
    if label_column is None:
        typed = [c for c, f in features.items() if isinstance(f, ClassLabel)]
        named = [c for c in LABEL_COLUMN_CANDIDATES if c in columns]
        label_column = (typed or named or [None])[0]
    elif label_column not in columns:
        raise DataError(
            f"--label_column {label_column!r} is not a column of the dataset; its columns are {columns}."
        )
    if need_label and label_column is None:
        raise DataError(
            f"this needs labels but no label column was found among {columns}: pass --label_column."
        )
    return image_column, label_column


def label_names(dataset, label_column: str | None) -> list[str] | None:
    """Class names of a ClassLabel column (None when the column is absent or not a ClassLabel)."""
    feature = (dataset.features or {}).get(label_column) if label_column else None
    return list(feature.names) if hasattr(feature, "names") else None


def class_names(dataset, label_column: str) -> list[str] | None:
    """The classes of a label column: its ClassLabel names, the sorted distinct values of a column of
    strings, or None for integer class indices."""
    names = label_names(dataset, label_column)
    if names is None and getattr((dataset.features or {}).get(label_column), "dtype", None) in (
        "string",
        "large_string",
    ):
        names = sorted({v for v in dataset[label_column] if v is not None})
    return names


def class_indices(dataset, label_column: str, names: list[str] | None, split: str) -> list[int]:
    """Each row's class index in `names` (from `class_names` of the training split), -1 where the label
    is missing (None, or negative as in unlabelled test splits).

    A ClassLabel that names or orders the classes differently is mapped by name, so labels never index
    the wrong class. Raises `DataError` for classes that `names` lacks and for indices outside it.
    """
    values = list(dataset[label_column])
    own = label_names(dataset, label_column)
    if own is not None and names is not None and own != names:
        values = [own[v] if v is not None and v >= 0 else None for v in values]
    if any(isinstance(v, str) for v in values):
        if names is None:
            raise DataError(
                f"the {split!r} split has string labels but the training split has class indices."
            )
        position = {name: i for i, name in enumerate(names)}
        unknown = sorted({v for v in values if v is not None and v not in position})
        if unknown:
            raise DataError(
                f"the {split!r} split has classes {unknown[:5]} that the training split does not have "
                f"(its classes: {names[:10]}{' ...' if len(names) > 10 else ''}): use splits with the same classes."
            )
        values = [position[v] if v is not None else None for v in values]
    indices = [-1 if v is None or v < 0 else int(v) for v in values]
    outside = sorted({i for i in indices if names is not None and i >= len(names)})
    if outside:
        raise DataError(
            f"the {split!r} split has labels {outside[:5]} outside the {len(names)} classes of the training "
            f"split's ClassLabel: use splits with the same label feature, or --label_column."
        )
    return indices


# ---------------------------------------------------------------------------------------------------
# Decoding and image modes


def decode_image(value: Any) -> Image.Image:
    """Decode a `datasets` image cell (PIL image, `{"bytes", "path"}` dict, path or bytes) to RGB.

    Handles every PIL mode: L/LA/P/PA (palette transparency is composited on white), RGBA, CMYK, YCbCr,
    and 16/32-bit integer or float images (rescaled to 8 bits from their own range).
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise DataError(f"unsupported image value of type {type(value).__name__}")
    image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(array.round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Augmentation settings (the paper's asymmetric BYOL/VICReg pipeline, section 3 of the method notes)


@dataclass
class ViewAugmentation:
    """Augmentation of one view. Defaults are the paper's view 1."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


@dataclass
class TwoViewAugmentation:
    """The two views' augmentations; the default is the paper's asymmetric pipeline."""

    view1: ViewAugmentation = field(default_factory=ViewAugmentation)
    view2: ViewAugmentation = field(default_factory=lambda: ViewAugmentation(blur_p=0.1, solarize_p=0.2))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> TwoViewAugmentation:
        if not d:
            return cls()
        views = {}
        for key in ("view1", "view2"):
            known = {f for f in ViewAugmentation.__dataclass_fields__}
            unknown = set(d.get(key, {})) - known
            if unknown:
                raise DataError(
                    f"unknown augmentation keys {sorted(unknown)} in {key}; known: {sorted(known)}."
                )
            views[key] = ViewAugmentation(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in d.get(key, {}).items()}
            )
        return cls(**views)


# ---------------------------------------------------------------------------------------------------
# Per-image part (DataLoader workers): decode + random resized crop + flip, uint8


def _sample_seed(*parts: int) -> int:
    # A cheap, well-mixed 63-bit seed from a few integers (splitmix64 steps).
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def random_resized_crop_params(height: int, width: int, scale, ratio, generator: torch.Generator):
    """torchvision's RandomResizedCrop parameter sampling, drawn from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_view(
    image: torch.Tensor, size: int, aug: ViewAugmentation, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop (bicubic, antialiased) and horizontal flip of a (3, H, W) uint8 image."""
    top, left, h, w = random_resized_crop_params(
        image.shape[-2], image.shape[-1], aug.crop_scale, (3 / 4, 4 / 3), generator
    )
    view = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
    if torch.rand(1, generator=generator).item() < aug.flip_p:
        view = TF.horizontal_flip(view)
    return view


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Un-augmented evaluation view: resize the short side to size*8/7 (bicubic), centre-crop `size`."""
    resized = TF.resize(image, [int(size * 8 / 7)], InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


class ImageRows(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` that yields dicts of uint8 image tensors.

    `mode="two_view"` yields `view1`, `view2` (random crops); `mode="eval"` yields `pixel_values`
    (resize + centre crop). Undecodable images become `{"error": ...}` rows that the collate function
    reports or skips, so a bad file never surfaces as a bare worker traceback.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None,
        image_size: int,
        mode: str = "two_view",
        augmentation: TwoViewAugmentation | None = None,
        seed: int = 0,
        labels: list[int] | None = None,
    ):
        if mode not in ("two_view", "eval"):
            raise ValueError(f"mode={mode!r}: use 'two_view' or 'eval'.")
        dataset = undecoded_columns(dataset, image_column, label_column)
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.image_size, self.mode, self.seed, self.epoch = image_size, mode, seed, 0
        self.augmentation = augmentation or TwoViewAugmentation()
        self.labels = labels  # class indices that replace the label column's (see `class_indices`)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        example = make_example(
            row,
            index,
            self.image_column,
            self.label_column,
            self.image_size,
            self.mode,
            self.augmentation,
            _sample_seed(self.seed, self.epoch, index),
        )
        if self.labels is not None and "error" not in example:
            example["labels"] = self.labels[index]
        return example


def undecoded_columns(dataset, image_column: str, label_column: str | None):
    """Only the columns that are used, the images as undecoded bytes/paths: `datasets` would otherwise
    decode every Image column while reading a row, where an unreadable file cannot be reported per row."""
    from datasets import Image as ImageFeature  # noqa: PLC0415

    if dataset.features is not None:  # (streaming datasets may not know their columns)
        dataset = dataset.select_columns(list(dict.fromkeys(c for c in (image_column, label_column) if c)))
        if isinstance(dataset.features.get(image_column), ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def make_example(row, index, image_column, label_column, image_size, mode, augmentation, seed) -> dict:
    """Decode and crop one dataset row into the dict the collate function expects."""
    cell = row[image_column]
    name = cell.get("path") if isinstance(cell, dict) else None
    try:
        image = TF.pil_to_tensor(decode_image(cell))
        if min(image.shape[-2:]) < 2:
            raise DataError(f"image of {image.shape[-1]}x{image.shape[-2]} pixels is too small to crop")
    except Exception as error:  # noqa: BLE001  (reported by the collate function with the row's name)
        return {
            "error": f"row {index}{' (' + str(name) + ')' if name else ''}: {type(error).__name__}: {error}"
        }
    label = row.get(label_column, -1) if label_column else -1
    example = {"index": index, "labels": -1 if label is None else int(label)}
    if mode == "eval":
        example["pixel_values"] = eval_view(image, image_size)
    else:
        generator = torch.Generator().manual_seed(seed)
        example["view1"] = crop_view(image, image_size, augmentation.view1, generator)
        example["view2"] = crop_view(image, image_size, augmentation.view2, generator)
    return example


class StreamingImageRows(torch.utils.data.IterableDataset):
    """Iterable counterpart of `ImageRows` for `streaming=True` datasets (already split per process)."""

    def __init__(
        self,
        dataset,
        image_column,
        label_column,
        image_size,
        mode="two_view",
        augmentation=None,
        seed=0,
        shuffle_buffer: int = 10_000,
    ):
        dataset = undecoded_columns(dataset, image_column, label_column)
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.image_size, self.mode, self.seed, self.epoch = image_size, mode, seed, 0
        self.augmentation = augmentation or TwoViewAugmentation()
        self.shuffle_buffer = shuffle_buffer

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        dataset = self.dataset
        if self.mode == "two_view" and self.shuffle_buffer > 1:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(self.epoch)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for position, row in enumerate(dataset):
            if position % workers == worker:
                yield make_example(
                    row,
                    position,
                    self.image_column,
                    self.label_column,
                    self.image_size,
                    self.mode,
                    self.augmentation,
                    _sample_seed(self.seed, self.epoch, position),
                )


class ExampleCollator:
    """Stack uint8 views and labels; report (or, with `skip_bad_images`, drop and count) bad rows."""

    def __init__(self, skip_bad_images: bool = False):
        self.skip_bad_images = skip_bad_images

    def __call__(self, examples: list[dict]) -> dict:
        bad = [e["error"] for e in examples if "error" in e]
        good = [e for e in examples if "error" not in e]
        if bad and not self.skip_bad_images:
            raise DataError(
                f"could not read {len(bad)} image(s), first: {bad[0]}. Fix or remove the file, or pass "
                "--skip_bad_images to skip unreadable images (they are counted and the first names logged)."
            )
        batch: dict[str, Any] = {"bad_images": bad}
        if not good:
            return batch
        for key in ("view1", "view2", "pixel_values"):
            if key in good[0]:
                batch[key] = torch.stack([e[key] for e in good])
        batch["labels"] = torch.tensor([e["labels"] for e in good], dtype=torch.long)
        batch["index"] = torch.tensor([e["index"] for e in good], dtype=torch.long)
        return batch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random permutation of range(n) that depends only on `(seed, epoch)` (resumable)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, 0x5A))
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ---------------------------------------------------------------------------------------------------
# Per-batch part (training device): colour, blur, solarisation, normalisation


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    s = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class BatchViewAugment(nn.Module):
    """Colour jitter, grayscale, Gaussian blur, solarisation and normalisation of a uint8 batch.

    Each sample gets its own random parameters (as torchvision's per-image transforms would), drawn
    from an explicit `generator`; the order of the four jitter operations is drawn once per batch.
    Input (B, 3, H, W) uint8 on any device; output float32 normalised, in `memory_format`.
    """

    def __init__(self, aug: ViewAugmentation, mean, std):
        super().__init__()
        self.aug = aug
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator, memory_format=torch.contiguous_format
    ) -> torch.Tensor:
        aug, b = self.aug, images.shape[0]
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)

        def uniform(low, high):
            return (
                torch.rand(b, generator=generator, device=generator.device).to(x.device) * (high - low) + low
            )

        def coin(p):
            return uniform(0.0, 1.0) < p

        jitter = coin(aug.jitter_p)
        order = torch.randperm(4, generator=generator, device=generator.device).tolist()
        factors = {
            0: torch.where(jitter, uniform(1 - aug.brightness, 1 + aug.brightness), 1.0),
            1: torch.where(jitter, uniform(1 - aug.contrast, 1 + aug.contrast), 1.0),
            2: torch.where(jitter, uniform(1 - aug.saturation, 1 + aug.saturation), 1.0),
            3: torch.where(jitter, uniform(-aug.hue, aug.hue), 0.0),
        }
        for op in order:
            f = factors[op].view(b, 1, 1, 1)
            if op == 0 and aug.brightness > 0:
                x = (x * f).clamp_(0, 1)
            elif op == 1 and aug.contrast > 0:
                mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (f * x + (1 - f) * mean).clamp_(0, 1)
            elif op == 2 and aug.saturation > 0:
                x = (f * x + (1 - f) * _grayscale(x)).clamp_(0, 1)
            elif op == 3 and aug.hue > 0:
                hsv = _rgb_to_hsv(x)
                hsv = torch.cat([(hsv[:, :1] + f.view(b, 1, 1, 1)) % 1.0, hsv[:, 1:]], 1)
                x = torch.where(jitter.view(b, 1, 1, 1), _hsv_to_rgb(hsv), x)
        x = torch.where(coin(aug.grayscale_p).view(b, 1, 1, 1), _grayscale(x).expand_as(x), x)
        if aug.blur_p > 0:
            x = torch.where(coin(aug.blur_p).view(b, 1, 1, 1), self._blur(x, uniform(*aug.blur_sigma)), x)
        if aug.solarize_p > 0:
            x = torch.where(coin(aug.solarize_p).view(b, 1, 1, 1) & (x >= 128 / 255), 1.0 - x, x)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # Separable Gaussian with a per-sample sigma (PIL's GaussianBlur radius is the std in pixels).
        b, c, h, w = x.shape
        radius = min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2)
        if radius < 1:
            return x
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, k)
        y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
        y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
        return y.view(b, c, h, w)


def normalize_batch(images: torch.Tensor, mean, std, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, for evaluation views."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean_t) / std_t).contiguous(memory_format=memory_format)


__all__ = [
    "BUNDLED_DATA_DIR",
    "BatchViewAugment",
    "DataError",
    "EpochShuffleSampler",
    "ExampleCollator",
    "ImageRows",
    "StreamingImageRows",
    "TwoViewAugmentation",
    "ViewAugmentation",
    "class_indices",
    "class_names",
    "crop_view",
    "data_error_message",
    "decode_image",
    "eval_view",
    "label_names",
    "load_image_dataset",
    "make_example",
    "normalize_batch",
    "random_resized_crop_params",
    "resolve_columns",
    "to_rgb",
]
