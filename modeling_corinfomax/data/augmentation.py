"""The paper's asymmetric two-view augmentation (BYOL/VICReg): its settings, the crops of both views,
the seeds of their random draws, and the per-batch colour, blur and solarisation on the training device.

Every random draw is a function of `(seed, epoch, sample index)` or `(seed, epoch, batch)` (the crops:
`derive_seed`) or of `(seed, step, rank)` (the generator the training step gives `BatchViewAugment`), so
an interrupted and resumed run sees exactly the same views.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .colour import grayscale, hsv_to_rgb, rgb_to_hsv
from .geometry import CROP_RATIO, CropBox, apply_crop, batched_resized_crop, draw_crop, sample_crop_boxes


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from a few integers, e.g. `(seed, epoch, index)` (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


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
    """The two views' augmentations; the default is the paper's asymmetric pipeline.

    The crops and flips are made here, before batching (`crop_views` per image, `batched_crop_views`
    per batch of same-size images); the rest of each view's augmentation is its `BatchViewAugment`.
    """

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

    def draw_crops(self, height: int, width: int, seed: int) -> tuple[CropBox, CropBox]:
        """Both views' crop boxes and flips for an image of `height` x `width` pixels, drawn from a
        generator seeded with `seed`, view 1's draws first. Only the image's size is needed, so a file's
        header decides the boxes before its pixels are decoded (`decoding.decode_for_crops`)."""
        generator = torch.Generator().manual_seed(seed)
        view1 = draw_crop(height, width, self.view1.crop_scale, self.view1.flip_p, generator)
        view2 = draw_crop(height, width, self.view2.crop_scale, self.view2.flip_p, generator)
        return view1, view2

    def crop_views(self, image: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of one (3, H, W) uint8 image: random resized crop (bicubic, antialiased) to
        (3, size, size) and flip, the boxes of `draw_crops`."""
        box1, box2 = self.draw_crops(image.shape[-2], image.shape[-1], seed)
        return apply_crop(image, box1, size), apply_crop(image, box2, size)

    def batched_crop_views(
        self, images: torch.Tensor, size: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of a batch of same-size (B, 3, H, W) uint8 images, each image cropped to its own
        box: the crops and flips of `crop_views` (same distributions, to within 2/255 the same
        resampling), drawn for the whole batch from a generator seeded with `seed`, view 1's first."""
        generator = torch.Generator().manual_seed(seed)  # on the host wherever the images are
        n, (height, width) = len(images), images.shape[-2:]
        views = []
        for aug in (self.view1, self.view2):
            boxes = sample_crop_boxes(n, height, width, aug.crop_scale, CROP_RATIO, generator)
            flip = torch.rand(n, generator=generator) < aug.flip_p
            boxes, flip = [b.to(images.device) for b in boxes], flip.to(images.device)
            views.append(batched_resized_crop(images, *boxes, flip, size))
        return views[0], views[1]


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
                mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (f * x + (1 - f) * mean).clamp_(0, 1)
            elif op == 2 and aug.saturation > 0:
                x = (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)
            elif op == 3 and aug.hue > 0:
                hsv = rgb_to_hsv(x)
                hsv = torch.cat([(hsv[:, :1] + f.view(b, 1, 1, 1)) % 1.0, hsv[:, 1:]], 1)
                x = torch.where(jitter.view(b, 1, 1, 1), hsv_to_rgb(hsv), x)
        x = torch.where(coin(aug.grayscale_p).view(b, 1, 1, 1), grayscale(x).expand_as(x), x)
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
