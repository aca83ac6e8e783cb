"""Decoding: a `datasets` image cell (PIL image, bytes, path) to an 8-bit RGB image or uint8 tensor."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError


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
