#!/usr/bin/env python
"""Embed every image of a folder, a dataset or a stream with a pretrained encoder: one parquet file of
embeddings (and, on request, each image's exact nearest neighbours) and a 2-D map.

    python embed.py outputs/corinfomax --train_dir photos --neighbors 10 --map map.png
    python embed.py org/corinfomax-resnet18-cifar10 --dataset_name uoft-cs/cifar10 --split test \\
        --output cifar10-test.parquet
    accelerate launch --multi_gpu --num_processes 2 embed.py outputs/corinfomax --dataset_name org/huge-images \\
        --streaming --dataloader_num_workers 4

Without a data flag the bundled Fashion-MNIST test split is embedded. Each image is decoded to RGB, its
short side resized to 8/7 of the checkpoint's crop size (bicubic), centre-cropped and normalised as
eval.py does; the embedding is the backbone's `pooler_output` (any checkpoint `AutoModel` loads with one:
CorInfoMax or a timm wrapper).

The output (`load_dataset("parquet", data_files="embeddings.parquet")`) has the columns `id` (the row
index; in a stream, the arrival order), `path` (the image file, when the rows have one), `label` (a
ClassLabel, when the data has labels), `embedding` (float32) and, with `--neighbors K`, `neighbors` (the
ids of the K most cosine-similar other images, most similar first) and `neighbor_similarities`. An
existing file is replaced whole, never left half-written.

Several processes (`accelerate launch --multi_gpu --num_processes N`, on GPUs or on a CPU machine) each
embed their part of the rows; the main process writes every row once, in row order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax.cli.flags import (
    BooleanFlag,
    HelpFormatter,
    OneLineErrorParser,
    add_dataset_flags,
    add_host_memory_flag,
    exits_on_error,
)
from modeling_corinfomax.cli.train import process_group
from modeling_corinfomax.data import load_image_dataset, resolve_columns
from modeling_corinfomax.embedding import (
    draw_map,
    embed_dataset,
    load_encoder,
    nearest_neighbors,
    project_2d,
    write_embeddings,
)
from modeling_corinfomax.errors import ConfigurationError
from modeling_corinfomax.hardware import reuse_host_memory, use_every_core

logger = logging.getLogger("corinfomax.embed")

MAP_POINTS = 20_000  # a larger map is drawn from a seeded random subset of the rows


def parse_args(argv: list[str] | None = None):
    parser = OneLineErrorParser(description=__doc__, formatter_class=HelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None, help="local folder or Hub id of the checkpoint")
    g.add_argument("--model_name_or_path", default=None, help="the same, as a flag")
    g.add_argument("--revision", default=None, help="branch, tag or commit of a Hub checkpoint")
    g.add_argument(
        "--trust_remote_code",
        action=BooleanFlag,
        default=False,
        help="load the model code from the checkpoint",
    )
    g = parser.add_argument_group("data (default: the bundled Fashion-MNIST test split)")
    g.add_argument("--train_dir", default=None, help="a folder of images (class sub-folders give labels)")
    add_dataset_flags(g)
    g.add_argument("--split", default=None, help="default: train (the bundled data: test)")
    g.add_argument("--streaming", action=BooleanFlag, default=False, help="read the data as a stream")
    g.add_argument("--max_samples", type=int, default=None, help="only the first N rows")
    g.add_argument("--cache_dir", default=None)
    g = parser.add_argument_group("run and outputs")
    g.add_argument("--per_device_batch_size", type=int, default=64)
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="processes decoding the images")
    add_host_memory_flag(g)
    g.add_argument(
        "--skip_bad_images",
        action=BooleanFlag,
        default=False,
        help="leave out unreadable images (counted, the first named) instead of stopping",
    )
    g.add_argument("--output", default="embeddings.parquet", help="the parquet file written")
    g.add_argument("--neighbors", type=int, default=0, metavar="K", help="also write each image's K nearest")
    g.add_argument("--map", default=None, metavar="PNG", help="also draw the embeddings' 2-D map (PCA) there")
    args = parser.parse_args(argv)
    if args.model and args.model_name_or_path and args.model != args.model_name_or_path:
        parser.error(
            f"two models given ({args.model}, --model_name_or_path {args.model_name_or_path}): pass one."
        )
    args.model_name_or_path = args.model_name_or_path or args.model
    if not args.model_name_or_path:
        parser.error(
            "pass the checkpoint to embed with (a folder or a Hub id), e.g. `embed.py outputs/corinfomax`."
        )
    if args.dataset_name and args.train_dir:
        parser.error("pass either --dataset_name or --train_dir, not both.")
    if args.split is None:
        args.split = "train" if args.dataset_name or args.train_dir else "test"
    for flag in ("per_device_batch_size", "max_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)} must be >= 1.")
    for flag in ("dataloader_num_workers", "neighbors"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} {getattr(args, flag)} must be >= 0.")
    return args


def check_outputs(args) -> None:
    """Refuse, before any work, an output that is a folder."""
    for flag, path in (("--output", args.output), ("--map", args.map)):
        if path and Path(path).is_dir():
            raise ConfigurationError(
                f"{flag} {path} is a folder: pass a file name (e.g. {Path(path) / 'x'})."
            )


def load_rows(args):
    """The split to embed (its first `--max_samples` rows) and its image and label columns."""
    dataset = load_image_dataset(
        args.dataset_name,
        args.dataset_config_name,
        args.train_dir,
        args.split,
        args.streaming,
        args.cache_dir,
    )
    image_column, label_column = resolve_columns(dataset, args.image_column, args.label_column)
    if args.max_samples is not None:
        if args.streaming:
            dataset = dataset.take(args.max_samples)
        elif args.max_samples < len(dataset):
            dataset = dataset.select(range(args.max_samples))
    return dataset, image_column, label_column


@exits_on_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    state = process_group()  # N launched CPU processes form one group (Accelerate alone leaves them apart)
    accelerator = Accelerator(cpu=state.device.type == "cpu")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    for line in (
        use_every_core(accelerator.device, accelerator.num_processes),
        reuse_host_memory(args.reuse_host_memory, accelerator.device),
    ):
        if line is not None:
            logger.info(line)
    check_outputs(args)

    dataset, image_column, label_column = load_rows(args)  # a data problem surfaces before the model loads
    encoder = load_encoder(args.model_name_or_path, args.revision, args.trust_remote_code, accelerator.device)
    source = args.train_dir or args.dataset_name or "the bundled Fashion-MNIST"
    logger.info(
        "embedding %s (split %s%s) with %s: %d px crops, %d process(es)",
        source, args.split, ", streamed" if args.streaming else "", args.model_name_or_path, encoder.image_size,
        accelerator.num_processes,
    )  # fmt: skip

    start = time.perf_counter()
    found = embed_dataset(
        encoder,
        dataset,
        image_column,
        label_column,
        batch_size=args.per_device_batch_size,
        num_workers=args.dataloader_num_workers,
        skip_bad_images=args.skip_bad_images,
        accelerator=accelerator,
    )
    seconds = time.perf_counter() - start
    summary: dict = {}
    if accelerator.is_main_process:
        neighbors = None
        if args.neighbors:
            neighbors = nearest_neighbors(found.embeddings, args.neighbors, device=accelerator.device)
        path = write_embeddings(args.output, found, neighbors)
        if args.map:
            draw_map_of(found, args.map)
        if found.bad_images:
            logger.warning(
                "skipped %d unreadable image(s), first: %s", len(found.bad_images), found.bad_images[0]
            )
        n, dim = found.embeddings.shape
        logger.info(
            "%d images, %d-dim embeddings, %.1f images/s, written to %s%s",
            n, dim, n / seconds, path, f" (map: {args.map})" if args.map else "",
        )  # fmt: skip
        summary = {
            "images": n,
            "dim": dim,
            "images_per_second": n / seconds,
            "bad_images": len(found.bad_images),
            "output": str(path),
            "map": args.map,
        }
    accelerator.wait_for_everyone()
    return summary


def draw_map_of(found, path: str) -> None:
    """`--map`: the 2-D map of the embeddings (of at most `MAP_POINTS` of them), one colour per class."""
    keep = torch.arange(len(found))
    if len(keep) > MAP_POINTS:
        keep = (
            torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))[:MAP_POINTS].sort().values
        )
    labels = None if found.labels is None else found.labels[keep].numpy()
    title = f"{len(keep)} of {len(found)} embeddings" if len(keep) < len(found) else None
    draw_map(project_2d(found.embeddings[keep]), labels, found.label_names, path=path, title=title)


if __name__ == "__main__":
    main()
