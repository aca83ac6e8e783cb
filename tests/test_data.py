"""The decoded-once training split: batched crops against torchvision's per-image crops, box sampling
against torchvision's RandomResizedCrop, determinism, and when train.py uses it."""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers import SMALL
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from modeling_corinfomax.cli import train
from modeling_corinfomax.data import (
    BUNDLED_DATA_DIR,
    CachedRows,
    DataError,
    DecodedImages,
    ExampleCollator,
    ImageRows,
    TwoViewAugmentation,
    ViewAugmentation,
    batched_resized_crop,
    sample_crop_boxes,
)


def per_image_crops(images, top, left, h, w, flip, size):
    """The per-image path: torchvision's resized_crop (bicubic, antialiased) then a flip."""
    out = []
    for i in range(len(images)):
        box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
        view = TF.resized_crop(images[i], *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.horizontal_flip(view) if flip[i] else view)
    return torch.stack(out)


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    """128 real Fashion-MNIST images as (128, 3, 28, 28) uint8."""
    rows = Dataset.from_parquet(str(BUNDLED_DATA_DIR / "test.parquet")).select(range(128))
    return torch.stack([TF.pil_to_tensor(row["image"].convert("RGB")) for row in rows])


@pytest.mark.parametrize(
    "source, size",
    [
        ((28, 28), 28),  # the demo: crops are upsampled back to the image size
        ((28, 28), 20),  # downsampled: the antialiasing filter widens
        ((40, 30), 32),  # non-square sources, both directions
        ((18, 26), 32),
    ],
)
def test_batched_crops_equal_torchvision_per_image_crops(source, size, fashion):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (64, 3, *source), dtype=torch.uint8, generator=generator)
    real = TF.resize(fashion[:64], list(source), antialias=True) if source != (28, 28) else fashion[:64]
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


def decoded(images: torch.Tensor, seed: int = 0) -> DecodedImages:
    augmentation = TwoViewAugmentation(ViewAugmentation(crop_scale=(0.2, 1.0)), ViewAugmentation(flip_p=0.0))
    return DecodedImages(images, 24, augmentation, seed)


def test_decoded_batches_are_a_function_of_seed_epoch_and_indices(fashion):
    rows = decoded(fashion)
    batch = rows.collate([5, 3, 9, 40])
    assert batch["view1"].shape == batch["view2"].shape == (4, 3, 24, 24)
    assert batch["view1"].dtype == torch.uint8 and batch["index"].tolist() == [5, 3, 9, 40]
    assert torch.equal(batch["view1"], decoded(fashion).collate([5, 3, 9, 40])["view1"])  # resumable
    assert not torch.equal(batch["view1"], batch["view2"])  # two different views
    rows.set_epoch(1)
    assert not torch.equal(batch["view1"], rows.collate([5, 3, 9, 40])["view1"])  # new views each epoch
    assert not torch.equal(batch["view1"], decoded(fashion, seed=1).collate([5, 3, 9, 40])["view1"])


def test_decoded_batches_have_the_keys_and_types_of_per_image_batches(fashion, tmp_path):
    dataset = Dataset.from_dict({"image": [Image.fromarray(x[0].numpy()) for x in fashion[:8]]})
    dataset = dataset.cast_column("image", ImageFeature())
    per_image = ExampleCollator()([ImageRows(dataset, "image", None, 24)[i] for i in range(4)])
    batched = decoded(fashion[:8]).collate([0, 1, 2, 3])
    assert set(per_image) == set(batched)
    for key in per_image:
        if isinstance(per_image[key], torch.Tensor):
            assert per_image[key].dtype == batched[key].dtype and per_image[key].shape == batched[key].shape


def image_dataset(sizes, bad: int | None = None) -> Dataset:
    rng = np.random.default_rng(0)
    cells = []
    for i, (h, w) in enumerate(sizes):
        if i == bad:
            cells.append({"bytes": b"not an image", "path": "broken.png"})
        else:
            buffer = io.BytesIO()  # grayscale PNGs: decoded to RGB
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(buffer, format="PNG")
            cells.append({"bytes": buffer.getvalue(), "path": f"{i}.png"})
    return Dataset.from_dict({"image": cells}).cast_column("image", ImageFeature())


def test_decode_makes_one_rgb_tensor_or_says_why_not():
    images, rows, bad, message = DecodedImages.decode(image_dataset([(12, 10)] * 6), "image", 2**20)
    assert images.shape == (6, 3, 12, 10) and images.dtype == torch.uint8 and bad == []
    assert rows.tolist() == list(range(6))
    assert "decoded 6 images of 10x12 px" in message
    images, _, _, message = DecodedImages.decode(image_dataset([(12, 10)] * 5 + [(8, 8)]), "image", 2**20)
    assert images is None and "images differ in size" in message
    images, _, _, message = DecodedImages.decode(image_dataset([(12, 10)] * 6), "image", 1000)
    assert images is None and "over the" in message and "GiB limit" in message


def test_decode_refuses_or_skips_unreadable_images():
    dataset = image_dataset([(12, 10)] * 6, bad=2)
    with pytest.raises(DataError, match="could not read 1 image.*broken.png.*--skip_bad_images"):
        DecodedImages.decode(dataset, "image", 2**20)
    images, rows, bad, _ = DecodedImages.decode(dataset, "image", 2**20, skip_bad_images=True)
    assert len(images) == 5 and len(bad) == 1 and "broken.png" in bad[0]
    assert rows.tolist() == [0, 1, 3, 4, 5]
    # Evaluation rows made from the decoded images keep each image's own label.
    cached = CachedRows.build(
        ImageRows(dataset, "image", None, 8, mode="eval", labels=[10, 11, 12, 13, 14, 15]),
        2**20,
        skip_bad_images=True,
    )
    assert cached.labels == [10, 11, 13, 14, 15] and cached.index.tolist() == [0, 1, 3, 4, 5]


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        side = 32 if i % 4 else 40
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_train_uses_the_cache_when_it_can_and_falls_back_or_refuses_when_not(mixed_sizes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="corinfomax.train")
    # (one AcceleratorState per process: the same precision as the other in-process runs of the suite)
    flags = [*SMALL, "--max_train_steps", "1", "--image_size", "32", "--mixed_precision", "no"]
    flags = [f for f in flags if f not in ("--max_train_samples", "256")]
    results = train.main([*flags, "--train_dir", str(mixed_sizes), "--output_dir", str(tmp_path / "a")])
    assert results["global_step"] == 1
    assert any("images differ in size" in r.getMessage() for r in caplog.records)  # fell back, and said so
    with pytest.raises(SystemExit, match="--image_cache on: images differ in size.*--image_cache auto"):
        train.main(
            [
                *flags,
                "--train_dir",
                str(mixed_sizes),
                "--image_cache",
                "on",
                "--output_dir",
                str(tmp_path / "b"),
            ]
        )
    caplog.clear()
    results = train.main(
        [*flags, "--max_train_samples", "256", "--output_dir", str(tmp_path / "c")]
    )  # bundled
    assert results["global_step"] == 1
    assert any("crops are made a batch at a time" in r.getMessage() for r in caplog.records)


def test_bad_image_cache_flags_are_refused():
    with pytest.raises(SystemExit, match="--image_cache_max_gb must be > 0"):
        train.parse_args(["--image_cache_max_gb", "0"])
    with pytest.raises(SystemExit, match="cannot be used with --streaming"):
        train.parse_args(["--image_cache", "on", "--streaming", "--max_train_steps", "2"])


def test_sample_crop_boxes_are_reproducible_on_the_generator_device():
    a = sample_crop_boxes(16, 28, 28, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    b = sample_crop_boxes(16, 28, 28, (0.4, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    area = (a[2] * a[3]).double() / 28**2
    assert area.min() >= 0.4 * 0.9 and area.max() <= 1.0 and math.isfinite(area.mean().item())


@pytest.mark.parametrize("same_size", [True, False])  # batched resize of decoded images, or per image
def test_cached_evaluation_rows_equal_the_rows_they_were_made_from(same_size, fashion):
    images = [Image.fromarray(x[0].numpy()) for x in fashion[:40]]
    if not same_size:
        images[5] = images[5].resize((30, 30))
    dataset = Dataset.from_dict({"image": images}).cast_column("image", ImageFeature())
    rows = ImageRows(dataset, "image", None, 24, mode="eval", labels=list(range(40)))
    cached = CachedRows.build(rows, max_bytes=2**20)
    assert len(cached) == len(rows) == 40
    for i in (0, 5, 17, 39):
        expected, got = rows[i], cached[i]
        assert got["labels"] == expected["labels"] == i and got["index"] == expected["index"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert CachedRows.build(rows, max_bytes=40 * 3 * 24 * 24 - 1) is None  # over the memory limit


def test_evaluation_splits_are_cached_on_first_use_unless_the_cache_is_off(fashion):
    dataset = Dataset.from_dict({"image": [Image.fromarray(x[0].numpy()) for x in fashion[:8]]})
    dataset = dataset.cast_column("image", ImageFeature())
    loader_kwargs = {"num_workers": 0, "collate_fn": ExampleCollator(), "pin_memory": False}
    for cache, kind in (("auto", CachedRows), ("off", ImageRows)):
        args = train.parse_args(["--image_cache", cache])
        eval_rows = {"test": ImageRows(dataset, "image", None, 28, mode="eval", labels=[0] * 8)}
        assert isinstance(train.eval_split(eval_rows, "test", args, loader_kwargs), kind)
        assert isinstance(eval_rows["test"], kind)


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({}, [], "4 per process (4 cores / 1 process(es) on this machine"),  # nothing asked: every core
        ({"OMP_NUM_THREADS": "1"}, [], "1 per process (OMP_NUM_THREADS"),  # the user's own setting
        ({"OMP_NUM_THREADS": "3"}, ["--num_threads", "2"], "2 per process (--num_threads"),  # the flag wins
    ],
)
def test_a_cpu_run_uses_every_core_unless_asked_otherwise(
    env, flags, expected, tmp_path, caplog, monkeypatch
):
    # `accelerate launch` sets OMP_NUM_THREADS=1 by default: the demo then ran at half speed, silently.
    caplog.set_level(logging.INFO, logger="corinfomax.train")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = [*SMALL, "--max_train_steps", "1", "--mixed_precision", "no", "--output_dir", str(tmp_path / "run")]
    threads = torch.get_num_threads()
    try:
        train.main([*run, *flags])
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU threads:")]
    assert message.startswith(f"CPU threads: {expected}") and chosen == int(expected.split()[0])


# ----------------------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def streamed_rows(tmp_path_factory):
    """`make(shards)`: a streaming dataset of 203 tiny images with an `id` column, in `shards` parquet files."""
    from datasets import load_dataset

    root = tmp_path_factory.mktemp("stream")
    image = png_bytes_of(np.full((6, 6, 3), 128, np.uint8))

    def make(shards: int):
        folder = root / f"shards_{shards}"
        if not folder.exists():
            ids = np.array_split(np.arange(203), shards)
            for k, part in enumerate(ids):
                Dataset.from_dict(
                    {"image": [{"bytes": image, "path": None}] * len(part), "id": part.tolist()},
                    features=None,
                ).cast_column("image", ImageFeature()).to_parquet(str(folder / f"part-{k}.parquet"))
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        return load_dataset("parquet", data_files={"train": files}, streaming=True)["train"]

    return make


def png_bytes_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# (shards, processes, DataLoader workers): more workers than shards, as many, and several processes.
STREAM_CASES = [(1, 1, 0), (1, 1, 2), (4, 1, 4), (1, 2, 2), (4, 2, 2)]


@pytest.mark.parametrize(("shards", "processes", "workers"), STREAM_CASES)
def test_streaming_delivers_every_row_exactly_once_per_pass(streamed_rows, shards, processes, workers):
    from modeling_corinfomax.data import StreamingImageRows, split_stream

    passes = 2 if workers == 2 else 1  # the second pass is shuffled differently, and still complete
    delivered = [[] for _ in range(passes)]
    for rank in range(processes):
        part, usable_workers = split_stream(streamed_rows(shards), rank, processes, workers)
        rows = StreamingImageRows(part, image_column="image", label_column="id", image_size=4, stream_id=rank)
        loader = torch.utils.data.DataLoader(
            rows, batch_size=8, num_workers=usable_workers, collate_fn=ExampleCollator()
        )
        for epoch in range(passes):
            rows.set_epoch(epoch)
            delivered[epoch] += [int(i) for batch in loader for i in batch["labels"]]
    for rows_of_pass in delivered:
        assert sorted(rows_of_pass) == list(range(203))
