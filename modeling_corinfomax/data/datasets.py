"""PyTorch datasets over a `datasets` split, their collator and sampler.

- per image, in DataLoader workers: `ImageViewDataset` (map-style) and `IterableImageViewDataset`
  (`streaming=True`, split per process by `split_stream`) decode a row and make its views as uint8
  tensors; `ExampleCollator` stacks them and reports (or skips) unreadable images;
- decoded once, for a split of same-size images that fits in memory: `decode_split` decodes it into
  one uint8 tensor; `InMemoryTwoViewDataset` then crops a whole batch at a time in its `collate`, and
  `InMemoryEvalDataset` keeps the evaluation views, so repeated passes decode nothing again.

Both training datasets yield the same batches (`view1`, `view2`, `labels`, `index`, `bad_images`), so
the training loop is the same; `EpochShuffleSampler` orders them by `(seed, epoch)` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from ..errors import DataError
from .augmentation import TwoViewAugmentation, derive_seed, normalize_batch
from .decoding import decode_crops, decode_image_tensor, open_image
from .device_decode import collate_jpegs, crop_example
from .geometry import eval_view
from .sources import undecoded_columns

MODES = ("two_view", "eval", "decode", "jpeg_bytes")


class _RowViews:
    """What the map-style and the iterable dataset share: the columns they read, the views they make
    (`mode`), the epoch their random draws depend on, and how one row becomes an example."""

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None,
        image_size: int,
        mode: str,
        augmentation: TwoViewAugmentation | None,
        seed: int,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}.")
        dataset = undecoded_columns(dataset, image_column, label_column)
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.image_size, self.mode, self.seed, self.epoch = image_size, mode, seed, 0
        self.augmentation = augmentation or TwoViewAugmentation()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_example(self, row: dict, index: int, seed: int) -> dict:
        """Decode and crop one dataset row into the dict `ExampleCollator` expects; `seed` seeds the
        two views' crops."""
        cell = row[self.image_column]
        name = cell.get("path") if isinstance(cell, dict) else None
        label = row.get(self.label_column, -1) if self.label_column else -1
        example = {"index": index, "labels": -1 if label is None else int(label)}
        try:
            if self.mode == "jpeg_bytes":  # decoded on the training device (`device_decode`)
                example.update(crop_example(self.augmentation, cell, self.image_size, seed))
            elif self.mode == "two_view":  # the boxes from the header, then a decode sized to them
                image = open_image(cell)
                boxes = self.augmentation.draw_crops(image.height, image.width, seed)
                example["view1"], example["view2"] = decode_crops(cell, image, boxes, self.image_size)
            else:
                pixels = decode_image_tensor(cell)
                example["pixel_values"] = (
                    eval_view(pixels, self.image_size) if self.mode == "eval" else pixels
                )
                if self.mode == "eval" and name:  # what `embedding.embed_dataset` writes for each row
                    example["path"] = str(name)
        except Exception as error:  # noqa: BLE001  (reported by the collate function with the row's name)
            return {
                "error": f"row {index}{' (' + str(name) + ')' if name else ''}: {type(error).__name__}: {error}"
            }
        return example


class ImageViewDataset(_RowViews, torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` that yields dicts of uint8 image tensors.

    `mode="two_view"` yields `view1`, `view2` (random crops and flips, which depend only on
    `(seed, epoch, index)`); `mode="jpeg_bytes"` yields a JPEG's bytes and the same crops' boxes, for
    `device_decode.decode_views` to decode and crop on the training device (other images: their host crops);
    `mode="eval"` yields `pixel_values` (resize + centre crop) and the file's `path` when the row has one
    (collated as `paths`); `mode="decode"`
    yields the decoded image as is, in `pixel_values`. Undecodable images become `{"error": ...}`
    examples that `ExampleCollator` reports or skips, so a bad file never surfaces as a bare worker
    traceback. `labels`, when given, are class indices that replace the label column's (see
    `class_indices`).
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None,
        image_size: int,
        mode: str = "two_view",
        augmentation: TwoViewAugmentation | None = None,
        seed: int = 0,
        labels: list[int] | None = None,
    ):
        super().__init__(dataset, image_column, label_column, image_size, mode, augmentation, seed)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        example = self.make_example(row, index, derive_seed(self.seed, self.epoch, index))
        if self.labels is not None and "error" not in example:
            example["labels"] = self.labels[index]
        return example


def split_stream(dataset, process_index: int, num_processes: int, num_workers: int):
    """This process's part of a `streaming=True` dataset, and how many DataLoader workers can read it.

    `datasets` hands each DataLoader worker whole shards (files, or row groups after `reshard`) and gives
    a worker beyond the number of shards nothing, so the workers are capped at the shards this process
    has: every row then arrives exactly once per pass, on one process or several.
    """
    from datasets.distributed import split_dataset_by_node  # noqa: PLC0415

    if dataset.n_shards < max(1, num_workers) * num_processes:
        dataset = dataset.reshard()  # more, smaller shards where the files allow (parquet row groups)
    shard = split_dataset_by_node(dataset, process_index, num_processes)
    return shard, min(num_workers, shard.n_shards)


class IterableImageViewDataset(_RowViews, torch.utils.data.IterableDataset):
    """Iterable counterpart of `ImageViewDataset` (the same modes and examples) for `streaming=True`
    datasets, already split per process by `split_stream`; `datasets` splits it further between
    DataLoader workers, by shard.

    In `mode="two_view"` the stream is shuffled within `shuffle_buffer` rows by `(seed, epoch)`, and a
    row's crops depend on `(seed, epoch, stream_id, worker, position in the worker's part)`.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None,
        image_size: int,
        mode: str = "two_view",
        augmentation: TwoViewAugmentation | None = None,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        stream_id: int = 0,
    ):
        super().__init__(dataset, image_column, label_column, image_size, mode, augmentation, seed)
        self.stream_id = stream_id  # the process index: the views of each process's stream differ
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        dataset = self.dataset
        if self.mode in ("two_view", "jpeg_bytes") and self.shuffle_buffer > 1:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            dataset.set_epoch(self.epoch)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        for position, row in enumerate(dataset):
            seed = derive_seed(self.seed, self.epoch, self.stream_id, worker, position)
            yield self.make_example(row, position, seed)


class ExampleCollator:
    """Stack uint8 views and labels; report (or, with `skip_bad_images`, drop and count) bad rows."""

    def __init__(self, skip_bad_images: bool = False):
        self.skip_bad_images = skip_bad_images

    def __call__(self, examples: list[dict]) -> dict:
        bad = [e["error"] for e in examples if "error" in e]
        good = [e for e in examples if "error" not in e]
        if bad and not self.skip_bad_images:
            raise DataError(
                f"could not read {len(bad)} image(s), first: {bad[0]}. Fix or remove the file, or pass "
                "--skip_bad_images to skip unreadable images (they are counted and the first names logged)."
            )
        batch: dict[str, Any] = {"bad_images": bad}
        if not good:
            return batch
        if any("jpeg" in e for e in good):  # `--decode_on_device`: `device_decode.decode_views` ends it
            batch.update(collate_jpegs(good))
        else:
            for key in ("view1", "view2", "pixel_values"):
                if key in good[0]:
                    batch[key] = torch.stack([e[key] for e in good])
        batch["labels"] = torch.tensor([e["labels"] for e in good], dtype=torch.long)
        batch["index"] = torch.tensor([e["index"] for e in good], dtype=torch.long)
        if any("path" in e for e in good):
            batch["paths"] = [e.get("path") for e in good]
        return batch


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader, or the dataset of a plain DataLoader, the epoch. Accelerate's prepared loaders
    forward `set_epoch` to the dataset; plain ones need it done by hand, otherwise a dataset that seeds
    its augmentations per epoch repeats the same crops every epoch."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "dataset", None), "set_epoch"):
        loader.dataset.set_epoch(epoch)


class NormalizedBatches:
    """Wrap an iterable of `ExampleCollator` batches of uint8 images into the normalised float
    `pixel_values` (and `labels`) the models take: the eval view, or view1 of two-view rows. Batches in
    which every image was unreadable (`--skip_bad_images`) are left out."""

    def __init__(self, batches, mean, std, channels_last: bool = False):
        self.batches, self.mean, self.std = batches, mean, std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.batches, epoch)

    def __iter__(self):
        for batch in self.batches:
            images = batch.get("pixel_values", batch.get("view1"))
            if images is None:
                continue
            pixels = normalize_batch(images, self.mean, self.std, self.memory_format)
            yield {"pixel_values": pixels, "labels": batch["labels"]}


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A random permutation of range(n) that depends only on `(seed, epoch)` (resumable)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A))
        return iter(torch.randperm(self.n, generator=generator).tolist())


# ---------------------------------------------------------------------------------------------------
# Decoded once: the whole split in one uint8 tensor


class DecodedSplit(NamedTuple):
    """What `decode_split` returns."""

    images: torch.Tensor | None  # (N, 3, H, W) uint8, or None when the split cannot be decoded into one
    rows: torch.Tensor | None  # the dataset row of each image
    bad_images: list[str]  # descriptions of the unreadable images left out
    message: str  # what was decoded, or why not


def decode_split(
    dataset,
    image_column: str,
    max_bytes: int,
    num_workers: int = 0,
    skip_bad_images: bool = False,
) -> DecodedSplit:
    """Decode every image of `dataset` into one (N, 3, H, W) uint8 tensor.

    `images` is None, and `message` says why, when the images differ in size or would take more
    than `max_bytes`. An unreadable image raises `DataError`, or with `skip_bad_images` is left out
    and described in `bad_images`; `rows` are the dataset rows of `images`.
    """
    rows = ImageViewDataset(dataset, image_column, None, 0, mode="decode")
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=512,
        num_workers=num_workers,
        collate_fn=_stack_decoded,
        prefetch_factor=4 if num_workers else None,
    )
    images, bad, position, kept = None, [], 0, []
    for batch in loader:
        for example in batch["errors"]:
            if not skip_bad_images:
                ExampleCollator()([example])  # raises the usual DataError
            bad.append(example["error"])
        pixels = batch["pixel_values"]
        if isinstance(pixels, list):  # the worker found images of different sizes
            a, b = pixels[0].shape[-2:], next(p.shape[-2:] for p in pixels if p.shape != pixels[0].shape)
            return DecodedSplit(None, None, bad, f"images differ in size ({tuple(a)} and {tuple(b)})")
        if not len(pixels):
            continue
        if images is None:
            need = len(rows) * pixels[0].numel()
            if need > max_bytes:
                limit = f"{need / 2**30:.2f} GiB, over the {max_bytes / 2**30:.2f} GiB limit"
                return DecodedSplit(None, None, bad, f"decoded, the split would take {limit}")
            images = torch.empty((len(rows), *pixels.shape[1:]), dtype=torch.uint8)
        elif pixels.shape[1:] != images.shape[1:]:
            a, b = tuple(images.shape[-2:]), tuple(pixels.shape[-2:])
            return DecodedSplit(None, None, bad, f"images differ in size ({a} and {b})")
        images[position : position + len(pixels)] = pixels
        position += len(pixels)
        kept.append(batch["index"])
    if images is None:
        raise DataError(
            f"no image of the training split could be read ({len(bad)} skipped, first: "
            f"{bad[0] if bad else '-'}): check the files and --image_column."
        )
    images = images[:position]
    size = f"{images.shape[-1]}x{images.shape[-2]} px ({images.numel() / 2**20:.0f} MiB)"
    return DecodedSplit(images, torch.cat(kept), bad, f"decoded {position} images of {size}")


def _stack_decoded(examples: list[dict]) -> dict:
    """Decoded images as one tensor when they share a size (a tensor per image would cross from a worker
    to the main process one shared-memory file at a time: 5x slower than decoding them), and the errors."""
    good = [e["pixel_values"] for e in examples if "error" not in e]
    errors = [e for e in examples if "error" in e]
    if len({p.shape for p in good}) > 1:
        return {"pixel_values": good, "errors": errors}
    return {
        "pixel_values": torch.stack(good) if good else torch.empty(0, dtype=torch.uint8),
        "index": torch.tensor([e["index"] for e in examples if "error" not in e], dtype=torch.long),
        "errors": errors,
    }


class InMemoryTwoViewDataset(torch.utils.data.Dataset):
    """A split of same-size images decoded once into one uint8 tensor (`decode_split`); batches of
    two-view crops.

    Items are indices; `collate` makes a batch's two views with `TwoViewAugmentation.batched_crop_views`
    (the random draws depend on `(seed, epoch, batch)`, so a resumed run sees the same views). It yields
    what `ImageViewDataset` + `ExampleCollator` yield, so the training loop is the same; use it with
    `num_workers=0` (there is no per-image work left to spread).

    `crop_device`: where the crops are cut (a copy of the images is kept there). On a GPU the two matrix
    products per view take microseconds instead of the host's milliseconds, which otherwise leave the GPU
    waiting; the random draws stay on the host, so the views are the same wherever they are cut (to
    within float rounding). The views then arrive on that device: use the loader without `pin_memory`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        image_size: int,
        augmentation: TwoViewAugmentation | None = None,
        seed: int = 0,
        bad_images: list[str] | None = None,
        crop_device: torch.device | str | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.image_size, self.seed, self.epoch = images, image_size, seed, 0
        self.augmentation = augmentation or TwoViewAugmentation()
        self.bad_images = bad_images or []  # what `decode_split` left out
        on_host = crop_device is None or torch.device(crop_device).type == "cpu"
        self.crop_source = images if on_host else images.to(crop_device)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> int:
        return int(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def collate(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long)
        images = self.crop_source[index.to(self.crop_source.device)]
        seed = derive_seed(self.seed, self.epoch, indices[0], len(indices))
        batch: dict[str, Any] = {"bad_images": [], "labels": torch.full_like(index, -1), "index": index}
        batch["view1"], batch["view2"] = self.augmentation.batched_crop_views(images, self.image_size, seed)
        return batch


class InMemoryEvalDataset(torch.utils.data.Dataset):
    """The examples of an `ImageViewDataset(mode="eval")`, made once and kept in memory as uint8 tensors,
    so that repeated passes (kNN monitoring, the final evaluation and its baselines) decode nothing
    again. Items are what `ImageViewDataset` yields, for `ExampleCollator`; use it with `num_workers=0`.
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, index: torch.Tensor):
        self.pixel_values, self.index = pixel_values, index
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, i: int) -> dict:
        return {"index": int(self.index[i]), "labels": self.labels[i], "pixel_values": self.pixel_values[i]}

    @classmethod
    def from_views(
        cls,
        views: ImageViewDataset,
        max_bytes: int,
        num_workers: int = 0,
        skip_bad_images: bool = False,
    ) -> InMemoryEvalDataset | None:
        """Run through `views` once; None when the views would take more than `max_bytes`. Unreadable
        images raise `DataError`, or with `skip_bad_images` are left out."""
        if len(views) * 3 * views.image_size**2 > max_bytes:
            return None
        # Same-size images: decoded once, then resized and centre-cropped a whole batch at a time.
        decoded = decode_split(views.dataset, views.image_column, max_bytes, num_workers, skip_bad_images)
        if decoded.images is not None:
            pixels = torch.cat([eval_view(chunk, views.image_size) for chunk in decoded.images.split(1024)])
            labels = (
                torch.tensor(views.labels)[decoded.rows]
                if views.labels is not None
                else torch.full((len(pixels),), -1, dtype=torch.long)
            )
            return cls(pixels, labels, decoded.rows)
        loader = torch.utils.data.DataLoader(
            views,
            batch_size=512,
            num_workers=num_workers,
            collate_fn=ExampleCollator(skip_bad_images),
            prefetch_factor=4 if num_workers else None,
        )
        batches = [b for b in loader if "pixel_values" in b]
        if not batches:
            raise DataError(f"none of the {len(views)} evaluation images could be read")
        return cls(*(torch.cat([b[k] for b in batches]) for k in ("pixel_values", "labels", "index")))
