"""Crop geometry (modeling_corinfomax.data.geometry): batched crops against torchvision's per-image
crops, and box sampling against torchvision's RandomResizedCrop."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from modeling_corinfomax.data import batched_resized_crop, sample_crop_boxes


def per_image_crops(images, top, left, h, w, flip, size):
    """The per-image path: torchvision's resized_crop (bicubic, antialiased) then a flip."""
    out = []
    for i in range(len(images)):
        box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
        view = TF.resized_crop(images[i], *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.horizontal_flip(view) if flip[i] else view)
    return torch.stack(out)


@pytest.mark.parametrize(
    "source, size",
    [
        ((28, 28), 28),  # the demo: crops are upsampled back to the image size
        ((28, 28), 20),  # downsampled: the antialiasing filter widens
        ((40, 30), 32),  # non-square sources, both directions
        ((18, 26), 32),
    ],
)
def test_batched_crops_equal_torchvision_per_image_crops(source, size, fashion_uint8):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (64, 3, *source), dtype=torch.uint8, generator=generator)
    fashion = fashion_uint8[:64]
    real = TF.resize(fashion, list(source), antialias=True) if source != (28, 28) else fashion
    for images in (noise, real):  # noise is the hardest case for the 8-bit rounding between the passes
        boxes = sample_crop_boxes(len(images), *source, (0.08, 1.0), (3 / 4, 4 / 3), generator)
        flip = torch.rand(len(images), generator=generator) < 0.5
        ours = batched_resized_crop(images, *boxes, flip, size).int()
        reference = per_image_crops(images, *boxes, flip, size).int()
        difference = (ours - reference).abs()
        # PyTorch's uint8 kernel uses fixed-point weights: a few values differ by one or two levels.
        assert difference.max() <= 2 and (difference > 0).float().mean() < 0.02


def test_crop_boxes_follow_torchvision_random_resized_crop():
    n, height, width, scale, ratio = 4000, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(0))
    assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h > 0) & (w > 0)).all()
    torch.manual_seed(0)
    theirs = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
            for _ in range(n)
        ]
    )

    def stats(t, l, hh, ww):  # noqa: E741
        area, aspect = (hh * ww).double() / (height * width), (ww / hh).double().log()
        centre = (t + hh / 2).double() / height
        return torch.stack(
            [area.mean(), area.std(), aspect.mean(), aspect.std(), centre.mean(), centre.std()]
        )

    ours_stats, their_stats = stats(top, left, h, w), stats(*theirs.unbind(1))
    # Same distribution: the statistics of 4000 draws agree to within ~4 standard errors.
    assert torch.allclose(ours_stats, their_stats, atol=0.02), (ours_stats, their_stats)


def test_impossible_aspect_ratios_fall_back_to_the_centre_crop_like_torchvision():
    # A 100x10 strip at scale (0.9, 1) and ratio (3/4, 4/3): no try fits, so the largest centred box
    # of the allowed ratio is used, as torchvision does.
    generator = torch.Generator().manual_seed(0)
    top, left, h, w = sample_crop_boxes(8, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3), generator)
    expected = RandomResizedCrop.get_params(torch.empty(1, 10, 100), [0.9, 1.0], [3 / 4, 4 / 3])
    assert {(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(top, left, h, w)} == {expected}


def test_sample_crop_boxes_are_reproducible_on_the_generator_device():
    a = sample_crop_boxes(16, 28, 28, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    b = sample_crop_boxes(16, 28, 28, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    area = (a[2] * a[3]).double() / 28**2
    assert area.min() >= 0.4 * 0.9 and area.max() <= 1.0 and math.isfinite(area.mean().item())
