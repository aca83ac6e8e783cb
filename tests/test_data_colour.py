"""data.colour against independent computations: Python's colorsys for HSV and PIL's "L" conversion."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image

from modeling_corinfomax.data import grayscale, hsv_to_rgb, rgb_to_hsv


def test_hsv_matches_colorsys_and_round_trips():
    pixels = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels[0, :, 0, 0] = 0.5  # a grey pixel: hue and saturation 0
    pixels[0, :, 0, 1] = 0.0  # black
    hsv = rgb_to_hsv(pixels)
    expected = [colorsys.rgb_to_hsv(*pixels[0, :, i, j].tolist()) for i in range(8) for j in range(8)]
    assert torch.allclose(hsv[0].permute(1, 2, 0).reshape(-1, 3), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(hsv_to_rgb(hsv), pixels, atol=1e-6)


def test_grayscale_is_pils_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    ours = grayscale(torch.from_numpy(rgb).permute(2, 0, 1)[None].double())[0, 0].numpy()
    assert np.abs(ours - pil).max() <= 0.5 + 1e-9  # PIL rounds to 8 bits
