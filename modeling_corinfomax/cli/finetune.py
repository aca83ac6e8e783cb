#!/usr/bin/env python
"""Fine-tune (or linear-probe) a CorInfoMax checkpoint for image classification with the Trainer.

    python finetune.py --model_name_or_path outputs/corinfomax --output_dir outputs/corinfomax-ft \\
        --do_train --do_eval --num_train_epochs 5 --learning_rate 1e-3 --per_device_train_batch_size 64
    # semi-supervised protocol: a fixed, seeded, class-balanced 1% (or 10%) of the training labels
    python finetune.py --model_name_or_path org/corinfomax-resnet50-in1k --dataset_name ILSVRC/imagenet-1k \\
        --train_fraction 0.01 --do_train --do_eval --output_dir outputs/in1k-1pct --push_to_hub
    # linear probe through the Trainer (frozen backbone with eval-mode BatchNorm)
    python finetune.py --model_name_or_path outputs/corinfomax --freeze_backbone --do_train --do_eval ...

In the shape of transformers' `examples/pytorch/image-classification/run_image_classification.py`:
`ModelArguments`, `DataTrainingArguments` and every `TrainingArguments` flag. The classification head
is new (the pretraining checkpoint has a projector instead); the transforms come from the checkpoint's
image processor (RandomResizedCrop + flip for training, resize + centre crop for evaluation). Without
dataset flags the bundled Fashion-MNIST subset is used. Metrics: top-1 (`accuracy`) and top-5
(`accuracy_top5`); `finetune_top1`/`finetune_top5` are merged into `<output_dir>/eval_results.json`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from torchvision.transforms import InterpolationMode, v2
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax.cli.flags import exits_on_error
from modeling_corinfomax.data import (
    labelled_rows,
    load_labelled_splits,
    to_rgb,
)
from modeling_corinfomax.errors import ConfigurationError
from modeling_corinfomax.evaluation import (
    BUNDLED_DATASET_NAME,
    check_eval_results,
    class_balanced_subset,
    update_eval_results,
)

logger = logging.getLogger("corinfomax.finetune")


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (default: the bundled Fashion-MNIST subset)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id (or a local dataset)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder (class sub-folders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder for evaluation."})
    train_split: str = field(default="train", metadata={"help": "The training split."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Default: 'validation', else 'test'."}
    )
    # The same names as train.py and eval.py; the HF example's `--image_column_name` works too.
    image_column: str | None = field(
        default=None, metadata={"help": "Default: the Image column.", "aliases": ["--image_column_name"]}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Default: the ClassLabel column.", "aliases": ["--label_column_name"]}
    )
    train_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Semi-supervised protocol: train on a fixed, seeded (--data_seed, else --seed), class-balanced "
            "fraction of the labels, e.g. 0.01 or 0.1 (at least one image per class)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set (debug)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set (debug)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "The datasets cache folder."})

    def __post_init__(self):
        if self.dataset_name and (self.train_dir or self.validation_dir):
            raise ValueError("pass either --dataset_name or --train_dir/--validation_dir, not both.")
        if self.validation_dir and not self.train_dir:
            raise ValueError("--validation_dir needs --train_dir.")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"--train_fraction {self.train_fraction} must be in (0, 1], e.g. 0.01 or 0.1.")


@dataclass
class ModelArguments:
    """Which checkpoint to fine-tune."""

    model_name_or_path: str = field(metadata={"help": "A CorInfoMax checkpoint: local folder or Hub id."})
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Default: the checkpoint's."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load the model code from the checkpoint."}
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Train only the head (a linear probe); BatchNorm stays in eval mode."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a classifier head of another size (a fine-tuned checkpoint)."},
    )
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


def with_labels(dataset, split: str, image_column: str, label_column: str, names):
    """The image column and checked class indices as `labels` (`evaluation.labelled_rows`: rows without
    a label are dropped), the columns Trainer's transforms and collator read."""
    dataset, labels, _ = labelled_rows(dataset, split, label_column, names)
    return dataset.select_columns([image_column]).add_column("labels", labels)


def build_transforms(image_processor) -> tuple[v2.Compose, v2.Compose]:
    """Train (RandomResizedCrop + flip) and eval (resize + centre crop) transforms sized and normalised as
    the checkpoint's image processor."""
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    crop_size = (crop["height"], crop["width"]) if "height" in crop else crop["shortest_edge"]
    size = image_processor.size
    resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    interpolation = InterpolationMode.BICUBIC
    tensor = [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(image_processor.image_mean, image_processor.image_std),
    ]
    train = v2.Compose(
        [v2.RandomResizedCrop(crop_size, interpolation=interpolation), v2.RandomHorizontalFlip(), *tensor]
    )
    evaluation = v2.Compose(
        [v2.Resize(resize, interpolation=interpolation), v2.CenterCrop(crop_size), *tensor]
    )
    return train, evaluation


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


def compute_metrics(eval_pred) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions, as the `evaluate` accuracy metric) from the logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    ranked = np.argsort(-logits, axis=1)[:, :5]
    return {
        "accuracy": float((ranked[:, 0] == labels).mean()),
        "accuracy_top5": float((ranked == labels[:, None]).any(axis=1).mean()),
    }


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def labelled_splits(data_args, training_args):
    """The train and evaluation splits with checked `labels` (`--train_fraction` and `--max_*_samples`
    applied), their image column, the class names and the dataset record of the results."""
    train, validation, validation_split, image_column, label_column, names = load_labelled_splits(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.train_split,
        data_args.validation_split, data_args.validation_dir, data_args.cache_dir, data_args.image_column,
        data_args.label_column,
    )  # fmt: skip
    train = with_labels(train, data_args.train_split, image_column, label_column, names)
    validation = with_labels(validation, validation_split, image_column, label_column, names)
    if names is None:
        names = [str(i) for i in range(max(train["labels"] + validation["labels"]) + 1)]
    if data_args.train_fraction is not None:
        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        train = train.select(class_balanced_subset(train["labels"], data_args.train_fraction, seed))
        logger.info(
            "train_fraction=%g: %d labelled images (%s per class)",
            data_args.train_fraction,
            len(train),
            sorted(set(np.bincount(train["labels"], minlength=len(names)).tolist())),
        )
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(
            range(min(data_args.max_train_samples, len(train)))
        )
    if data_args.max_eval_samples is not None:
        validation = validation.shuffle(seed=training_args.seed).select(
            range(min(data_args.max_eval_samples, len(validation)))
        )
    record = {
        "name": data_args.dataset_name
        or data_args.validation_dir
        or data_args.train_dir
        or BUNDLED_DATASET_NAME,
        "config": data_args.dataset_config_name,
        "split": validation_split,
    }
    return train, validation, image_column, names, record


def record_results(trainer, metrics, model_args, data_args, training_args, num_train_samples, dataset_record):
    """Trainer's metrics merged into all_results.json, ours into eval_results.json (not
    `trainer.save_metrics("eval")`: it would overwrite eval_results.json, which eval.py and the model card
    share)."""
    all_results = Path(training_args.output_dir) / "all_results.json"
    previous = json.loads(all_results.read_text()) if all_results.is_file() else {}
    all_results.write_text(json.dumps({**previous, **metrics}, indent=4, sort_keys=True) + "\n")
    protocol = {
        "model_name_or_path": model_args.model_name_or_path,
        "freeze_backbone": model_args.freeze_backbone,
        "train_fraction": data_args.train_fraction,
        "num_train_samples": num_train_samples,
        "train_split": data_args.train_split,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "steps": trainer.state.global_step,
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
        "batch_size": training_args.per_device_train_batch_size * training_args.world_size,
        "train_transform": "RandomResizedCrop + horizontal flip",
        "test_transform": "resize + centre crop (image processor)",
    }
    update_eval_results(
        training_args.output_dir,
        {
            "finetune_top1": 100.0 * metrics["eval_accuracy"],
            "finetune_top5": 100.0 * metrics["eval_accuracy_top5"],
            "dataset": dataset_record,
            "protocols": {"finetune": protocol},
        },
    )


@exits_on_error
def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    setup_logging(training_args)
    if training_args.remove_unused_columns:
        # The transforms read the image column, which Trainer would drop before they run (it is not a
        # forward argument): the classic "--remove_unused_columns False" error of the HF example.
        logger.info("remove_unused_columns set to False: the image transforms need the image column.")
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    train, validation, image_column, names, dataset_record = labelled_splits(data_args, training_args)
    if training_args.do_eval:
        check_eval_results(training_args.output_dir, dataset_record)

    model, image_processor = load_model(model_args, names)
    train_transform, eval_transform = build_transforms(image_processor)

    def transform(pipeline):
        def apply(batch):
            batch["pixel_values"] = [pipeline(to_rgb(image)) for image in batch[image_column]]
            return batch

        return apply

    train.set_transform(transform(train_transform))
    validation.set_transform(transform(eval_transform))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train if training_args.do_train else None,
        eval_dataset=validation if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            record_results(trainer, metrics, model_args, data_args, training_args, len(train), dataset_record)

    publish_card(trainer, model_args, data_args, training_args)


def load_model(model_args, names: list[str]):
    """The classification model (a new head of `len(names)` classes) and its image processor."""
    label2id = {name: i for i, name in enumerate(names)}
    id2label = dict(enumerate(names))
    common = {
        "revision": model_args.revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(names),
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **common,
    )
    if model_args.freeze_backbone:
        if not hasattr(model, "set_freeze_backbone"):
            raise ConfigurationError(
                f"--freeze_backbone needs a CorInfoMax checkpoint; {type(model).__name__} has no "
                "set_freeze_backbone. Drop the flag to fine-tune the whole model."
            )
        model.set_freeze_backbone(True)
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **common
    )
    return model, image_processor


def publish_card(trainer, model_args, data_args, training_args) -> None:
    """The model card, pushed with the model under `--push_to_hub`, else written next to it."""
    kwargs = {"tasks": "image-classification", "tags": ["image-classification", "vision", "corinfomax"]}
    if not os.path.isdir(model_args.model_name_or_path):  # a local path would become a broken Hub link
        kwargs["finetuned_from"] = model_args.model_name_or_path
    if data_args.dataset_name:
        kwargs["dataset"] = data_args.dataset_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
