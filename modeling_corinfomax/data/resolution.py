"""The training resolution from the images themselves: train.py's rule when neither a flag, a `--config` file
nor a `--preset` sets `--image_size`.

The rule looks only at pixel sizes, never at what the data set is:

- read the sizes of `SAMPLE_SIZE` images spread evenly over the split (a stream's first ones) from their
  file headers (nothing is decoded), and take the median short side `s`;
- photo-sized images (`s >= PHOTO_RESOLUTION`) train at `PHOTO_RESOLUTION` (224, the resolution every
  ImageNet-pretrained backbone and the paper's ImageNet runs use);
- smaller images train at their own short side, but never below
  `min_resolution(cifar_stem)`: 1.25x the backbone's output stride (32 for a standard ResNet stem, so 40 px;
  8 with `--cifar_stem`, so 10 px), so that tiny images are upsampled far enough that the last stage keeps
  a 2x2 map. At 28 px a standard stem leaves the last stage a 1x1 map, where its 3x3 convolutions see only
  their centre tap (the demo study in bench/RESULTS.md: 40 px was the lever, +1.3 linear points).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from .decoding import open_image
from .sources import undecoded_columns

SAMPLE_SIZE = 64
PHOTO_RESOLUTION = 224
STANDARD_STRIDE, CIFAR_STEM_STRIDE = 32, 8  # a ResNet/ConvNeXt-style backbone's output stride


def min_resolution(cifar_stem: bool = False) -> int:
    """The smallest training resolution the rule picks: 1.25x the output stride (a 2x2 last-stage map)."""
    return (CIFAR_STEM_STRIDE if cifar_stem else STANDARD_STRIDE) * 5 // 4


@dataclass(frozen=True)
class ResolutionChoice:
    """The sizes seen and the resolution picked from them (`describe` is train.py's log line)."""

    image_size: int
    sizes: tuple[tuple[int, int], ...]  # (width, height) of each sampled image that could be read
    unreadable: int

    @property
    def median_short_side(self) -> float:
        return statistics.median(min(size) for size in self.sizes)

    def describe(self) -> str:
        widths, heights = [w for w, _ in self.sizes], [h for _, h in self.sizes]
        if len(set(self.sizes)) == 1:
            shape = f"all {widths[0]}x{heights[0]} px"
        else:
            shape = f"{min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px (median short side {self.median_short_side:g})"
        skipped = f" ({self.unreadable} unreadable)" if self.unreadable else ""
        return f"{len(self.sizes)} sampled images{skipped}: {shape} -> image_size {self.image_size}"


def resolution_for(sizes, cifar_stem: bool = False) -> int:
    """The rule (module docstring) applied to `(width, height)` sizes."""
    short = statistics.median(min(size) for size in sizes)
    if short >= PHOTO_RESOLUTION:
        return PHOTO_RESOLUTION
    return max(min_resolution(cifar_stem), int(short))


def cell_size(value: Any) -> tuple[int, int]:
    """(width, height) of a `datasets` image cell, from the file header where there is a file."""
    if isinstance(value, np.ndarray) or hasattr(value, "shape"):  # (H, W) or (H, W, C) arrays
        return int(value.shape[1]), int(value.shape[0])
    return open_image(value).size


def sample_rows(dataset, n: int):
    """`n` rows spread evenly over a split, or the first `n` of a stream."""
    if not hasattr(dataset, "__len__"):
        return dataset.take(n)
    if len(dataset) <= n:
        return dataset
    return dataset.select(np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


def choose_resolution(
    dataset, image_column: str, cifar_stem: bool = False, n: int = SAMPLE_SIZE
) -> ResolutionChoice:
    """Read the sizes of `n` images of `dataset` (undecoded where the column allows) and apply the rule.

    Raises `DataError` when none of the sampled images can be read.
    """
    sizes, unreadable = [], 0
    for row in sample_rows(undecoded_columns(dataset, image_column, None), n):
        try:
            sizes.append(cell_size(row[image_column]))
        except (OSError, ValueError, DataError):
            unreadable += 1
    if not sizes:
        raise DataError(
            f"none of the {unreadable} sampled images could be read to choose the training resolution: check "
            "the files and --image_column, or set --image_size."
        )
    return ResolutionChoice(resolution_for(sizes, cifar_stem), tuple(sizes), unreadable)


__all__ = [
    "PHOTO_RESOLUTION",
    "ResolutionChoice",
    "choose_resolution",
    "min_resolution",
    "resolution_for",
]
