"""Decoding: a `datasets` image cell (PIL image, bytes, path) to an 8-bit RGB image or uint8 tensor."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from .geometry import CropBox, apply_crop


def open_image(value: Any) -> Image.Image:
    """A `datasets` image cell (PIL image, `{"bytes", "path"}` dict, path or bytes) as a PIL image, opened
    lazily: only the header is read until its pixels are used."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, Image.Image):
        return value
    raise DataError(f"unsupported image value of type {type(value).__name__}")


def decode_image(value: Any) -> Image.Image:
    """Decode a `datasets` image cell (PIL image, `{"bytes", "path"}` dict, path or bytes) to RGB.

    Handles every PIL mode: L/LA/P/PA (palette transparency is composited on white), RGBA, CMYK, YCbCr,
    and 16/32-bit integer or float images (rescaled to 8 bits from their own range).
    """
    image = open_image(value)
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


def decode_image_tensor(value: Any) -> torch.Tensor:
    """`decode_image` as a (3, H, W) uint8 tensor. Any image of at least one pixel a side is used, however
    small or elongated (300x1, 1x1): a random resized crop can be cut from it and resampled to the training
    size. An image without pixels raises `DataError`."""
    image = TF.pil_to_tensor(decode_image(value))
    if min(image.shape[-2:]) < 1:
        raise DataError(f"image of {image.shape[-1]}x{image.shape[-2]} pixels has no pixels to crop")
    return image


DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at directly (PIL's `draft`)


def read_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a `datasets` image cell (`{"bytes", "path"}`, a path or bytes); None for a PIL
    image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            return f.read()
    return None


def baseline_jpeg(image: Image.Image) -> bool:
    """Whether an opened image is a JPEG that libjpeg decodes to RGB directly (YCbCr or grayscale, not
    CMYK): what `torchvision.io.decode_jpeg` (on the CPU or, with nvJPEG, on a GPU) and DCT scaling serve."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def reduction_for(boxes: tuple[CropBox, ...], size: int) -> int:
    """The largest DCT scaling (8, 4, 2, else 1) at which every box still spans at least `size` pixels a
    side, so that each crop is still downsampled to `size`."""
    smallest = min(min(box.height, box.width) for box in boxes)
    return next((r for r in DCT_SCALES if smallest >= r * size), 1)


def decode_crops(value: Any, image: Image.Image, boxes: tuple[CropBox, ...], size: int) -> list[torch.Tensor]:
    """The (3, size, size) uint8 crops of a `datasets` image cell for `boxes` (drawn from its header:
    `image` is the cell opened lazily by `open_image`), decoding no more than the crops need:

    - a JPEG whose boxes all span at least twice `size` pixels is decoded at 1/2, 1/4 or 1/8 of its size
      (libjpeg's DCT scaling, through PIL's `draft`: decoding costs about the square of the reduction less),
      and each box, mapped exactly (in fractional pixels) onto the reduced image, is resized from there with
      PIL's antialiased bicubic filter. The filter changes: the DCT scaling averages each 2x2 (4x4, 8x8)
      block before the bicubic resize, so the crops differ slightly from those of a full decode (bench/jpeg.py
      and tests/test_data_jpeg.py give the difference);
    - any other JPEG in YCbCr or grayscale is decoded at full size by `torchvision.io.decode_jpeg` (the same
      libjpeg-turbo pixels as PIL's, without PIL's copy into a tensor), other images by `decode_image`; the
      crops are then `apply_crop`'s.
    """
    width, height = image.size
    if min(width, height) < 1:
        raise DataError(f"image of {width}x{height} pixels has no pixels to crop")
    reduction = reduction_for(boxes, size)
    if reduction > 1 and baseline_jpeg(image):
        image.draft(image.mode, (width // reduction, height // reduction))
        reduced = to_rgb(image)
        sx, sy = reduced.width / width, reduced.height / height
        views = []
        for box in boxes:
            region = (box.left * sx, box.top * sy, (box.left + box.width) * sx, (box.top + box.height) * sy)
            view = TF.pil_to_tensor(reduced.resize((size, size), Image.Resampling.BICUBIC, box=region))
            views.append(TF.horizontal_flip(view) if box.flip else view)
        return views
    data = read_bytes(value) if baseline_jpeg(image) else None
    if data is not None:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    else:
        image.load()
        pixels = TF.pil_to_tensor(to_rgb(image))
    return [apply_crop(pixels, box, size) for box in boxes]
