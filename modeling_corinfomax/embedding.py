"""Embeddings of any image folder, dataset or stream with a frozen encoder, their neighbours and their map.

- `load_encoder`: a checkpoint (local folder or Hub id; CorInfoMax or any `AutoModel` with a
  `pooler_output`) in eval mode, with its evaluation preprocessing (`preprocessing`); `Encoder.embed_images`
  embeds a few PIL images (a query) exactly as `embed_dataset` embeds a dataset's rows.
- `embed_dataset`: every row of a `datasets` split or stream, decoded, resized (short side to 8/7 of the
  crop, bicubic) and centre-cropped in DataLoader workers (`ImageViewDataset`, `mode="eval"`), on one
  process or split over several (Accelerate).
- `nearest_neighbors` (exact cosine top-k, from `evaluation`), `project_2d` (PCA) and `draw_map` (from
  `reporting`) for retrieval and pictures.
- `write_embeddings` / `read_embeddings`: a `datasets` parquet file (`id`, `path`, `label`, `embedding`,
  `neighbors`, `neighbor_similarities`), loadable with `load_dataset("parquet", data_files=...)`.

    encoder = load_encoder("outputs/corinfomax")
    rows = load_image_dataset(train_dir="photos")
    found = embed_dataset(encoder, rows, "image", "label")
    write_embeddings("embeddings.parquet", found, nearest_neighbors(found.embeddings, k=10))
    similarities, indices = nearest_neighbors(found.embeddings, 5, queries=encoder.embed_images([photo]))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .data import (
    ExampleCollator,
    ImageViewDataset,
    IterableImageViewDataset,
    class_indices,
    class_names,
    decode_image_tensor,
    eval_view,
    label_names,
    normalize_batch,
    split_stream,
)
from .errors import CheckpointError, DataError
from .evaluation import _eval_mode, nearest_neighbors, pooled_features
from .reporting import PrincipalAxes, draw_map

__all__ = [
    "Embeddings",
    "Encoder",
    "draw_map",
    "embed_dataset",
    "load_encoder",
    "nearest_neighbors",
    "preprocessing",
    "Map2D",
    "project_2d",
    "read_embeddings",
    "write_embeddings",
]


def preprocessing(
    config,
    model_name_or_path: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[int, list[float], list[float]]:
    """Crop size, mean and std of a checkpoint: from a CorInfoMax config, else from the checkpoint's image
    processor (a timm or transformers model)."""
    if all(hasattr(config, key) for key in ("image_size", "image_mean", "image_std")):
        size, mean, std = config.image_size, config.image_mean, config.image_std
    else:
        from transformers import AutoImageProcessor  # noqa: PLC0415

        processor = AutoImageProcessor.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        crop = getattr(processor, "crop_size", None) or processor.size
        size = crop.get("height") or crop.get("shortest_edge")
        mean, std = processor.image_mean, processor.image_std
    return int(size), list(mean), list(std)


@dataclass
class Encoder:
    """A frozen encoder and its evaluation preprocessing (crop size, normalisation)."""

    model: nn.Module  # eval mode; its output has `pooler_output`
    image_size: int
    mean: list[float]
    std: list[float]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 CPU embeddings of PIL images (or anything a `datasets` image cell holds: bytes,
        paths), preprocessed as `embed_dataset` preprocesses a dataset's rows."""
        features = []
        with _eval_mode(self.model):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pixels = torch.stack(
                    [eval_view(decode_image_tensor(image), self.image_size) for image in chunk]
                )
                pixels = normalize_batch(pixels.to(self.device), self.mean, self.std)
                features.append(pooled_features(self.model, pixels).cpu())
        return torch.cat(features) if features else torch.empty(0, 0)


def load_encoder(
    model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
) -> Encoder:
    """The checkpoint's `AutoModel` (the CorInfoMax backbone without its projector, or any model whose
    output has `pooler_output`) in eval mode on `device` (default: the CPU), with its preprocessing.
    Raises `CheckpointError` when it cannot be loaded."""
    from transformers import AutoModel  # noqa: PLC0415

    name = str(model_name_or_path)
    try:
        model = AutoModel.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        size, mean, std = preprocessing(model.config, name, revision, trust_remote_code)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot load the model {name!r}: {' '.join(str(error).split())} Pass a folder written by "
            "`save_pretrained` (train.py's --output_dir) or a Hub id."
        ) from None
    model.to(device or "cpu").eval()
    return Encoder(model, size, mean, std)


@dataclass
class Embeddings:
    """The embeddings of a dataset's rows, in row order (a stream's: in arrival order)."""

    ids: torch.Tensor  # (N,) int64: the row index in the dataset; a stream's: the arrival order
    paths: list[str | None] | None  # each row's file, when the rows have files
    labels: torch.Tensor | None  # (N,) int64 class indices (-1: none), when there is a label column
    embeddings: torch.Tensor  # (N, D) float32
    bad_images: list[str] = field(default_factory=list)  # the unreadable images skipped
    label_names: list[str] | None = None  # the classes' names, when known
    neighbors: tuple[torch.Tensor, torch.Tensor] | None = None  # (similarities, row positions), (N, k) each

    def __len__(self) -> int:
        return len(self.ids)


def is_stream(dataset) -> bool:
    """Whether `dataset` is a `datasets.IterableDataset` (`streaming=True`)."""
    from datasets import IterableDataset  # noqa: PLC0415

    return isinstance(dataset, IterableDataset)


def row_labels(dataset, label_column: str | None) -> tuple[list[int] | None, list[str] | None, str | None]:
    """`(labels, names, label_column)` for `ImageViewDataset`: a map-style dataset's class indices (strings
    and ClassLabels alike, by `class_indices`) with the column then left unread; a stream's column when it
    holds class indices (ClassLabel or integers), else no labels."""
    if label_column is None:
        return None, None, None
    if not is_stream(dataset):
        names = class_names(dataset, label_column)
        return class_indices(dataset, label_column, names, "embedded"), names, None
    feature = (dataset.features or {}).get(label_column)
    if hasattr(feature, "names") or str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        return None, label_names(dataset, label_column), label_column
    raise DataError(
        f"the label column {label_column!r} of a stream must hold class indices (ClassLabel or integers), "
        f"not {feature or 'values of unknown type'}: cast it with `cast_column(..., ClassLabel(names=...))` or "
        "leave it out."
    )


def embed_dataset(
    encoder: Encoder,
    dataset,
    image_column: str,
    label_column: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    accelerator=None,
    progress_bar: bool = True,
) -> Embeddings:
    """Embed every row of a `datasets.Dataset` or `IterableDataset` (`streaming=True`).

    Each row is decoded to RGB, its short side resized to 8/7 of `encoder.image_size` (bicubic,
    antialiased), centre-cropped and normalised in `num_workers` DataLoader workers, then embedded by the
    eval-mode encoder without gradients (under the `accelerator`'s autocast, if any). An unreadable image
    raises `DataError` naming it, or with `skip_bad_images` is left out and described in `bad_images`.

    With an `accelerator` of several processes each process embeds its part (a dataset: an even, contiguous
    split of the rows; a stream: `split_stream`'s) and the main process ends with every row once, in row
    order (a stream's: process by process, each in arrival order); the other processes return their part.
    """
    streaming = is_stream(dataset)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    labels, names, column = row_labels(dataset, label_column)
    common = {"image_column": image_column, "label_column": column, "image_size": encoder.image_size}
    if streaming:
        part, num_workers = split_stream(dataset, rank, world, num_workers)
        rows, sampler = IterableImageViewDataset(part, mode="eval", **common), None
    else:
        rows = ImageViewDataset(dataset, mode="eval", labels=labels, **common)
        sampler = range(len(rows) * rank // world, len(rows) * (rank + 1) // world)
    device = encoder.device
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=ExampleCollator(skip_bad_images),
        pin_memory=device.type == "cuda",
    )
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    show = progress_bar and (accelerator is None or accelerator.is_local_main_process)
    found: dict[str, list] = {"ids": [], "paths": [], "labels": [], "embeddings": [], "bad_images": []}
    with _eval_mode(encoder.model), torch.no_grad():
        for batch in tqdm(loader, desc="embedding", unit="batch", disable=not show):
            found["bad_images"] += batch["bad_images"]
            if "pixel_values" not in batch:  # every image of the batch was unreadable
                continue
            pixels = normalize_batch(
                batch["pixel_values"].to(device, non_blocking=True), encoder.mean, encoder.std
            )
            with autocast():
                found["embeddings"].append(pooled_features(encoder.model, pixels).cpu())
            found["ids"].append(batch["index"])
            found["labels"].append(batch["labels"])
            found["paths"] += batch.get("paths", [None] * len(batch["index"]))
    parts = gather_to_main(found, accelerator) if world > 1 else [found]
    whole = parts is not None
    return join_parts(parts or [found], streaming, names, label_column is not None, whole)


def gather_to_main(part: dict, accelerator) -> list[dict] | None:
    """Every process's part, in process order, on the main process (None on the others); the parts travel
    pickled (`torch.distributed.gather_object`), so only the main process holds all of them."""
    parts = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(part, parts, dst=0)
    return parts


def join_parts(
    parts: list[dict], streaming: bool, names: list[str] | None, labelled: bool, whole: bool = True
) -> Embeddings:
    """The `Embeddings` of the processes' parts: a dataset's rows sorted by row index, a stream's in the
    order the parts arrived (its ids are then the positions). `whole`: the parts are every process's, and
    must hold at least one image."""
    bad = [text for part in parts for text in part["bad_images"]]
    if not any(part["embeddings"] for part in parts):
        if not whole:  # a process whose share of a small dataset is empty
            return Embeddings(torch.empty(0, dtype=torch.long), None, None, torch.empty(0, 0), bad, names)
        raise DataError(
            f"no image could be embedded ({len(bad)} unreadable, first: {bad[0] if bad else '-'}): "
            "check the dataset, its --image_column and --split."
        )

    def cat(key: str) -> torch.Tensor:
        return torch.cat([tensor for part in parts for tensor in part[key]])

    ids, features, labels = cat("ids"), cat("embeddings"), cat("labels")
    paths = [path for part in parts for path in part["paths"]]
    order = torch.arange(len(ids)) if streaming else torch.argsort(ids, stable=True)
    ids = order.clone() if streaming else ids[order]
    paths = [paths[i] for i in order.tolist()] if any(p is not None for p in paths) else None
    return Embeddings(
        ids=ids,
        paths=paths,
        labels=labels[order] if labelled else None,
        embeddings=features[order],
        bad_images=bad,
        label_names=names,
    )


class Map2D:
    """The 2-D map of a set of embeddings (the first two principal axes of the L2-normalised rows, the
    geometry cosine neighbours use), fitted once: `points` (N, 2) float32, and `place(queries)` for new
    embeddings on the same axes (a query never moves the map)."""

    def __init__(self, embeddings: torch.Tensor | np.ndarray):
        self.axes = PrincipalAxes(torch.as_tensor(embeddings), n=2)
        self.points = self.place(embeddings)

    def place(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        """(M, 2) float32 coordinates (one-dimensional embeddings, or a single row, get a zero column)."""
        points = self.axes.place(torch.as_tensor(queries))
        return np.pad(points, ((0, 0), (0, max(0, 2 - points.shape[1])))).astype(np.float32)


def project_2d(
    embeddings: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(N, 2) float32 coordinates of the embeddings on their 2-D map (`Map2D`); with `queries` (M, D), also
    their (M, 2) coordinates on the same map."""
    map_2d = Map2D(embeddings)
    return map_2d.points if queries is None else (map_2d.points, map_2d.place(queries))


def write_embeddings(
    path: str | os.PathLike,
    embeddings: Embeddings,
    neighbors: tuple[torch.Tensor, torch.Tensor] | None = None,
    constants: Mapping[str, str] | None = None,
) -> Path:
    """Write `embeddings` as a parquet file that `datasets.load_dataset("parquet", data_files=path)` loads.

    Columns: `id` (int64), `path` (string; when the rows have files), `constants` (one string column each,
    the same in every row: eval.py's `split`), `label` (ClassLabel when the names are known, else int64;
    when there are labels), `embedding` (float32, fixed length) and, with `neighbors` (as
    `nearest_neighbors` returns them, or `embeddings.neighbors`), `neighbors` (the neighbours' ids, most
    similar first) and `neighbor_similarities` (their cosine similarities). The file is written under a
    temporary name and then renamed: an existing file is replaced whole or not at all.
    """
    from datasets import ClassLabel, Dataset, Features, List, Value  # noqa: PLC0415

    n, dim = embeddings.embeddings.shape
    columns: dict[str, tuple] = {"id": (Value("int64"), embeddings.ids.tolist())}
    if embeddings.paths is not None:
        columns["path"] = (Value("string"), list(embeddings.paths))
    for name, value in (constants or {}).items():
        columns[name] = (Value("string"), [value] * n)
    if embeddings.labels is not None:
        names = embeddings.label_names
        columns["label"] = (
            ClassLabel(names=list(names)) if names else Value("int64"),
            embeddings.labels.tolist(),
        )
    columns["embedding"] = (List(Value("float32"), length=dim), embeddings.embeddings.float().numpy())
    neighbors = neighbors if neighbors is not None else embeddings.neighbors
    if neighbors is not None:
        similarities, positions = (torch.as_tensor(t).cpu() for t in neighbors)
        k = positions.shape[1]
        columns["neighbors"] = (List(Value("int64"), length=k), embeddings.ids[positions].numpy())
        columns["neighbor_similarities"] = (List(Value("float32"), length=k), similarities.float().numpy())
    features = Features({name: feature for name, (feature, _) in columns.items()})
    table = Dataset.from_dict({name: values for name, (_, values) in columns.items()}, features=features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        table.to_parquet(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """The `Embeddings` of a file `write_embeddings` (or eval.py's `--save_embeddings`) wrote, neighbours
    included (as row positions)."""
    import pyarrow.parquet as pq  # noqa: PLC0415
    from datasets import Features  # noqa: PLC0415

    table = pq.read_table(str(path))
    if not {"id", "embedding"} <= set(table.column_names):
        raise DataError(
            f"{path} has columns {table.column_names}, not those of an embeddings file (id, embedding): "
            "write one with corinfomax-embed."
        )
    features = Features.from_arrow_schema(table.schema)
    n = table.num_rows

    def matrix(column: str, dtype) -> torch.Tensor:
        values = table.column(column).combine_chunks().flatten().to_numpy()
        return torch.from_numpy(np.array(values, dtype=dtype).reshape(n, -1))  # a writable copy

    ids = torch.from_numpy(table.column("id").to_numpy().astype(np.int64))
    label = features.get("label")
    neighbors = None
    if "neighbors" in table.column_names:
        by_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long) if n else torch.empty(0)
        by_id[ids] = torch.arange(n)
        neighbors = (matrix("neighbor_similarities", np.float32), by_id[matrix("neighbors", np.int64)])
    return Embeddings(
        ids=ids,
        paths=table.column("path").to_pylist() if "path" in table.column_names else None,
        labels=torch.from_numpy(table.column("label").to_numpy().astype(np.int64)) if label else None,
        embeddings=matrix("embedding", np.float32),
        label_names=list(label.names) if hasattr(label, "names") else None,
        neighbors=neighbors,
    )
