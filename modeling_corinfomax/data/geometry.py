"""Crop geometry: torchvision's RandomResizedCrop and the evaluation resize + centre crop, per image
(`draw_crop` + `apply_crop` = `crop_view`, `eval_view`) and for a whole batch of same-size images at once (`sample_crop_boxes`,
`batched_resized_crop`: antialiased bicubic resampling as two matrix products)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..configuration_corinfomax import eval_resize_size

CROP_RATIO = (3 / 4, 4 / 3)  # the aspect ratios of RandomResizedCrop's default


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


class CropBox(NamedTuple):
    """One view's random resized crop of an image: the box in its pixels, and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_crop(height: int, width: int, scale, flip_p: float, generator: torch.Generator) -> CropBox:
    """A random resized crop's box (area fraction in `scale`, RandomResizedCrop's aspect ratios) of an
    image of `height` x `width` pixels, then its horizontal flip (probability `flip_p`), drawn from
    `generator` in that order. It needs the image's size only, not its pixels."""
    top, left, h, w = random_resized_crop_params(height, width, scale, CROP_RATIO, generator)
    return CropBox(top, left, h, w, torch.rand(1, generator=generator).item() < flip_p)


def apply_crop(image: torch.Tensor, box: CropBox, size: int) -> torch.Tensor:
    """Cut `box` out of a (3, H, W) uint8 image, resize it to `size` x `size` (bicubic, antialiased) and
    flip it if the box says so."""
    view = TF.resized_crop(
        image,
        box.top,
        box.left,
        box.height,
        box.width,
        [size, size],
        InterpolationMode.BICUBIC,
        antialias=True,
    )
    return TF.horizontal_flip(view) if box.flip else view


def crop_view(
    image: torch.Tensor, size: int, scale, flip_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop (area fraction in `scale`, bicubic, antialiased) to `size` x `size`, then a
    horizontal flip with probability `flip_p`, of a (3, H, W) uint8 image; all draws from `generator`."""
    return apply_crop(image, draw_crop(image.shape[-2], image.shape[-1], scale, flip_p, generator), size)


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Un-augmented evaluation view: resize the short side to size*8/7 (bicubic), centre-crop `size`."""
    resized = TF.resize(image, [eval_resize_size(size)], InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


# ---------------------------------------------------------------------------------------------------
# A batch of same-size images: every image cropped to its own box, in two matrix products


def _bicubic_aa(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    # Keys' cubic with a = -0.5: the kernel of PIL's and PyTorch's antialiased bicubic resampling.
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, far.masked_fill_(x >= 2, 0.0))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Per-sample matrices (B, out_size, in_size) that resample the window `[start, start + length)` of
    an axis of `in_size` pixels to `out_size` pixels, as `F.interpolate(mode="bicubic", antialias=True)`
    does for the cropped window (the filter widens by the downscaling factor; each row sums to 1).
    float32 throughout: positions are small integers and halves, exact in float32."""
    start, length = start.float(), length.float()
    scale = (length / out_size)[:, None, None]
    widen = scale.clamp(min=1.0)
    center = scale * (torch.arange(out_size, dtype=torch.float32, device=start.device)[None, :, None] + 0.5)
    first = (center - 2.0 * widen + 0.5).floor().clamp_(min=0.0)
    end = torch.minimum((center + 2.0 * widen + 0.5).floor(), length[:, None, None])
    j = torch.arange(in_size, dtype=torch.float32, device=start.device)[None, None, :] - start[:, None, None]
    weights = _bicubic_aa((j - center + 0.5) / widen)
    weights = weights.masked_fill_((j < first) | (j >= end), 0.0)
    return weights / weights.sum(-1, keepdim=True)


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
    then `TF.horizontal_flip` per image, as two batched matrix products (equal to within 2/255: PyTorch's
    uint8 kernel uses fixed-point weights)."""
    rows = resize_weights(top, h, images.shape[-2], size)  # (B, size, H)
    cols = resize_weights(left, w, images.shape[-1], size)  # (B, size, W)
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    # Horizontal pass, rounded to 8 bits, then vertical: the order and rounding of PyTorch's (and PIL's)
    # uint8 kernel, which the per-image path uses; a float-only pass differs by up to ~10/255 at edges.
    x = (images.float() @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # (B, 3, H, size)
    x = rows.unsqueeze(1) @ x  # (B, 3, size, size)
    return x.round_().clamp_(0, 255).to(torch.uint8)
