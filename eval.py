#!/usr/bin/env python
"""Evaluate a pretrained encoder on frozen features: weighted kNN and linear probes.

    python eval.py --model_name_or_path outputs/corinfomax --output_dir outputs/corinfomax   # kNN, bundled data
    python eval.py --model_name_or_path outputs/corinfomax --protocol all --precompute_features
    accelerate launch eval.py --model_name_or_path org/corinfomax-resnet18-cifar10 --revision main \\
        --dataset_name uoft-cs/cifar10 --validation_split test --protocol all --output_dir results/cifar10

Protocols (section 4 of the SSL anchors notes):
- `knn`: DINO/InstDisc weighted kNN on L2-normalised backbone features of un-augmented train images,
  cosine similarity, eval-mode BatchNorm; k=20 and k=200 at T=0.07 (`--knn_temperature 0.1` for the
  lightly/VISSL convention).
- `linear`: the paper's linear evaluation (frozen eval-mode backbone, SGD lr 0.2 momentum 0.9, cosine
  to 2e-3, 100 epochs, batch 256, RandomResizedCrop + flip; test images resized to 8/7 and
  centre-cropped), or with `--precompute_features` a logistic regression on precomputed features
  (seconds instead of 100 passes through the backbone; a different, augmentation-free protocol).

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

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import cached_file, extract_commit_hash

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax.data import (
    DataError,
    ExampleCollator,
    ImageRows,
    TwoViewAugmentation,
    ViewAugmentation,
    class_indices,
    class_names,
    data_error_message,
    load_image_dataset,
    normalize_batch,
    resolve_columns,
)
from modeling_corinfomax.evaluation import (
    check_eval_results,
    extract_features,
    knn_accuracy,
    linear_eval,
    linear_probe,
    update_eval_results,
)

logger = logging.getLogger("corinfomax.eval")

# Same name as train.py's report, so their results merge into one eval_results.json.
BUNDLED_DATASET_NAME = "bundled fashion-mnist subset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="local folder or Hub id of the checkpoint")
    g.add_argument("--revision", default=None, help="branch, tag or commit of a Hub checkpoint")
    g.add_argument("--trust_remote_code", action="store_true", help="load the model code from the checkpoint")
    g.add_argument(
        "--use_projector", action="store_true", help="evaluate projector outputs, not the backbone"
    )
    g.add_argument("--image_size", type=int, default=None, help="crop size (default: the checkpoint's)")

    g = parser.add_argument_group("data (default: the bundled Fashion-MNIST subset)")
    g.add_argument("--dataset_name", default=None, help="a Hub dataset id or anything `load_dataset` takes")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_dir", default=None, help="image folder (class sub-folders) of training images")
    g.add_argument("--validation_dir", default=None, help="image folder of evaluation images")
    g.add_argument("--train_split", default="train")
    g.add_argument("--validation_split", default=None, help="default: 'validation', else 'test'")
    g.add_argument("--image_column", default=None, help="default: the Image column, if there is one")
    g.add_argument("--label_column", default=None, help="default: the ClassLabel column, if there is one")
    g.add_argument("--max_train_samples", type=int, default=None, help="random subset (seeded) of train")
    g.add_argument("--max_eval_samples", type=int, default=None, help="random subset (seeded) of validation")
    g.add_argument("--cache_dir", default=None)

    g = parser.add_argument_group("protocols")
    g.add_argument("--protocol", choices=["knn", "linear", "all"], default="knn")
    g.add_argument(
        "--knn_k", type=int, nargs="+", default=[20, 200], help="neighbours; the first is reported"
    )
    g.add_argument("--knn_temperature", type=float, default=0.07, help="0.07 (DINO) or 0.1 (lightly, VISSL)")
    g.add_argument(
        "--precompute_features",
        action="store_true",
        help="linear probe on precomputed un-augmented features (fast) instead of the augmented protocol",
    )
    g.add_argument(
        "--linear_epochs", type=int, default=None, help="default: 100 (augmented), 50 (precomputed)"
    )
    g.add_argument(
        "--linear_lr", type=float, default=None, help="default: 0.2 (augmented, SGD), 0.05 (AdamW)"
    )
    g.add_argument(
        "--per_device_batch_size",
        type=int,
        default=256,
        help="batch size per process for features and the augmented linear protocol (the paper: 256 in all)",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output_dir", default=None, help="where eval_results.json goes (default: only printed)")
    args = parser.parse_args(argv)
    if args.dataset_name and (args.train_dir or args.validation_dir):
        parser.error("pass either --dataset_name or --train_dir/--validation_dir, not both.")
    if args.validation_dir and not args.train_dir:
        parser.error("--validation_dir needs --train_dir (the kNN bank and the probe's training images).")
    if any(k < 1 for k in args.knn_k):
        parser.error(f"--knn_k {args.knn_k}: every k must be >= 1.")
    return args


def resolve_commit(model_name_or_path: str, revision: str | None) -> str | None:
    """The commit hash of a Hub (or Hub-cache) checkpoint; None for a local folder."""
    if Path(model_name_or_path).is_dir():
        return None
    resolved = cached_file(model_name_or_path, "config.json", revision=revision)
    return extract_commit_hash(resolved, None)


def preprocessing(args, config) -> tuple[int, list[float], list[float]]:
    """Crop size, mean and std: from the CorInfoMax config, else from the checkpoint's image processor."""
    if all(hasattr(config, key) for key in ("image_size", "image_mean", "image_std")):
        size, mean, std = config.image_size, config.image_mean, config.image_std
    else:
        processor = AutoImageProcessor.from_pretrained(
            args.model_name_or_path, revision=args.revision, trust_remote_code=args.trust_remote_code
        )
        crop = getattr(processor, "crop_size", None) or processor.size
        size = crop.get("height") or crop.get("shortest_edge")
        mean, std = processor.image_mean, processor.image_std
    return args.image_size or int(size), list(mean), list(std)


def hyperparameters(protocol) -> dict:
    """The numeric keyword defaults of a protocol function (epochs, lr, ...), recorded with its results."""
    return {
        name: p.default
        for name, p in inspect.signature(protocol).parameters.items()
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }


def load_split(args, split: str, folder: str | None):
    return load_image_dataset(
        args.dataset_name, args.dataset_config_name, folder, split, cache_dir=args.cache_dir
    )


def load_validation(args):
    """The evaluation split's name and rows: --validation_dir, --validation_split, else 'validation' or 'test'."""
    if args.validation_dir:  # a plain image folder loads as a "train" split
        split = args.validation_split or "train"
        return split, load_split(args, split, args.validation_dir)
    if args.validation_split:
        return args.validation_split, load_split(args, args.validation_split, args.train_dir)
    for split in ("validation", "test"):
        try:
            return split, load_split(args, split, args.train_dir)
        except DataError:
            pass
    raise DataError("no 'validation' or 'test' split found: pass --validation_split or --validation_dir.")


def labelled(dataset, split: str, label_column: str, names, max_samples: int | None, seed: int):
    """The labelled rows of a split (a seeded random subset with `max_samples`) and their class indices."""
    labels = class_indices(dataset, label_column, names, split)
    keep = [i for i, label in enumerate(labels) if label >= 0]
    if not keep:
        raise DataError(
            f"the {split!r} split has no labelled image: pass a labelled split or --label_column."
        )
    if max_samples is not None and max_samples < len(keep):
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:max_samples]
        keep = sorted(keep[i] for i in order.tolist())
    if len(keep) < len(labels):
        dataset = dataset.select(keep)
    return dataset, [labels[i] for i in keep]


class Collator:
    """uint8 rows from `ImageRows` -> normalised `pixel_values` and `labels` (view1 for augmented rows)."""

    def __init__(self, mean, std):
        self.mean, self.std, self.rows = mean, std, ExampleCollator()

    def __call__(self, examples):
        batch = self.rows(examples)
        images = batch["pixel_values"] if "pixel_values" in batch else batch["view1"]
        return {"pixel_values": normalize_batch(images, self.mean, self.std), "labels": batch["labels"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(args.seed)

    # Data first: a dataset problem should surface before minutes of model loading.
    try:
        train = load_split(args, args.train_split, args.train_dir)
        validation_split, validation = load_validation(args)
        image_column, label_column = resolve_columns(
            train, args.image_column, args.label_column, need_label=True
        )
        resolve_columns(validation, image_column, label_column, need_label=True)
        names = class_names(train, label_column)
        train, train_labels = labelled(
            train, args.train_split, label_column, names, args.max_train_samples, args.seed
        )
        validation, eval_labels = labelled(
            validation, validation_split, label_column, names, args.max_eval_samples, args.seed
        )
    except DataError as error:
        raise SystemExit(f"eval.py: {data_error_message(error)}") from None
    num_classes = len(names) if names else max(train_labels + eval_labels) + 1
    dataset = {
        "name": args.dataset_name or args.validation_dir or args.train_dir or BUNDLED_DATASET_NAME,
        "config": args.dataset_config_name,
        "split": validation_split,
        "train_split": args.train_split,
        "num_train_samples": len(train_labels),
        "num_eval_samples": len(eval_labels),
    }
    if args.output_dir:
        check_eval_results(args.output_dir, dataset)

    model = AutoModel.from_pretrained(
        args.model_name_or_path, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    model.to(accelerator.device)
    image_size, mean, std = preprocessing(args, model.config)
    logger.info(
        "%s: %d train / %d %s images, %d classes, %dpx crops; %s features",
        dataset["name"],
        len(train_labels),
        len(eval_labels),
        validation_split,
        num_classes,
        image_size,
        "projector" if args.use_projector else "backbone",
    )

    def loader(dataset, labels, augmented: bool = False):
        common = {
            "image_column": image_column,
            "label_column": None,
            "image_size": image_size,
            "labels": labels,
        }
        if augmented:
            # view1 of the two-view rows: RandomResizedCrop (0.08-1, bicubic) + flip, seeded per epoch.
            crops = TwoViewAugmentation(view1=ViewAugmentation(), view2=ViewAugmentation())
            rows = ImageRows(dataset, mode="two_view", augmentation=crops, seed=args.seed, **common)
        else:
            rows = ImageRows(dataset, mode="eval", **common)
        return accelerator.prepare(
            torch.utils.data.DataLoader(
                rows,
                batch_size=args.per_device_batch_size,
                shuffle=augmented,
                drop_last=False,
                num_workers=args.dataloader_num_workers,
                pin_memory=accelerator.device.type == "cuda",
                collate_fn=Collator(mean, std),
            )
        )

    features = "projector output" if args.use_projector else "backbone pooler_output"
    results: dict = {
        "model_name_or_path": args.model_name_or_path,
        "revision": resolve_commit(args.model_name_or_path, args.revision),
        "dataset": dataset,
    }
    protocols: dict = {}
    need_features = args.protocol in ("knn", "all") or args.precompute_features
    if need_features:
        x_train, y_train = extract_features(
            model, loader(train, train_labels), accelerator, args.use_projector, progress_bar=True
        )
        x_eval, y_eval = extract_features(
            model, loader(validation, eval_labels), accelerator, args.use_projector, progress_bar=True
        )

    if args.protocol in ("knn", "all"):
        by_k = {}
        for k in args.knn_k:
            by_k[str(k)] = knn_accuracy(
                x_train.to(accelerator.device),
                y_train,
                x_eval.to(accelerator.device),
                y_eval,
                num_classes,
                k=k,
                temperature=args.knn_temperature,
            )
            logger.info("kNN k=%d T=%g: %s", k, args.knn_temperature, by_k[str(k)])
        first = by_k[str(args.knn_k[0])]
        results.update(knn_top1=first["top1"], knn_top5=first["top5"])
        protocols["knn"] = {
            "k": args.knn_k[0],
            "temperature": args.knn_temperature,
            "similarity": "cosine",
            "features": f"{features}, un-augmented, L2-normalised",
            "by_k": by_k,
        }

    if args.protocol in ("linear", "all"):
        probe = linear_probe if args.precompute_features else linear_eval
        overrides = {"epochs": args.linear_epochs, "lr": args.linear_lr, "seed": args.seed}
        settings = {**hyperparameters(probe), **{k: v for k, v in overrides.items() if v is not None}}
        if args.precompute_features:
            linear = linear_probe(x_train, y_train, x_eval, y_eval, num_classes, **settings)
            protocols["linear"] = {
                "method": "logistic regression on frozen precomputed features (AdamW, cosine, standardised)",
                "features": f"{features}, un-augmented",
                **settings,
            }
        else:
            linear = linear_eval(
                model,
                loader(train, train_labels, augmented=True),
                loader(validation, eval_labels),
                num_classes,
                accelerator=accelerator,
                use_projector=args.use_projector,
                progress_bar=True,
                **settings,
            )
            protocols["linear"] = {
                "method": "linear head on the frozen eval-mode backbone, augmented images (official protocol)",
                "features": features,
                "optimizer": "SGD, cosine per epoch from lr to min_lr",
                **settings,
                "batch_size": args.per_device_batch_size * accelerator.num_processes,
                "train_transform": "RandomResizedCrop(0.08-1, bicubic) + horizontal flip",
                "test_transform": "resize 8/7 + centre crop",
            }
        logger.info("linear (%s): %s", "precomputed" if args.precompute_features else "augmented", linear)
        results.update(linear_top1=linear["top1"], linear_top5=linear["top5"])
        protocols["linear"].update(train_split=args.train_split, image_size=image_size)
    if "knn" in protocols:
        protocols["knn"].update(train_split=args.train_split, image_size=image_size)
    results["protocols"] = protocols

    if accelerator.is_main_process:
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            update_eval_results(args.output_dir, results)
            logger.info("results merged into %s", Path(args.output_dir) / "eval_results.json")
        print(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
