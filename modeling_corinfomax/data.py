"""Data for CorInfoMax: `datasets` loading, image modes, and the paper's two-view augmentation.

The pipeline is split so that the expensive part runs batched:
- decode and crop: either per image in DataLoader workers (decode, convert to RGB, random-resized-crop +
  flip twice, as uint8 tensors: `ImageRows`), or, for a split of same-size images that fits in memory,
  decoded once into one uint8 tensor and cropped a whole batch at a time with the same antialiased
  bicubic resampling (`DecodedImages`, `batched_resized_crop`): no per-image work during training;
- in the training step, per batch, on the training device: colour jitter, grayscale, Gaussian blur,
  solarisation and normalisation with per-sample random parameters (`BatchViewAugment`).

Every random draw is a function of `(seed, epoch, sample index)`, `(seed, epoch, batch)` or
`(seed, step, rank)`, so an interrupted and resumed run sees exactly the same views.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "demo_data" / "fashion_mnist"  # package data
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
    - neither: the bundled Fashion-MNIST subset in `modeling_corinfomax/demo_data/fashion_mnist`.
    """
    import datasets  # noqa: PLC0415  (heavy import, only for entry points)

    if dataset_name and train_dir:
        raise DataError("pass either --dataset_name or --train_dir, not both.")
    if train_dir and not Path(train_dir).is_dir():
        raise DataError(f"--train_dir {train_dir!r} is not a folder of images.")
    files = {s: str(BUNDLED_DATA_DIR / f"{s}.parquet") for s in ("train", "test")}
    if not (train_dir or dataset_name or all(Path(f).exists() for f in files.values())):
        raise DataError(
            f"the bundled dataset is missing from {BUNDLED_DATA_DIR}: reinstall the package, or in a checkout run `python data/make_fashion_mnist.py` "
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
# Augmentation settings (the paper's asymmetric BYOL/VICReg pipeline)


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
    return centre_crop_box(height, width, ratio)


def centre_crop_box(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback after 10 failed tries: the largest centred box of an allowed ratio."""
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
    (resize + centre crop); `mode="decode"` yields the decoded image as is. Undecodable images become `{"error": ...}` rows that the collate function
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
        if mode not in ("two_view", "eval", "decode"):
            raise ValueError(f"mode={mode!r}: use 'two_view', 'eval' or 'decode'.")
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
    elif mode == "decode":
        example["pixel_values"] = image
    else:
        generator = torch.Generator().manual_seed(seed)
        example["view1"] = crop_view(image, image_size, augmentation.view1, generator)
        example["view2"] = crop_view(image, image_size, augmentation.view2, generator)
    return example


def split_stream(dataset, process_index: int, num_processes: int, num_workers: int):
    """This process's part of a `streaming=True` dataset, and how many DataLoader workers can read it.

    `datasets` hands each DataLoader worker whole shards (files, or row groups after `reshard`) and gives
    a worker beyond the number of shards nothing, so the workers are capped at the shards this process
    has: every row then arrives exactly once per pass, on one process or several.
    """
    from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

    if dataset.n_shards < max(1, num_workers) * num_processes:
        dataset = dataset.reshard()  # more, smaller shards where the files allow (parquet row groups)
    shard = split_dataset_by_node(dataset, process_index, num_processes)
    return shard, min(num_workers, shard.n_shards)


class StreamingImageRows(torch.utils.data.IterableDataset):
    """Iterable counterpart of `ImageRows` for `streaming=True` datasets (already split per process by
    `split_stream`; `datasets` splits it further between DataLoader workers, by shard)."""

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
        stream_id: int = 0,
    ):
        dataset = undecoded_columns(dataset, image_column, label_column)
        self.stream_id = stream_id  # the process index: the views of each process's stream differ
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
        worker = info.id if info else 0
        for position, row in enumerate(dataset):
            yield make_example(
                row,
                position,
                self.image_column,
                self.label_column,
                self.image_size,
                self.mode,
                self.augmentation,
                _sample_seed(self.seed, self.epoch, self.stream_id, worker, position),
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
# Decoded-once splits: the whole split in one uint8 tensor, crops made a batch at a time


def _bicubic_aa(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    # Keys' cubic with a = -0.5: the kernel of PIL's and PyTorch's antialiased bicubic resampling.
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per-sample matrices (B, out_size, in_size) that resample the window `[start, start + length)` of
    an axis of `in_size` pixels to `out_size` pixels, as `F.interpolate(mode="bicubic", antialias=True)`
    does for the cropped window (the filter widens by the downscaling factor; each row sums to 1)."""
    start, length = start.double(), length.double()
    scale = (length / out_size)[:, None, None]
    support = 2.0 * scale.clamp(min=1.0)
    center = scale * (torch.arange(out_size, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    first = (center - support + 0.5).floor().clamp(min=0.0)
    end = torch.minimum((center + support + 0.5).floor(), length[:, None, None])
    j = torch.arange(in_size, dtype=torch.float64, device=start.device)[None, None, :] - start[:, None, None]
    window = (j >= first) & (j < end)
    weights = _bicubic_aa((j - center + 0.5) / scale.clamp(min=1.0)) * window
    return (weights / weights.sum(-1, keepdim=True)).float()


def sample_crop_boxes(
    n: int, height: int, width: int, scale, ratio, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """`n` boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop draws one: up to 10 tries of
    an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop."""
    device = generator.device
    area = (
        height * width * torch.empty(n, 10, device=device).uniform_(scale[0], scale[1], generator=generator)
    )
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.empty(n, 10, device=device).uniform_(log_lo, log_hi, generator=generator))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    pick = ok.int().argmax(1, keepdim=True)  # the first successful try
    found = ok.any(1)
    ftop, fleft, fh, fw = centre_crop_box(height, width, ratio)
    w = torch.where(found, w.gather(1, pick).squeeze(1), float(fw))
    h = torch.where(found, h.gather(1, pick).squeeze(1), float(fh))
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), float(ftop))
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), float(fleft))
    return top.long(), left.long(), h.long(), w.long()


def batched_resized_crop(
    images: torch.Tensor, top, left, h, w, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop each (3, H, W) uint8 image of a batch to its own box, resize it to `size` with antialiased
    bicubic resampling and flip it where `flip` is set: `TF.resized_crop(..., BICUBIC, antialias=True)`
    then `TF.horizontal_flip` per image, as two batched matrix products (equal to within 1/255: PyTorch's
    uint8 kernel uses fixed-point weights)."""
    rows = resize_weights(top, h, images.shape[-2], size)  # (B, size, H)
    cols = resize_weights(left, w, images.shape[-1], size)  # (B, size, W)
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    # Horizontal pass, rounded to 8 bits, then vertical: the order and rounding of PyTorch's (and PIL's)
    # uint8 kernel, which the per-image path uses; a float-only pass differs by up to ~10/255 at edges.
    x = (images.float() @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # (B, 3, H, size)
    x = rows.unsqueeze(1) @ x  # (B, 3, size, size)
    return x.round_().clamp_(0, 255).to(torch.uint8)


class Decoded(NamedTuple):
    """What `DecodedImages.decode` returns."""

    images: torch.Tensor | None  # (N, 3, H, W) uint8, or None when the split cannot be decoded into one
    rows: torch.Tensor | None  # the dataset row of each image
    bad_images: list[str]  # descriptions of the unreadable images left out
    message: str  # what was decoded, or why not


class DecodedImages(torch.utils.data.Dataset):
    """A split of same-size images decoded once into one uint8 tensor; batches of two-view crops.

    Items are indices; `collate` makes a batch's two views with `batched_resized_crop` from boxes
    drawn as `crop_view` draws them (the random draws depend on `(seed, epoch, batch)`, so a resumed
    run sees the same views). It yields what `ImageRows` + `ExampleCollator` yield, so the training
    loop is the same; use it with `num_workers=0` (there is no per-image work left to spread).
    """

    def __init__(
        self,
        images: torch.Tensor,
        image_size: int,
        augmentation: TwoViewAugmentation | None = None,
        seed: int = 0,
        bad_images: list[str] | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.image_size, self.seed, self.epoch = images, image_size, seed, 0
        self.augmentation = augmentation or TwoViewAugmentation()
        self.bad_images = bad_images or []  # what `decode` left out

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> int:
        return int(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def collate(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long)
        images = self.images[index]
        generator = torch.Generator().manual_seed(
            _sample_seed(self.seed, self.epoch, indices[0], len(indices))
        )
        batch: dict[str, Any] = {"bad_images": [], "labels": torch.full_like(index, -1), "index": index}
        height, width = images.shape[-2:]
        for key, aug in (("view1", self.augmentation.view1), ("view2", self.augmentation.view2)):
            boxes = sample_crop_boxes(len(indices), height, width, aug.crop_scale, (3 / 4, 4 / 3), generator)
            flip = torch.rand(len(indices), generator=generator) < aug.flip_p
            batch[key] = batched_resized_crop(images, *boxes, flip, self.image_size)
        return batch

    @staticmethod
    def decode(
        dataset,
        image_column: str,
        max_bytes: int,
        num_workers: int = 0,
        skip_bad_images: bool = False,
    ) -> Decoded:
        """Decode every image of `dataset` into one (N, 3, H, W) uint8 tensor.

        `images` is None, and `message` says why, when the images differ in size or would take more
        than `max_bytes`. An unreadable image raises `DataError`, or with `skip_bad_images` is left out
        and described in `bad_images`; `rows` are the dataset rows of `images`.
        """
        rows = ImageRows(dataset, image_column, None, 0, mode="decode")
        loader = torch.utils.data.DataLoader(
            rows,
            batch_size=512,
            num_workers=num_workers,
            collate_fn=_stack_decoded,
            prefetch_factor=4 if num_workers else None,
        )
        images, bad, position, kept = None, [], 0, []
        for batch in loader:
            for example in batch["errors"]:
                if not skip_bad_images:
                    ExampleCollator()([example])  # raises the usual DataError
                bad.append(example["error"])
            pixels = batch["pixel_values"]
            if isinstance(pixels, list):  # the worker found images of different sizes
                a, b = pixels[0].shape[-2:], next(p.shape[-2:] for p in pixels if p.shape != pixels[0].shape)
                return Decoded(None, None, bad, f"images differ in size ({tuple(a)} and {tuple(b)})")
            if not len(pixels):
                continue
            if images is None:
                need = len(rows) * pixels[0].numel()
                if need > max_bytes:
                    limit = f"{need / 2**30:.2f} GiB, over the {max_bytes / 2**30:.2f} GiB limit"
                    return Decoded(None, None, bad, f"decoded, the split would take {limit}")
                images = torch.empty((len(rows), *pixels.shape[1:]), dtype=torch.uint8)
            elif pixels.shape[1:] != images.shape[1:]:
                a, b = tuple(images.shape[-2:]), tuple(pixels.shape[-2:])
                return Decoded(None, None, bad, f"images differ in size ({a} and {b})")
            images[position : position + len(pixels)] = pixels
            position += len(pixels)
            kept.append(batch["index"])
        if images is None:
            raise DataError(
                f"no image of the training split could be read ({len(bad)} skipped, first: "
                f"{bad[0] if bad else '-'}): check the files and --image_column."
            )
        images = images[:position]
        size = f"{images.shape[-1]}x{images.shape[-2]} px ({images.numel() / 2**20:.0f} MiB)"
        return Decoded(images, torch.cat(kept), bad, f"decoded {position} images of {size}")


def _stack_decoded(examples: list[dict]) -> dict:
    """Decoded images as one tensor when they share a size (a tensor per image would cross from a worker
    to the main process one shared-memory file at a time: 5x slower than decoding them), and the errors."""
    good = [e["pixel_values"] for e in examples if "error" not in e]
    errors = [e for e in examples if "error" in e]
    if len({p.shape for p in good}) > 1:
        return {"pixel_values": good, "errors": errors}
    return {
        "pixel_values": torch.stack(good) if good else torch.empty(0, dtype=torch.uint8),
        "index": torch.tensor([e["index"] for e in examples if "error" not in e], dtype=torch.long),
        "errors": errors,
    }


class CachedRows(torch.utils.data.Dataset):
    """The examples of an `ImageRows(mode="eval")`, made once and kept in memory as uint8 tensors, so
    that repeated passes (kNN monitoring, the final evaluation and its baselines) decode nothing again.
    Items are what `ImageRows` yields, for `ExampleCollator`; use it with `num_workers=0`."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, index: torch.Tensor):
        self.pixel_values, self.index = pixel_values, index
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, i: int) -> dict:
        return {"index": int(self.index[i]), "labels": self.labels[i], "pixel_values": self.pixel_values[i]}

    @classmethod
    def build(
        cls, rows: ImageRows, max_bytes: int, num_workers: int = 0, skip_bad_images: bool = False
    ) -> CachedRows | None:
        """Run through `rows` once; None when the views would take more than `max_bytes`. Unreadable
        images raise `DataError`, or with `skip_bad_images` are left out."""
        if len(rows) * 3 * rows.image_size**2 > max_bytes:
            return None
        # Same-size images: decoded once, then resized and centre-cropped a whole batch at a time.
        decoded = DecodedImages.decode(
            rows.dataset, rows.image_column, max_bytes, num_workers, skip_bad_images
        )
        if decoded.images is not None:
            views = torch.cat([eval_view(chunk, rows.image_size) for chunk in decoded.images.split(1024)])
            labels = (
                torch.tensor(rows.labels)[decoded.rows]
                if rows.labels is not None
                else torch.full((len(views),), -1, dtype=torch.long)
            )
            return cls(views, labels, decoded.rows)
        loader = torch.utils.data.DataLoader(
            rows,
            batch_size=512,
            num_workers=num_workers,
            collate_fn=ExampleCollator(skip_bad_images),
            prefetch_factor=4 if num_workers else None,
        )
        batches = [b for b in loader if "pixel_values" in b]
        if not batches:
            raise DataError(f"none of the {len(rows)} evaluation images could be read")
        return cls(*(torch.cat([b[k] for b in batches]) for k in ("pixel_values", "labels", "index")))


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
    "CachedRows",
    "DataError",
    "DecodedImages",
    "EpochShuffleSampler",
    "ExampleCollator",
    "ImageRows",
    "StreamingImageRows",
    "split_stream",
    "TwoViewAugmentation",
    "ViewAugmentation",
    "batched_resized_crop",
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
    "resize_weights",
    "resolve_columns",
    "sample_crop_boxes",
    "to_rgb",
]
