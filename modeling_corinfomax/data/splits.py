"""The labelled splits every command evaluates on: the training split and an evaluation split of the same
source (or a folder of its own), their image and label columns, and their labelled rows."""

from __future__ import annotations

import logging

import torch

from ..errors import DataError
from .sources import class_indices, class_names, load_image_dataset, resolve_columns

logger = logging.getLogger(__name__)


def load_evaluation_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | None,
    train_split: str,
    validation_split: str | None = None,
    validation_dir: str | None = None,
    cache_dir: str | None = None,
):
    """The training split, the evaluation split and the evaluation split's name.

    The evaluation split is `validation_dir` (a plain image folder, which loads as a "train" split), else
    `validation_split` of the same source, else its 'validation' or 'test' split, whichever exists.
    """

    def load(split: str, folder: str | None):
        return load_image_dataset(dataset_name, dataset_config_name, folder, split, cache_dir=cache_dir)

    train = load(train_split, train_dir)
    if validation_dir:
        split = validation_split or "train"
        return train, load(split, validation_dir), split
    if validation_split:
        return train, load(validation_split, train_dir), validation_split
    for split in ("validation", "test"):
        try:
            return train, load(split, train_dir), split
        except DataError:
            pass
    raise DataError("no 'validation' or 'test' split found: pass --validation_split or --validation_dir.")


def load_labelled_splits(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_dir: str | None,
    train_split: str,
    validation_split: str | None,
    validation_dir: str | None,
    cache_dir: str | None,
    image_column: str | None,
    label_column: str | None,
):
    """`load_evaluation_splits` with both splits' image and label columns resolved (the training split's,
    checked on the evaluation split) and the class names: `(train, validation, validation_split,
    image_column, label_column, names)`, the one resolver of eval.py and finetune.py. Raises `DataError`."""
    train, validation, validation_split = load_evaluation_splits(
        dataset_name, dataset_config_name, train_dir, train_split, validation_split, validation_dir, cache_dir
    )
    image_column, label_column = resolve_columns(train, image_column, label_column, need_label=True)
    resolve_columns(validation, image_column, label_column, need_label=True)
    return train, validation, validation_split, image_column, label_column, class_names(train, label_column)


def labelled_rows(
    dataset,
    split: str,
    label_column: str,
    names: list[str] | None,
    max_samples: int | None = None,
    seed: int = 0,
):
    """The labelled rows of a split: `(dataset, labels, rows)`, the split without its unlabelled images (a
    seeded random subset of `max_samples` of them), their class indices and their row numbers in the split.

    Raises `DataError` when no image of the split has a label."""
    labels = class_indices(dataset, label_column, names, split)
    keep = [i for i, label in enumerate(labels) if label >= 0]
    if not keep:
        raise DataError(
            f"the {split!r} split has no labelled image: pass a labelled split or --label_column."
        )
    if len(keep) < len(labels):
        logger.warning(
            "%d images of the %r split have no label; the evaluation leaves them out",
            len(labels) - len(keep),
            split,
        )
    if max_samples is not None and max_samples < len(keep):
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:max_samples]
        keep = sorted(keep[i] for i in order.tolist())
    if len(keep) < len(labels):
        dataset = dataset.select(keep)
    return dataset, [labels[i] for i in keep], keep
