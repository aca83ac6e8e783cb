"""The PyTorch datasets (modeling_corinfomax.data.datasets): the decoded-once training split and its
batched crops, the in-memory evaluation views, and a stream read by several processes and workers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from modeling_corinfomax.data import (
    DataError,
    ExampleCollator,
    ImageViewDataset,
    InMemoryEvalDataset,
    InMemoryTwoViewDataset,
    IterableImageViewDataset,
    TwoViewAugmentation,
    ViewAugmentation,
    decode_split,
    split_stream,
)


def decoded(images: torch.Tensor, seed: int = 0) -> InMemoryTwoViewDataset:
    augmentation = TwoViewAugmentation(ViewAugmentation(crop_scale=(0.2, 1.0)), ViewAugmentation(flip_p=0.0))
    return InMemoryTwoViewDataset(images, 24, augmentation, seed)


def test_decoded_batches_are_a_function_of_seed_epoch_and_indices(fashion_uint8):
    rows = decoded(fashion_uint8)
    batch = rows.collate([5, 3, 9, 40])
    assert batch["view1"].shape == batch["view2"].shape == (4, 3, 24, 24)
    assert batch["view1"].dtype == torch.uint8 and batch["index"].tolist() == [5, 3, 9, 40]
    assert torch.equal(batch["view1"], decoded(fashion_uint8).collate([5, 3, 9, 40])["view1"])  # resumable
    assert not torch.equal(batch["view1"], batch["view2"])  # two different views
    rows.set_epoch(1)
    assert not torch.equal(batch["view1"], rows.collate([5, 3, 9, 40])["view1"])  # new views each epoch
    assert not torch.equal(batch["view1"], decoded(fashion_uint8, seed=1).collate([5, 3, 9, 40])["view1"])


def test_decoded_batches_have_the_keys_and_types_of_per_image_batches(fashion_uint8):
    dataset = Dataset.from_dict({"image": [Image.fromarray(x[0].numpy()) for x in fashion_uint8[:8]]})
    dataset = dataset.cast_column("image", ImageFeature())
    per_image = ExampleCollator()([ImageViewDataset(dataset, "image", None, 24)[i] for i in range(4)])
    batched = decoded(fashion_uint8[:8]).collate([0, 1, 2, 3])
    assert set(per_image) == set(batched)
    for key in per_image:
        if isinstance(per_image[key], torch.Tensor):
            assert per_image[key].dtype == batched[key].dtype and per_image[key].shape == batched[key].shape


def test_both_datasets_refuse_an_unknown_mode(fashion_uint8):
    dataset = Dataset.from_dict({"image": [Image.fromarray(fashion_uint8[0, 0].numpy())]})
    for cls in (ImageViewDataset, IterableImageViewDataset):
        with pytest.raises(ValueError, match="mode='train': use one of .*'two_view', 'eval', 'decode'"):
            cls(dataset, "image", None, 24, mode="train")


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
    images, rows, bad, message = decode_split(image_dataset([(12, 10)] * 6), "image", 2**20)
    assert images.shape == (6, 3, 12, 10) and images.dtype == torch.uint8 and bad == []
    assert rows.tolist() == list(range(6))
    assert "decoded 6 images of 10x12 px" in message
    images, _, _, message = decode_split(image_dataset([(12, 10)] * 5 + [(8, 8)]), "image", 2**20)
    assert images is None and "images differ in size" in message
    images, _, _, message = decode_split(image_dataset([(12, 10)] * 6), "image", 1000)
    assert images is None and "over the" in message and "GiB limit" in message


def test_decode_refuses_or_skips_unreadable_images():
    dataset = image_dataset([(12, 10)] * 6, bad=2)
    with pytest.raises(DataError, match="could not read 1 image.*broken.png.*--skip_bad_images"):
        decode_split(dataset, "image", 2**20)
    images, rows, bad, _ = decode_split(dataset, "image", 2**20, skip_bad_images=True)
    assert len(images) == 5 and len(bad) == 1 and "broken.png" in bad[0]
    assert rows.tolist() == [0, 1, 3, 4, 5]
    # Evaluation rows made from the decoded images keep each image's own label.
    cached = InMemoryEvalDataset.from_views(
        ImageViewDataset(dataset, "image", None, 8, mode="eval", labels=[10, 11, 12, 13, 14, 15]),
        2**20,
        skip_bad_images=True,
    )
    assert cached.labels == [10, 11, 13, 14, 15] and cached.index.tolist() == [0, 1, 3, 4, 5]


@pytest.mark.parametrize("same_size", [True, False])  # batched resize of decoded images, or per image
def test_cached_evaluation_rows_equal_the_rows_they_were_made_from(same_size, fashion_uint8):
    images = [Image.fromarray(x[0].numpy()) for x in fashion_uint8[:40]]
    if not same_size:
        images[5] = images[5].resize((30, 30))
    dataset = Dataset.from_dict({"image": images}).cast_column("image", ImageFeature())
    rows = ImageViewDataset(dataset, "image", None, 24, mode="eval", labels=list(range(40)))
    cached = InMemoryEvalDataset.from_views(rows, max_bytes=2**20)
    assert len(cached) == len(rows) == 40
    for i in (0, 5, 17, 39):
        expected, got = rows[i], cached[i]
        assert got["labels"] == expected["labels"] == i and got["index"] == expected["index"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert InMemoryEvalDataset.from_views(rows, max_bytes=40 * 3 * 24 * 24 - 1) is None  # over the limit


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
    passes = 2 if workers == 2 else 1  # the second pass is shuffled differently, and still complete
    delivered = [[] for _ in range(passes)]
    for rank in range(processes):
        part, usable_workers = split_stream(streamed_rows(shards), rank, processes, workers)
        rows = IterableImageViewDataset(
            part, image_column="image", label_column="id", image_size=4, stream_id=rank
        )
        loader = torch.utils.data.DataLoader(
            rows, batch_size=8, num_workers=usable_workers, collate_fn=ExampleCollator()
        )
        for epoch in range(passes):
            rows.set_epoch(epoch)
            delivered[epoch] += [int(i) for batch in loader for i in batch["labels"]]
    for rows_of_pass in delivered:
        assert sorted(rows_of_pass) == list(range(203))


def test_decoded_batches_are_the_same_wherever_they_are_cut(fashion_uint8):
    # The draws stay on the host: a GPU copy of the cache (`crop_device`) cuts the same boxes.
    augmentation = TwoViewAugmentation(ViewAugmentation(crop_scale=(0.2, 1.0)), ViewAugmentation(flip_p=0.5))
    here = InMemoryTwoViewDataset(fashion_uint8, 24, augmentation, 3, crop_device="cpu").collate([1, 7, 2])
    default = InMemoryTwoViewDataset(fashion_uint8, 24, augmentation, 3).collate([1, 7, 2])
    assert torch.equal(here["view1"], default["view1"]) and torch.equal(here["view2"], default["view2"])


def test_the_image_cache_is_cropped_on_the_gpu_when_a_copy_fits(monkeypatch):
    from modeling_corinfomax.cli.train_data import GPU_CACHE_SHARE, crop_device

    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)  # 307,200 bytes
    assert crop_device(images, torch.device("cpu")).type == "cpu"
    gpu = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (images.numel() / GPU_CACHE_SHARE, 10**12))
    assert crop_device(images, gpu) == gpu
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device: (images.numel() / GPU_CACHE_SHARE - 1, 10**12)
    )
    assert crop_device(images, gpu).type == "cpu"  # a small GPU keeps its memory for training
