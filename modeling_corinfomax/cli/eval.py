#!/usr/bin/env python
"""Evaluate a pretrained encoder on frozen features: weighted kNN and linear probes.

    python eval.py --model_name_or_path outputs/corinfomax --output_dir outputs/corinfomax   # kNN, bundled data
    python eval.py --model_name_or_path outputs/corinfomax --protocol all --precompute_features
    accelerate launch eval.py --model_name_or_path org/corinfomax-resnet18-cifar10 --revision main \\
        --preset cifar10 --protocol all --output_dir results/cifar10

Protocols (section 4 of the SSL anchors notes):
- `knn`: DINO/InstDisc weighted kNN on L2-normalised backbone features of un-augmented train images,
  cosine similarity, eval-mode BatchNorm; k=20 and k=200 at T=0.07 (`--knn_temperature 0.1` for the
  lightly/VISSL convention).
- `linear`: the paper's linear evaluation (frozen eval-mode backbone, SGD momentum 0.9, 100 epochs,
  global batch 256, RandomResizedCrop + flip; test images resized to 8/7 and centre-cropped): lr 0.2 with
  a cosine to 2e-3 (CIFAR, Tiny ImageNet, ImageNet-100; the default), or lr 25 with x0.1 every 20 epochs
  (`--preset imagenet1k-r50`, or `--linear_lr_schedule step --linear_lr 25`). With
  `--precompute_features`, a logistic regression solved exactly on precomputed features instead (seconds
  instead of 100 passes through the backbone; a different, augmentation-free protocol).

`--preset NAME` (a train.py preset) selects that run's dataset and linear protocol
(`modeling_corinfomax.presets.LINEAR_EVAL_PRESETS`); explicit flags override it.
`--save_embeddings DIR` also writes each split's features as `DIR/<split>.parquet` (columns `id`, the
row index in the split, `split`, `label` and `embedding`), loadable with
`load_dataset("parquet", data_files=...)`.

Any checkpoint `AutoModel` loads with a `pooler_output` works (CorInfoMax or a timm wrapper). Without
dataset flags the bundled Fashion-MNIST subset is used. Results go to `<output_dir>/eval_results.json`,
merged with what is already there (other protocols, finetune.py, train.py), for the model card.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModel
from transformers.utils import cached_file, extract_commit_hash

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax import embedding
from modeling_corinfomax.cli.flags import (
    BooleanFlag,
    HelpFormatter,
    add_dataset_flags,
    add_host_memory_flag,
    exits_on_error,
)
from modeling_corinfomax.data import (
    ExampleCollator,
    ImageViewDataset,
    NormalizedBatches,
    TwoViewAugmentation,
    ViewAugmentation,
    labelled_rows,
    load_labelled_splits,
)
from modeling_corinfomax.errors import ConfigurationError
from modeling_corinfomax.evaluation import (
    BUNDLED_DATASET_NAME,
    KNN_K,
    KNN_TEMPERATURE,
    check_eval_results,
    extract_features,
    knn_accuracy,
    linear_eval,
    linear_probe,
    update_eval_results,
)
from modeling_corinfomax.hardware import reuse_host_memory, use_every_core
from modeling_corinfomax.presets import LINEAR_EVAL_PRESETS, PRESETS

logger = logging.getLogger("corinfomax.eval")

# eval.py flag -> `linear_eval` argument. Unset flags take the --preset's value, else linear_eval's default.
LINEAR_FLAGS = {
    "linear_epochs": "epochs",
    "linear_lr": "lr",
    "linear_lr_schedule": "lr_schedule",
    "linear_min_lr": "min_lr",
    "linear_lr_step_size": "lr_step_size",
    "linear_lr_gamma": "lr_gamma",
}
DEFAULT_TOTAL_BATCH_SIZE = 256  # the official linear evaluations' global batch
# What a --preset gives eval.py besides its linear protocol, unless a data source is named.
PRESET_DATA_KEYS = ("dataset_name", "dataset_config_name", "image_column", "label_column", "validation_split")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(parser)
    add_data_flags(parser)
    add_protocol_flags(parser)
    args = parser.parse_args(argv)
    given_linear = [f"--{flag}" for flag in LINEAR_FLAGS if getattr(args, flag) is not None]
    if args.precompute_features and given_linear:
        parser.error(
            f"{' '.join(given_linear)} set the augmented linear protocol, which --precompute_features "
            "replaces by an exact logistic regression: drop one or the other."
        )
    apply_preset(args)
    if args.total_batch_size < 1:
        parser.error(f"--total_batch_size {args.total_batch_size} must be >= 1.")
    if args.dataset_name and (args.train_dir or args.validation_dir):
        parser.error("pass either --dataset_name or --train_dir/--validation_dir, not both.")
    if args.validation_dir and not args.train_dir:
        parser.error("--validation_dir needs --train_dir (the kNN bank and the probe's training images).")
    if any(k < 1 for k in args.knn_k):
        parser.error(f"--knn_k {args.knn_k}: every k must be >= 1.")
    return args


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and what of it is evaluated."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a train.py preset: its dataset and official linear protocol (explicit flags override it)",
    )
    g.add_argument("--model_name_or_path", required=True, help="local folder or Hub id of the checkpoint")
    g.add_argument("--revision", default=None, help="branch, tag or commit of a Hub checkpoint")
    g.add_argument(
        "--trust_remote_code",
        action=BooleanFlag,
        default=False,
        help="load the model code from the checkpoint",
    )
    g.add_argument(
        "--use_projector",
        action=BooleanFlag,
        default=False,
        help="evaluate projector outputs, not the backbone",
    )
    g.add_argument("--image_size", type=int, default=None, help="crop size (default: the checkpoint's)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The labelled splits (the bank and the evaluation split)."""
    g = parser.add_argument_group("data (default: the bundled Fashion-MNIST subset)")
    add_dataset_flags(g)
    g.add_argument("--train_dir", default=None, help="image folder (class sub-folders) of training images")
    g.add_argument("--validation_dir", default=None, help="image folder of evaluation images")
    g.add_argument("--train_split", default="train")
    g.add_argument("--validation_split", default=None, help="default: 'validation', else 'test'")
    g.add_argument("--max_train_samples", type=int, default=None, help="random subset (seeded) of train")
    g.add_argument("--max_eval_samples", type=int, default=None, help="random subset (seeded) of validation")
    g.add_argument("--cache_dir", default=None)


def add_protocol_flags(parser: argparse.ArgumentParser) -> None:
    """kNN, the linear probe and the augmented linear protocol; batch, outputs."""
    g = parser.add_argument_group("protocols")
    g.add_argument("--protocol", choices=["knn", "linear", "all"], default="knn")
    g.add_argument(
        "--knn_k", type=int, nargs="+", default=[KNN_K, 200], help="neighbours; the first is reported"
    )
    g.add_argument(
        "--knn_temperature", type=float, default=KNN_TEMPERATURE, help="0.07 (DINO) or 0.1 (lightly, VISSL)"
    )
    g.add_argument(
        "--precompute_features",
        action=BooleanFlag,
        default=False,
        help="linear probe on precomputed un-augmented features (fast) instead of the augmented protocol",
    )
    g = parser.add_argument_group(
        "augmented linear protocol (default: the --preset's, else 100 epochs, lr 0.2, cosine to 2e-3)"
    )
    g.add_argument("--linear_epochs", type=int, default=None)
    g.add_argument("--linear_lr", type=float, default=None, help="SGD lr, absolute (no batch scaling)")
    g.add_argument("--linear_lr_schedule", choices=["cosine", "step"], default=None, help="stepped per epoch")
    g.add_argument("--linear_min_lr", type=float, default=None, help="the cosine's final lr")
    g.add_argument("--linear_lr_step_size", type=int, default=None, help="step: epochs between decays (20)")
    g.add_argument("--linear_lr_gamma", type=float, default=None, help="step: the decay factor (0.1)")
    g.add_argument(
        "--total_batch_size",
        type=int,
        default=None,
        help=f"global batch over all processes, for features and the linear protocol (default: "
        f"{DEFAULT_TOTAL_BATCH_SIZE}, the official one); each process gets total / number of processes",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    add_host_memory_flag(g)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default=None, help="where eval_results.json goes (default: only printed)")
    g.add_argument(
        "--save_embeddings",
        default=None,
        metavar="DIR",
        help="also write each split's features to DIR/<split>.parquet (id, split, label, embedding)",
    )


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the flags left unset: from the --preset (its linear protocol; its dataset unless
    --dataset_name or --train_dir is given), then from the defaults (linear_eval's, batch 256)."""
    defaults = inspect.signature(linear_eval).parameters
    values = {flag: defaults[name].default for flag, name in LINEAR_FLAGS.items()}
    values["total_batch_size"] = DEFAULT_TOTAL_BATCH_SIZE
    if args.preset:
        values.update(LINEAR_EVAL_PRESETS[args.preset])
        if not (args.dataset_name or args.train_dir):
            values.update(
                {key: PRESETS[args.preset][key] for key in PRESET_DATA_KEYS if key in PRESETS[args.preset]}
            )
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def per_process_batch_size(total_batch_size: int, num_processes: int) -> int:
    """Each process's share of the global batch; refuses a total the processes cannot split evenly."""
    if total_batch_size % num_processes:
        raise ConfigurationError(
            f"--total_batch_size {total_batch_size} does not split over {num_processes} processes: "
            f"pass a multiple of {num_processes} (e.g. {num_processes * max(1, total_batch_size // num_processes)})."
        )
    return total_batch_size // num_processes


def save_embeddings(
    directory: str | Path, split: str, rows: list[int], features: torch.Tensor, labels: torch.Tensor, names
) -> Path:
    """Write one split's features as `<directory>/<split>.parquet`, a `datasets` parquet file with
    columns `id` (the row index in the split), `split`, `label` (a ClassLabel when the classes have
    names) and `embedding` (float32, fixed length)."""
    found = embedding.Embeddings(
        ids=torch.as_tensor(rows), paths=None, labels=labels, embeddings=features, label_names=names
    )
    return embedding.write_embeddings(Path(directory) / f"{split}.parquet", found, constants={"split": split})


def resolve_commit(model_name_or_path: str, revision: str | None) -> str | None:
    """The commit hash of a Hub (or Hub-cache) checkpoint; None for a local folder."""
    if Path(model_name_or_path).is_dir():
        return None
    resolved = cached_file(model_name_or_path, "config.json", revision=revision)
    return extract_commit_hash(resolved, None)


def hyperparameters(protocol) -> dict:
    """The numeric keyword defaults of a protocol function (epochs, lr, ...), recorded with its results."""
    return {
        name: p.default
        for name, p in inspect.signature(protocol).parameters.items()
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }


class EvalData(NamedTuple):
    """The labelled train (bank) and evaluation splits, their columns and what the results record."""

    train: Any
    validation: Any
    train_labels: list[int]
    eval_labels: list[int]
    train_rows: list[int]
    eval_rows: list[int]
    image_column: str
    names: list[str] | None
    num_classes: int
    validation_split: str
    record: dict


def load_data(args) -> EvalData:
    """Both labelled splits (`--max_*_samples` applied); a `DataError` names what does not fit."""
    train, validation, validation_split, image_column, label_column, names = load_labelled_splits(
        args.dataset_name, args.dataset_config_name, args.train_dir, args.train_split,
        args.validation_split, args.validation_dir, args.cache_dir, args.image_column, args.label_column,
    )  # fmt: skip
    train, train_labels, train_rows = labelled_rows(
        train, args.train_split, label_column, names, args.max_train_samples, args.seed
    )
    validation, eval_labels, eval_rows = labelled_rows(
        validation, validation_split, label_column, names, args.max_eval_samples, args.seed
    )
    record = {
        "name": args.dataset_name or args.validation_dir or args.train_dir or BUNDLED_DATASET_NAME,
        "config": args.dataset_config_name,
        "split": validation_split,
        "train_split": args.train_split,
        "num_train_samples": len(train_labels),
        "num_eval_samples": len(eval_labels),
    }
    num_classes = len(names) if names else max(train_labels + eval_labels) + 1
    return EvalData(
        train, validation, train_labels, eval_labels, train_rows, eval_rows, image_column, names,
        num_classes, validation_split, record,
    )  # fmt: skip


def make_loader(dataset, labels, data: EvalData, image_size, mean, std, args, accelerator, augmented=False):
    """Normalised batches of a labelled split: eval views (resize + centre crop), or for the augmented
    linear protocol view1 of the two-view rows (RandomResizedCrop 0.08-1, bicubic, + flip, seeded per
    epoch), at the per-process share of the global `--total_batch_size`."""
    common = {
        "image_column": data.image_column,
        "label_column": None,
        "image_size": image_size,
        "labels": labels,
    }
    if augmented:
        crops = TwoViewAugmentation(view1=ViewAugmentation(), view2=ViewAugmentation())
        rows = ImageViewDataset(dataset, mode="two_view", augmentation=crops, seed=args.seed, **common)
    else:
        rows = ImageViewDataset(dataset, mode="eval", **common)
    batches = torch.utils.data.DataLoader(
        rows,
        batch_size=per_process_batch_size(args.total_batch_size, accelerator.num_processes),
        shuffle=augmented,
        drop_last=False,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
        collate_fn=ExampleCollator(),
    )
    return NormalizedBatches(accelerator.prepare(batches), mean, std)


def knn_protocol(args, x_train, y_train, x_eval, y_eval, num_classes, device, features: str) -> dict:
    """Cosine kNN at every `--knn_k`; the first k is the headline number."""
    by_k = {}
    for k in args.knn_k:
        by_k[str(k)] = knn_accuracy(
            x_train.to(device),
            y_train,
            x_eval.to(device),
            y_eval,
            num_classes,
            k=k,
            temperature=args.knn_temperature,
        )
        logger.info("kNN k=%d T=%g: %s", k, args.knn_temperature, by_k[str(k)])
    return {
        "k": args.knn_k[0],
        "temperature": args.knn_temperature,
        "similarity": "cosine",
        "features": f"{features}, un-augmented, L2-normalised",
        "by_k": by_k,
        **by_k[str(args.knn_k[0])],
    }


def linear_protocol(args, model, loader, features_or_none, num_classes, accelerator, features: str) -> dict:
    """The linear evaluation: the exact logistic-regression probe on precomputed features
    (`--precompute_features`), or the official protocol (SGD head on augmented images, cosine or step
    schedule). Returns the protocol record with its `top1`/`top5`."""
    if args.precompute_features:
        settings = hyperparameters(linear_probe)
        linear = linear_probe(*features_or_none, num_classes, **settings)
        return {
            "method": "logistic regression on frozen precomputed features, standardised, solved to its "
            "optimum (full-batch L-BFGS): mean cross-entropy + weight_decay / 2 * ||W||^2",
            "features": f"{features}, un-augmented",
            **settings,
            "objective": linear["objective"],
            "iterations": linear["iterations"],
            "top1": linear["top1"],
            "top5": linear["top5"],
        }
    settings = {
        **hyperparameters(linear_eval),
        **{name: getattr(args, flag) for flag, name in LINEAR_FLAGS.items()},
        "seed": args.seed,
    }
    unused = ("lr_step_size", "lr_gamma") if args.linear_lr_schedule == "cosine" else ("min_lr",)
    schedule = (
        "cosine per epoch from lr to min_lr"
        if args.linear_lr_schedule == "cosine"
        else "step per epoch: lr * lr_gamma ** (epoch // lr_step_size)"
    )
    linear = linear_eval(
        model,
        loader("train", augmented=True),
        loader("validation"),
        num_classes,
        accelerator=accelerator,
        use_projector=args.use_projector,
        progress_bar=True,
        **settings,
    )
    return {
        "method": "linear head on the frozen eval-mode backbone, augmented images (official protocol)",
        "features": features,
        "optimizer": f"SGD, {schedule}",
        **{key: value for key, value in settings.items() if key not in unused},
        "batch_size": args.total_batch_size,
        "train_transform": "RandomResizedCrop(0.08-1, bicubic) + horizontal flip",
        "test_transform": "resize 8/7 + centre crop",
        "top1": linear["top1"],
        "top5": linear["top5"],
    }


@exits_on_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    for line in (
        use_every_core(accelerator.device, accelerator.num_processes),
        reuse_host_memory(args.reuse_host_memory, accelerator.device),
    ):
        if line is not None:
            logger.info(line)
    set_seed(args.seed)

    data = load_data(args)  # data first: a dataset problem should surface before minutes of model loading
    if args.output_dir:
        check_eval_results(args.output_dir, data.record)
    model = AutoModel.from_pretrained(
        args.model_name_or_path, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    model.to(accelerator.device)
    image_size, mean, std = embedding.preprocessing(
        model.config, args.model_name_or_path, args.revision, args.trust_remote_code
    )
    image_size = args.image_size or image_size
    logger.info(
        "%s: %d train / %d %s images, %d classes, %dpx crops; %s features",
        data.record["name"], len(data.train_labels), len(data.eval_labels), data.validation_split,
        data.num_classes, image_size, "projector" if args.use_projector else "backbone",
    )  # fmt: skip

    def loader(split: str, augmented: bool = False):
        dataset, labels = (
            (data.train, data.train_labels) if split == "train" else (data.validation, data.eval_labels)
        )
        return make_loader(dataset, labels, data, image_size, mean, std, args, accelerator, augmented)

    results: dict = {
        "model_name_or_path": args.model_name_or_path,
        "revision": resolve_commit(args.model_name_or_path, args.revision),
        "dataset": data.record,
    }
    computed = None
    if args.protocol in ("knn", "all") or args.precompute_features or args.save_embeddings:
        x_train, y_train = extract_features(
            model, loader("train"), accelerator, args.use_projector, progress_bar=True
        )
        x_eval, y_eval = extract_features(
            model, loader("validation"), accelerator, args.use_projector, progress_bar=True
        )
        computed = (x_train, y_train, x_eval, y_eval)
    if args.save_embeddings and accelerator.is_main_process:
        write_embeddings(args, data, computed)
    results["protocols"] = run_protocols(args, model, loader, computed, data, accelerator, image_size)
    for name, protocol in results["protocols"].items():
        results.update({f"{name}_top1": protocol.pop("top1"), f"{name}_top5": protocol.pop("top5")})

    if accelerator.is_main_process:
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            update_eval_results(args.output_dir, results)
            logger.info("results merged into %s", Path(args.output_dir) / "eval_results.json")
        print(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


def write_embeddings(args, data, computed) -> None:
    """`--save_embeddings`: each split's features as DIR/<split>.parquet."""
    x_train, y_train, x_eval, y_eval = computed
    # Two image folders both load as a "train" split: the evaluation one is then named "validation".
    eval_name = data.validation_split if data.validation_split != args.train_split else "validation"
    for split, rows, x, y in (
        (args.train_split, data.train_rows, x_train, y_train),
        (eval_name, data.eval_rows, x_eval, y_eval),
    ):
        path = save_embeddings(args.save_embeddings, split, rows, x, y, data.names)
        logger.info("%s embeddings written to %s", split, path)


def run_protocols(args, model, loader, computed, data, accelerator, image_size: int) -> dict:
    """The kNN and linear protocols of `--protocol`: {name: {top1, top5, settings...}}."""
    features = "projector output" if args.use_projector else "backbone pooler_output"
    protocols: dict = {}
    if args.protocol in ("knn", "all"):
        protocols["knn"] = knn_protocol(args, *computed, data.num_classes, accelerator.device, features)
    if args.protocol in ("linear", "all"):
        protocols["linear"] = linear_protocol(
            args, model, loader, computed, data.num_classes, accelerator, features
        )
        logger.info(
            "linear (%s): %s", "precomputed" if args.precompute_features else "augmented", protocols["linear"]
        )
    for protocol in protocols.values():
        protocol.update(train_split=args.train_split, image_size=image_size)
    return protocols


if __name__ == "__main__":
    main()
