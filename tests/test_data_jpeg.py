"""The per-image JPEG path: crop boxes drawn from the header, reduced-scale decoding (libjpeg's DCT
scaling) against the full decode, and decoding on the training device (`--decode_on_device`) against the
workers' crops. Real photographs come from Debian's `mate-backgrounds` (.ci/run installs it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from modeling_corinfomax.data import (
    ExampleCollator,
    ImageViewDataset,
    TwoViewAugmentation,
    apply_crop,
    batch_crops,
    decode_crops,
    decode_image_tensor,
    load_image_dataset,
    open_image,
    reduction_for,
)
from modeling_corinfomax.data.augmentation import derive_seed

PHOTOS = Path("/usr/share/backgrounds/mate/nature")
needs_photos = pytest.mark.skipif(
    not PHOTOS.is_dir(), reason="Debian's mate-backgrounds (real photographs) is not installed"
)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Six real photographs as JPEGs of 900-1,200 px a side (quality 90)."""
    if not PHOTOS.is_dir():
        pytest.skip("Debian's mate-backgrounds (real photographs) is not installed")
    out = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:6]:
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            out.append(jpeg_bytes(photo.resize((1200, round(1200 * photo.height / photo.width)))))
    return out


def test_boxes_come_from_the_header_and_are_the_crops_of_the_full_image(fashion_uint8):
    augmentation, image = TwoViewAugmentation(), fashion_uint8[0]
    boxes = augmentation.draw_crops(28, 28, seed=7)
    views = augmentation.crop_views(image, 20, seed=7)
    for box, view in zip(boxes, views, strict=True):
        assert torch.equal(apply_crop(image, box, 20), view)
    assert augmentation.draw_crops(28, 28, seed=8) != boxes  # the seed decides


@needs_photos
def test_reduced_scale_decoding_stays_within_tolerance_of_the_full_decode(photos):
    # At 64 px every pair of boxes of a 1,200 px photo allows a 1/2, 1/4 or 1/8 decode (both boxes span
    # >= 128 px), at 400 px few do. The boxes are mapped exactly onto the reduced pixels; the filter differs (DCT-domain block
    # averaging before the bicubic resize). Tolerance over the reduced decodes' views, of 255: mean |diff|
    # <= 1.5 and 99th percentile <= 12 (measured on these photos: 1.07 and 9).
    augmentation, diffs, reductions = TwoViewAugmentation(), [], []
    for i, data in enumerate(photos * 4):
        size = (64, 160, 400)[i % 3]
        full = decode_image_tensor(data)
        boxes = augmentation.draw_crops(full.shape[-2], full.shape[-1], seed=i)
        reduction = reduction_for(boxes, size)
        smallest = min(min(b.height, b.width) for b in boxes)
        if reduction > 1:  # never a reduction that would upsample a crop, and the largest one allowed
            assert smallest >= reduction * size and (reduction == 8 or smallest < 2 * reduction * size)
        else:
            assert smallest < 2 * size
        reductions.append(reduction)
        views = decode_crops(data, open_image(data), boxes, size)
        for box, view in zip(boxes, views, strict=True):
            difference = (view.float() - apply_crop(full, box, size).float()).abs()
            if reduction == 1:
                assert difference.max() == 0  # a full decode (torchvision's) gives the same pixels as PIL's
            else:
                diffs.append(difference.flatten())
    assert {2, 4, 8} & set(reductions) and 1 in reductions, reductions  # both paths were exercised
    d = torch.cat(diffs)
    assert d.mean() <= 1.5 and d.kthvalue(int(0.99 * d.numel())).values <= 12, (d.mean(), d.max())


def test_no_reduction_for_png_or_for_boxes_that_would_be_upsampled(fashion_uint8):
    big = Image.fromarray(fashion_uint8[0, 0].numpy()).resize((600, 600)).convert("RGB")
    augmentation = TwoViewAugmentation()
    boxes = augmentation.draw_crops(600, 600, seed=3)
    png = io.BytesIO()
    big.save(png, format="PNG")
    full = TF.pil_to_tensor(big)
    for data, size in ((png.getvalue(), 32), (jpeg_bytes(big), 600)):  # PNG; any reduction would upsample
        image = open_image(data)
        views = decode_crops(data, image, boxes, size)
        pixels = full if image.format == "PNG" else decode_image_tensor(data)
        assert all(torch.equal(v, apply_crop(pixels, b, size)) for v, b in zip(views, boxes, strict=True))
    assert reduction_for(boxes, 600) == 1


@needs_photos
def test_the_views_keep_their_seeded_resumable_draw(photos, tmp_path):
    folder = tmp_path / "train" / "photos"
    folder.mkdir(parents=True)
    for i, data in enumerate(photos):
        (folder / f"{i}.jpg").write_bytes(data)
    dataset = load_image_dataset(None, None, str(tmp_path), "train", False, None)
    rows = ImageViewDataset(dataset, "image", None, 64, seed=5)
    rows.set_epoch(2)
    first = [rows[i] for i in range(len(rows))]
    resumed = ImageViewDataset(dataset, "image", None, 64, seed=5)  # a new process after a resume
    resumed.set_epoch(2)
    for i, example in enumerate(first):
        again = resumed[i]
        assert torch.equal(example["view1"], again["view1"]) and torch.equal(example["view2"], again["view2"])
        full = decode_image_tensor(dataset[i]["image"])  # the boxes are the full image's, seeded per row
        boxes = rows.augmentation.draw_crops(full.shape[-2], full.shape[-1], derive_seed(5, 2, i))
        reference = apply_crop(full, boxes[0], 64).float()
        assert (example["view1"].float() - reference).abs().mean() < 4
    rows.set_epoch(3)
    assert not torch.equal(rows[0]["view1"], first[0]["view1"])  # a new epoch draws new crops


def test_decoding_on_the_device_gives_the_workers_crops_in_row_order(fashion_uint8, tmp_path):
    # Mixed sizes, a grayscale JPEG and a PNG (decoded by the worker, not the device), at sizes where no
    # reduced decode applies, so both paths decode the same pixels: equal to within the batched crop's 2/255.
    folder = tmp_path / "train" / "mixed"
    folder.mkdir(parents=True)
    for i in range(12):
        image = Image.fromarray(fashion_uint8[i, 0].numpy()).resize((90 + 7 * i, 120 - 3 * i))
        if i == 4:
            image.save(folder / f"{i:02d}.png")
        elif i == 7:
            image.save(folder / f"{i:02d}.jpg", quality=90)  # grayscale JPEG
        else:
            image.convert("RGB").save(folder / f"{i:02d}.jpg", quality=90)
    dataset = load_image_dataset(None, None, str(tmp_path), "train", False, None)
    host = ImageViewDataset(dataset, "image", None, 48, seed=1)
    device = ImageViewDataset(dataset, "image", None, 48, seed=1, mode="jpeg_bytes")
    collate = ExampleCollator()
    host_batch = collate([host[i] for i in range(len(host))])
    device_batch = collate([device[i] for i in range(len(device))])
    assert len(device_batch["jpeg"]) == 11 and device_batch["host_rows"].tolist() == [4]
    view1, view2 = batch_crops(device_batch, 48, "cpu")
    for ours, theirs in ((view1, host_batch["view1"]), (view2, host_batch["view2"])):
        assert ours.shape == theirs.shape == (12, 3, 48, 48)
        assert (ours.int() - theirs.int()).abs().max() <= 2
    assert torch.equal(device_batch["index"], host_batch["index"])


def test_a_broken_jpeg_on_the_device_path_is_reported_by_the_worker(tmp_path):
    folder = tmp_path / "train" / "broken"
    folder.mkdir(parents=True)
    (folder / "bad.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "good.jpg")
    dataset = load_image_dataset(None, None, str(tmp_path), "train", False, None)
    rows = ImageViewDataset(dataset, "image", None, 32, mode="jpeg_bytes")
    examples = [rows[i] for i in range(len(rows))]
    assert sum("error" in e for e in examples) == 1
    batch = ExampleCollator(skip_bad_images=True)(examples)
    assert len(batch["bad_images"]) == 1 and "bad.jpg" in batch["bad_images"][0]
    view1, _ = batch_crops(batch, 32, "cpu")
    assert view1.shape == (1, 3, 32, 32) and view1[0, 0].float().mean() > 150  # the red image
