"""Where the images come from: a Hub dataset, a local image folder or the bundled demo split, its image
and label columns, and the class index of each row; `read_idx` reads the MNIST family's IDX files (the
bundled demo data and the benchmarks are made from Debian's `dataset-fashion-mnist`)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import DataError

# Package data (see pyproject.toml): the no-argument run works from an installed wheel, offline.
BUNDLED_DATA_DIR = Path(__file__).resolve().parents[1] / "demo_data" / "fashion_mnist"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # `apt-get install dataset-fashion-mnist`


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of the MNIST family (gzipped, unsigned bytes) as a uint8 array of its dimensions."""
    raw = gzip.open(path).read()
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
):
    """Load one split of an image corpus: a Hub dataset, a local image folder, or the bundled default.

    - `dataset_name`: anything `datasets.load_dataset` accepts (a Hub id, or a local folder of
      parquet/arrow files);
    - `train_dir`: a folder of images (`imagefolder`; class sub-folders give labels);
    - neither: the bundled Fashion-MNIST subset in `modeling_corinfomax/demo_data/fashion_mnist`.
    """
    import datasets  # noqa: PLC0415  (heavy import, only for entry points)

    if dataset_name and train_dir:
        raise DataError("pass either --dataset_name or --train_dir, not both.")
    if train_dir and not Path(train_dir).is_dir():
        raise DataError(f"--train_dir {train_dir!r} is not a folder of images.")
    files = {s: str(BUNDLED_DATA_DIR / f"{s}.parquet") for s in ("train", "test")}
    if not (train_dir or dataset_name or all(Path(f).exists() for f in files.values())):
        raise DataError(
            f"the bundled dataset is missing from {BUNDLED_DATA_DIR}: reinstall the package, or in a checkout run `python data/make_fashion_mnist.py` "
            "(needs `apt-get install dataset-fashion-mnist`) or pass --dataset_name/--train_dir."
        )
    try:
        if train_dir:
            ds = datasets.load_dataset(
                "imagefolder", data_dir=train_dir, streaming=streaming, cache_dir=cache_dir
            )
        elif dataset_name:
            ds = datasets.load_dataset(
                dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, revision=revision
            )
        else:
            ds = datasets.load_dataset("parquet", data_files=files, streaming=streaming, cache_dir=cache_dir)
    except (OSError, ValueError) as error:  # no such dataset, a folder without images, a missing config, ...
        source = (
            f"--train_dir {train_dir}" if train_dir else f"--dataset_name {dataset_name or files['train']}"
        )
        raise DataError(f"cannot load {source}: {type(error).__name__}: {error}") from None
    if split not in ds:
        raise DataError(
            f"split {split!r} not found; available splits: {sorted(ds)}. Use --train_split/--validation_split."
        )
    return ds[split]


def resolve_columns(
    dataset, image_column: str | None = None, label_column: str | None = None, need_label=False
):
    """Find the image column (and the label column, which is optional) of a dataset.

    Returns `(image_column, label_column_or_None)`; raises `DataError` naming the columns when ambiguous.
    """
    from datasets import ClassLabel  # noqa: PLC0415
    from datasets import Image as ImageFeature  # noqa: PLC0415

    features = dataset.features or {}
    columns = list(features) if features else list(getattr(dataset, "column_names", None) or [])
    if image_column is None:
        typed = [c for c, f in features.items() if isinstance(f, ImageFeature)]
        named = [c for c in IMAGE_COLUMN_CANDIDATES if c in columns]
        options = typed or named
        if len(options) != 1:
            raise DataError(
                f"cannot tell which column holds the images among {columns}: pass --image_column "
                f"({'candidates: ' + ', '.join(options) if options else 'no column has the Image feature'})."
            )
        image_column = options[0]
    elif image_column not in columns:
        raise DataError(
            f"--image_column {image_column!r} is not a column of the dataset; its columns are {columns}."
        )
    if label_column is None:
        typed = [c for c, f in features.items() if isinstance(f, ClassLabel)]
        named = [c for c in LABEL_COLUMN_CANDIDATES if c in columns]
        label_column = (typed or named or [None])[0]
    elif label_column not in columns:
        raise DataError(
            f"--label_column {label_column!r} is not a column of the dataset; its columns are {columns}."
        )
    if need_label and label_column is None:
        raise DataError(
            f"this needs labels but no label column was found among {columns}: pass --label_column."
        )
    return image_column, label_column


def undecoded_columns(dataset, image_column: str, label_column: str | None):
    """Only the columns that are used, the images as undecoded bytes/paths: `datasets` would otherwise
    decode every Image column while reading a row, where an unreadable file cannot be reported per row."""
    from datasets import Image as ImageFeature  # noqa: PLC0415

    if dataset.features is not None:  # (streaming datasets may not know their columns)
        dataset = dataset.select_columns(list(dict.fromkeys(c for c in (image_column, label_column) if c)))
        if isinstance(dataset.features.get(image_column), ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def label_names(dataset, label_column: str | None) -> list[str] | None:
    """Class names of a ClassLabel column (None when the column is absent or not a ClassLabel)."""
    feature = (dataset.features or {}).get(label_column) if label_column else None
    return list(feature.names) if hasattr(feature, "names") else None


def class_names(dataset, label_column: str) -> list[str] | None:
    """The classes of a label column: its ClassLabel names, the sorted distinct values of a column of
    strings, or None for integer class indices."""
    names = label_names(dataset, label_column)
    if names is None and getattr((dataset.features or {}).get(label_column), "dtype", None) in (
        "string",
        "large_string",
    ):
        names = sorted({v for v in dataset[label_column] if v is not None})
    return names


def class_indices(dataset, label_column: str, names: list[str] | None, split: str) -> list[int]:
    """Each row's class index in `names` (from `class_names` of the training split), -1 where the label
    is missing (None, or negative as in unlabelled test splits).

    A ClassLabel that names or orders the classes differently is mapped by name, so labels never index
    the wrong class. Raises `DataError` for classes that `names` lacks and for indices outside it.
    """
    values = list(dataset[label_column])
    own = label_names(dataset, label_column)
    if own is not None and names is not None and own != names:
        values = [own[v] if v is not None and v >= 0 else None for v in values]
    if any(isinstance(v, str) for v in values):
        if names is None:
            raise DataError(
                f"the {split!r} split has string labels but the training split has class indices."
            )
        position = {name: i for i, name in enumerate(names)}
        unknown = sorted({v for v in values if v is not None and v not in position})
        if unknown:
            raise DataError(
                f"the {split!r} split has classes {unknown[:5]} that the training split does not have "
                f"(its classes: {names[:10]}{' ...' if len(names) > 10 else ''}): use splits with the same classes."
            )
        values = [position[v] if v is not None else None for v in values]
    indices = [-1 if v is None or v < 0 else int(v) for v in values]
    outside = sorted({i for i in indices if names is not None and i >= len(names)})
    if outside:
        raise DataError(
            f"the {split!r} split has labels {outside[:5]} outside the {len(names)} classes of the training "
            f"split's ClassLabel: use splits with the same label feature, or --label_column."
        )
    return indices
