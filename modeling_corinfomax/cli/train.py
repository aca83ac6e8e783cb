#!/usr/bin/env python
"""Pretrain a CorInfoMax image encoder with Accelerate on a `datasets` image corpus.

    accelerate launch train.py                                   # bundled Fashion-MNIST demo (CPU, ~10 min)
    accelerate launch train.py --preset cifar10                  # the paper's CIFAR-10 run from the Hub
    accelerate launch --multi_gpu train.py --preset imagenet1k-r50 --dataset_name ILSVRC/imagenet-1k
    accelerate launch train.py --train_dir path/to/images --backbone convnext_tiny --image_size 224

Flags follow transformers' `run_image_classification_no_trainer.py`; every `CorInfoMaxConfig` field
is a flag of the same name. Precedence: built-in defaults < `--preset` < `--config` file < flags.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import broadcast, is_tensorboard_available, is_wandb_available, set_seed
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax import (
    CorInfoMaxConfig,
    CorInfoMaxForPreTraining,
    CorInfoMaxModel,
    CorInfoMaxNumericalError,
    covariance_eigenvalues,
)
from modeling_corinfomax.data import (
    BatchViewAugment,
    CachedRows,
    DataError,
    DecodedImages,
    EpochShuffleSampler,
    ExampleCollator,
    ImageRows,
    StreamingImageRows,
    TwoViewAugmentation,
    class_indices,
    class_names,
    data_error_message,
    eval_view,
    load_image_dataset,
    normalize_batch,
    resolve_columns,
    split_stream,
)
from modeling_corinfomax.hardware import choose_cpu_threads, choose_mixed_precision
from modeling_corinfomax.monitoring import CollapseMonitor, rankme, spectrum_summary
from modeling_corinfomax.presets import PRESETS

logger = logging.getLogger("corinfomax.train")

# The no-argument run: the bundled Fashion-MNIST demo, sized for 10 minutes on 2 CPU cores.
DEFAULTS: dict = {
    # data
    "dataset_name": None,
    "dataset_config_name": None,
    "train_dir": None,
    "train_split": "train",
    "validation_split": "test",
    "image_column": None,
    "label_column": None,
    "max_train_samples": None,
    "max_eval_samples": 2000,
    "streaming": False,
    "cache_dir": None,
    "skip_bad_images": False,
    "augmentation": {
        "view1": {
            "crop_scale": [0.4, 1.0],
            "hue": 0.0,
            "saturation": 0.0,
            "blur_p": 0.5,
            "blur_sigma": [0.1, 1.0],
        },
        "view2": {
            "crop_scale": [0.4, 1.0],
            "hue": 0.0,
            "saturation": 0.0,
            "blur_p": 0.1,
            "blur_sigma": [0.1, 1.0],
            "solarize_p": 0.2,
        },
    },
    # model (CorInfoMaxConfig fields)
    "backbone": "resnet18",
    "backbone_kwargs": {},
    "cifar_stem": False,
    "projector_dims": [1024, 1024, 64],
    "projector_batchnorm": False,
    "normalize": True,
    "alpha": 250.0,
    "lambda_R": 0.01,
    "lambda_mu": 0.01,
    "R_init": 1.0,
    "eps": 1e-8,
    "image_size": 28,
    "image_mean": [0.2860, 0.2860, 0.2860],
    "image_std": [0.3530, 0.3530, 0.3530],
    # optimisation
    "optimizer": "sgd",
    "learning_rate": 0.5,
    "lr_reference_batch_size": 256,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "exclude_bias_and_norm_from_wd": False,
    "per_device_train_batch_size": None,
    "total_batch_size": 256,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 8,
    "min_train_steps": 700,
    "max_train_steps": None,
    "time_budget_minutes": None,
    "warmup_epochs": 1.0,
    "warmup_start_lr": 3e-3,
    "min_lr": 1e-6,
    "seed": 0,
    # speed and distribution
    "mixed_precision": "auto",
    "num_threads": None,
    "channels_last": True,
    "torch_compile": False,
    "dataloader_num_workers": None,
    "image_cache": "auto",
    "image_cache_max_gb": 2.0,
    "sync_bn": False,
    # checkpoints, monitoring, output
    "output_dir": "outputs/corinfomax-demo",
    "checkpointing_steps": None,
    "resume_from_checkpoint": None,
    "save_total_limit": None,
    "report_to": "none",
    "logging_steps": 10,
    "eval_steps": None,
    "on_nan": "stop",
    "rankme_samples": 256,
    "collapse_window": 5,
    "collapse_rank_drop": 0.5,
    "collapse_min_rank": 0.05,
    "collapse_patience": 5,
    "save_best_by": "none",
    "do_eval": True,
    "eval_baselines": True,
    "max_eval_train_samples": None,
    "push_to_hub": False,
    "hub_model_id": None,
    "hub_token": None,
    "hub_private_repo": False,
}

UNFITTED_STEPS = 10**9  # the length of a budgeted run until its step time is measured (cosine ~ flat)
MAX_CONSECUTIVE_SKIPS = 10  # with --on_nan skip: more faults in a row mean the run has diverged
MODEL_STAGING = ".tmp-model"  # save_pretrained writes here, then the files are renamed into --output_dir
R_INIT_NEGLIGIBLE = 1e-3  # the collapse monitor reads the effective rank once R_init weighs less than this
BEST_MODEL, BEST_STATE = "best", "best_model.json"  # --save_best_by: <output_dir>/best/best_model.json

TRACKER_AVAILABLE = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}

# A data source given on the command line (or in --config) replaces the preset's source and everything
# tied to it; the preset keeps the recipe's hyperparameters.
DATA_SOURCE_KEYS = (
    "dataset_name", "dataset_config_name", "train_dir", "train_split", "validation_split", "image_column",
    "label_column",
)  # fmt: skip

CONFIG_FIELDS = (
    "backbone", "backbone_kwargs", "cifar_stem", "projector_dims", "projector_batchnorm", "normalize", "alpha",
    "lambda_R", "lambda_mu", "R_init", "eps", "image_size", "image_mean", "image_std",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; resolve defaults < --preset < --config < explicit flags; validate everything."""
    p = OneLineErrorParser(
        allow_abbrev=False,  # a misspelt flag is refused, never taken for a longer one
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("presets and config files")
    g.add_argument("--preset", choices=sorted(PRESETS), help="every hyperparameter of an original run")
    g.add_argument("--config", help="YAML or JSON file of flag values (unknown keys are refused)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", help="a Hub dataset id or anything datasets.load_dataset accepts")
    g.add_argument("--dataset_config_name")
    g.add_argument("--train_dir", help="a local folder of images (imagefolder)")
    g.add_argument("--train_split")
    g.add_argument("--validation_split", help="labelled split for monitoring and the final evaluation")
    # The HF examples' names (`--image_column_name`, as finetune.py) are accepted too.
    g.add_argument("--image_column", "--image_column_name", dest="image_column")
    g.add_argument(
        "--label_column", "--label_column_name", dest="label_column",
        help="optional: labels are used only for monitoring",
    )  # fmt: skip
    g.add_argument("--max_train_samples", type=int)
    g.add_argument("--max_eval_samples", type=int, help="size of the held-out split used for kNN monitoring")
    g.add_argument("--streaming", action=bool_flag)
    g.add_argument("--cache_dir")
    g.add_argument("--skip_bad_images", action=bool_flag, help="skip unreadable images (counted and logged)")
    g = p.add_argument_group("model (CorInfoMaxConfig fields)")
    g.add_argument("--backbone", help="any timm architecture name")
    g.add_argument(
        "--backbone_kwargs", type=json.loads, help='JSON, e.g. \'{"img_size": 32, "patch_size": 4}\''
    )
    g.add_argument("--cifar_stem", action=bool_flag)
    g.add_argument("--projector_dims", type=int, nargs="+")
    g.add_argument("--projector_batchnorm", action=bool_flag)
    g.add_argument("--normalize", action=bool_flag)
    g.add_argument("--alpha", type=float, help="invariance weight (official: sim_loss_weight)")
    g.add_argument("--lambda_R", type=float, help="covariance forgetting factor (official: la_R)")
    g.add_argument("--lambda_mu", type=float, help="mean forgetting factor (official: la_mu)")
    g.add_argument("--R_init", type=float, help="initial covariance scale (official: R_ini)")
    g.add_argument("--eps", type=float, help="log-det regulariser (official: R_eps_weight)")
    g.add_argument("--image_size", type=int)
    g.add_argument("--image_mean", type=float, nargs=3)
    g.add_argument("--image_std", type=float, nargs=3)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["sgd", "lars"])
    g.add_argument("--learning_rate", type=float, help="lr at --lr_reference_batch_size (scaled linearly)")
    g.add_argument("--lr_reference_batch_size", type=int)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--exclude_bias_and_norm_from_wd", action=bool_flag)
    g.add_argument("--per_device_train_batch_size", type=int)
    g.add_argument("--total_batch_size", type=int, help="global batch (used when per-device size is not set)")
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--num_train_epochs", type=float)
    g.add_argument(
        "--min_train_steps",
        type=int,
        help="unless --num_train_epochs or --max_train_steps is given, train at least this many steps "
        "(small datasets get enough optimisation)",
    )
    g.add_argument("--max_train_steps", type=int, help="exact number of steps (overrides the epochs)")
    g.add_argument(
        "--time_budget_minutes",
        type=float,
        help="size the run to this wall-clock budget: the step time is measured after a few steps and the "
        "warm-up + cosine schedule is fitted to end at the budget, leaving time for the final evaluation "
        "and save; an explicit --num_train_epochs/--max_train_steps caps it",
    )
    g.add_argument("--warmup_epochs", type=float)
    g.add_argument("--warmup_start_lr", type=float)
    g.add_argument("--min_lr", type=float)
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("speed and distribution")
    g.add_argument(
        "--mixed_precision",
        choices=["auto", "no", "fp16", "bf16"],
        help="auto: bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs with AMX or "
        "AVX512-BF16), else fp32, unless `accelerate launch --mixed_precision`/`accelerate config` says fp16 "
        "or bf16; no: fp32. The loss is float64 either way",
    )
    g.add_argument(
        "--num_threads",
        type=int,
        help="CPU threads per process (default: a count set with `accelerate launch "
        "--num_cpu_threads_per_process` or an exported OMP_NUM_THREADS, else cores / processes here)",
    )
    g.add_argument("--channels_last", action=bool_flag)
    g.add_argument("--torch_compile", action=bool_flag)
    g.add_argument("--dataloader_num_workers", type=int)
    g.add_argument(
        "--image_cache",
        choices=["auto", "on", "off"],
        help="decode the training split once into memory and crop whole batches (auto: when its images share "
        "one size and fit in --image_cache_max_gb; the evaluation views are kept in memory too); off: decode "
        "and crop per image in DataLoader workers, every epoch",
    )
    g.add_argument("--image_cache_max_gb", type=float, help="memory limit of --image_cache, per process")
    g.add_argument("--sync_bn", action=bool_flag)
    g = p.add_argument_group("checkpoints, monitoring and output")
    g.add_argument("--output_dir")
    g.add_argument("--checkpointing_steps", help="an integer number of steps, or 'epoch'")
    g.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest'")
    g.add_argument("--save_total_limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--logging_steps", type=int)
    g.add_argument("--eval_steps", type=int, help="kNN accuracy on the validation split every N steps")
    g.add_argument(
        "--on_nan", choices=["stop", "skip"], help="on a non-finite loss: checkpoint and stop, or skip"
    )
    g.add_argument(
        "--rankme_samples",
        type=int,
        help="training images (fixed at the start, un-augmented) whose pooled backbone embeddings give the "
        "RankMe logged every --logging_steps; 0: off",
    )
    g.add_argument(
        "--collapse_window",
        type=int,
        help="collapse warning: logging steps over which a fast fall of the effective rank is looked for",
    )
    g.add_argument(
        "--collapse_rank_drop",
        type=float,
        help="collapse warning: the fraction of the window's highest effective rank that, lost, is a collapse",
    )
    g.add_argument(
        "--collapse_min_rank",
        type=float,
        help="collapse warning: effective rank, as a fraction of the projection dimension, below which "
        "--collapse_patience logging steps in a row warn",
    )
    g.add_argument("--collapse_patience", type=int, help="see --collapse_min_rank")
    g.add_argument(
        "--save_best_by",
        choices=["none", "rankme"],
        help="rankme: keep the model of the logging step with the highest RankMe (a label-free score) in "
        "<output_dir>/best",
    )
    g.add_argument("--do_eval", action=bool_flag, help="final kNN + linear evaluation when labels exist")
    g.add_argument(
        "--eval_baselines", action=bool_flag, help="also evaluate random-init and raw-pixel baselines"
    )
    g.add_argument("--max_eval_train_samples", type=int, help="cap on the kNN bank / probe training set")
    g.add_argument("--push_to_hub", action=bool_flag)
    g.add_argument("--hub_model_id")
    g.add_argument("--hub_token")
    g.add_argument("--hub_private_repo", action=bool_flag)
    add_defaults_to_help(p)
    given = vars(p.parse_args(argv))

    chosen = {k: v for k, v in given.items() if k not in ("preset", "config")}
    if given.get("config"):
        from_file = read_config_file(given["config"])

        # The file's values go through the same parser as flags, so types and choices are checked alike.
        def config_error(message: str):
            raise SystemExit(f"error: --config {given['config']}: {message}")

        p.error = config_error
        chosen = {**from_file, **vars(p.parse_args(config_as_flags(from_file))), **chosen}
    preset = given.get("preset")
    values = {**DEFAULTS, **preset_values(preset, chosen), **chosen, "preset": preset}
    args = argparse.Namespace(**values)
    args.explicit = sorted(chosen)  # what the user set (flags or --config), for the run-length rules
    validate_args(args)
    return args


def preset_values(preset: str | None, chosen: dict) -> dict:
    """The preset's values; when the user names a data source (`--dataset_name`/`--train_dir`), the preset's
    source and everything tied to it (config, splits, columns) give way to the defaults, so columns are
    resolved for the new source while every hyperparameter of the recipe stays."""
    values = dict(PRESETS[preset]) if preset else {}
    if chosen.get("dataset_name") or chosen.get("train_dir"):
        for key in DATA_SOURCE_KEYS:
            values.pop(key, None)
    return values


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the problem and where to look), not usage + error."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (see {self.prog} --help)")


def add_defaults_to_help(parser: argparse.ArgumentParser) -> None:
    """Append each flag's built-in default to its help (flags are SUPPRESSed so presets can tell what was
    given; argparse would otherwise show no default)."""
    for action in parser._actions:
        key = action.dest
        if key not in DEFAULTS or DEFAULTS[key] in (None, False) or isinstance(DEFAULTS[key], dict):
            continue
        value = DEFAULTS[key]
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        action.help = f"{action.help + '; ' if action.help else ''}default: {shown}"


def read_config_file(path: str) -> dict:
    """Read a YAML/JSON file of flag values; refuse unknown keys with the list of known ones."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise SystemExit(f"error: cannot read --config {path}: {error}") from None
    try:
        data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, ValueError) as error:
        raise SystemExit(
            f"error: --config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of flag names to values.")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise SystemExit(
            f"error: --config {path} has unknown keys {unknown}. Known keys: {sorted(DEFAULTS)}."
        )
    return data


def config_as_flags(data: dict) -> list[str]:
    """The command line equivalent of a config file's values (None and `augmentation` are not flags)."""
    argv = []
    for key, value in data.items():
        if key == "augmentation" or value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={json.dumps(value) if isinstance(value, dict) else value}")
    return argv


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad values and combinations before any data is loaded."""

    def fail(message: str):
        raise SystemExit(f"error: {message}")

    if not isinstance(args.backbone_kwargs, dict):
        fail(
            f"--backbone_kwargs must be a JSON object such as '{{\"img_size\": 32}}', got {args.backbone_kwargs!r}."
        )
    try:
        args.model_config = CorInfoMaxConfig(**{k: getattr(args, k) for k in CONFIG_FIELDS})
    except (ValueError, TypeError) as error:
        fail(str(error))
    for name in (
        "per_device_train_batch_size",
        "total_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_steps",
        "max_train_steps",
        "max_train_samples",
        "save_total_limit",
        "lr_reference_batch_size",
        "max_eval_samples",
        "max_eval_train_samples",
        "collapse_patience",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name} must be a positive integer, got {value}.")
    if args.num_train_epochs is not None and args.num_train_epochs <= 0:
        fail(f"--num_train_epochs must be > 0, got {args.num_train_epochs}.")
    if args.learning_rate <= 0 or args.min_lr < 0 or args.warmup_epochs < 0 or args.weight_decay < 0:
        fail("--learning_rate must be > 0 and --min_lr, --warmup_epochs, --weight_decay >= 0.")
    if args.momentum < 0 or args.warmup_start_lr < 0 or args.seed < 0:
        fail("--momentum, --warmup_start_lr and --seed must be >= 0.")
    if args.collapse_window < 2:
        fail(
            f"--collapse_window must be >= 2 logging steps (a fall needs two points), got {args.collapse_window}."
        )
    if not 0 < args.collapse_rank_drop < 1 or not 0 <= args.collapse_min_rank < 1:
        fail(
            f"--collapse_rank_drop must lie in (0, 1) and --collapse_min_rank in [0, 1), got "
            f"{args.collapse_rank_drop} and {args.collapse_min_rank}."
        )
    if args.rankme_samples < 0:
        fail(f"--rankme_samples must be >= 0, got {args.rankme_samples}.")
    if args.save_best_by == "rankme" and not args.rankme_samples:
        fail("--save_best_by rankme needs RankMe: set --rankme_samples above 0 (e.g. 256).")
    if args.time_budget_minutes is not None and args.time_budget_minutes <= 0:
        fail(f"--time_budget_minutes must be > 0, got {args.time_budget_minutes}.")
    if min(args.per_device_train_batch_size or 2, args.total_batch_size) < 2:
        fail("a batch needs at least 2 images (the loss estimates a covariance): raise --total_batch_size.")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.image_cache_max_gb <= 0:
        fail(f"--image_cache_max_gb must be > 0, got {args.image_cache_max_gb}.")
    if args.image_cache == "on" and args.streaming:
        fail("--image_cache on needs the whole split: it cannot be used with --streaming.")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) <= 0:
            fail(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}."
            )
    if args.push_to_hub:
        check_push_is_possible(args, fail)
    if args.report_to in TRACKER_AVAILABLE and not TRACKER_AVAILABLE[args.report_to]():
        fail(f"--report_to {args.report_to} needs `pip install {args.report_to}`; or pass --report_to none.")
    if args.resume_from_checkpoint not in (None, "latest"):
        if not (Path(args.resume_from_checkpoint) / "trainer_state.json").is_file():
            fail(
                f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a complete checkpoint (no "
                "trainer_state.json): pass a <output_dir>/checkpoints/step_N folder, or 'latest'."
            )
    if args.dataset_name and args.train_dir:
        fail(
            "pass either --dataset_name or --train_dir, not both (a --preset's dataset gives way to either)."
        )
    if args.num_threads is not None and args.num_threads < 1:
        fail(f"--num_threads must be >= 1, got {args.num_threads}.")
    if args.min_train_steps is not None and args.min_train_steps < 1:
        fail(f"--min_train_steps must be >= 1, got {args.min_train_steps}.")
    if args.streaming and args.max_train_steps is None and args.time_budget_minutes is None:
        fail("--streaming datasets have no length: set --max_train_steps or --time_budget_minutes.")
    try:
        args.two_view_augmentation = TwoViewAugmentation.from_dict(args.augmentation)
    except (DataError, TypeError) as error:
        fail(f"bad augmentation setting: {error}")
    check_backbone_accepts_image_size(args.model_config, fail)


def check_push_is_possible(args: argparse.Namespace, fail) -> None:
    """Fail now, not after training, when the push at the end cannot work (no repo id, offline, no token)."""
    from huggingface_hub import constants, get_token  # noqa: PLC0415
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415

    if not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id org/name (the repository to create or update).")
    try:
        validate_repo_id(args.hub_model_id)
    except HFValidationError as error:
        fail(f"--hub_model_id {args.hub_model_id!r} is not a repository id ({error}); use org/name.")
    if constants.HF_HUB_OFFLINE:
        fail(
            "--push_to_hub needs the network but HF_HUB_OFFLINE is set: unset it, or push later with hub/push.py."
        )
    if not (args.hub_token or get_token()):
        fail(
            "--push_to_hub needs a Hub token with write access: set HF_TOKEN, run `hf auth login`, or pass --hub_token."
        )


def check_backbone_accepts_image_size(config: CorInfoMaxConfig, fail) -> None:
    """Build the backbone once and run two images through it, so a size it cannot take fails now."""
    try:
        model = CorInfoMaxModel(config, add_projector=False).eval()
        with torch.no_grad():
            model(torch.zeros(2, 3, config.image_size, config.image_size))
    except ValueError as error:
        fail(str(error))
    except TypeError as error:
        fail(
            f"--backbone_kwargs {json.dumps(config.backbone_kwargs)} are not accepted by {config.backbone!r}: {error}."
        )
    except (RuntimeError, AssertionError) as error:
        fail(
            f"backbone {config.backbone!r} cannot take {config.image_size}x{config.image_size} images ({error}). "
            "Use a larger --image_size, --cifar_stem for ResNets, or backbone_kwargs such as "
            '\'{"img_size": 32, "patch_size": 4}\' for ViTs.'
        )


# ---------------------------------------------------------------------------------------------------


def build_dataloaders(args, accelerator):
    """The two-view training loader, and the labelled evaluation rows (or None)."""
    train = load_image_dataset(
        args.dataset_name,
        args.dataset_config_name,
        args.train_dir,
        args.train_split,
        args.streaming,
        args.cache_dir,
    )
    image_column, label_column = resolve_columns(train, args.image_column, args.label_column)
    if args.max_train_samples and not args.streaming:
        train = train.select(range(min(args.max_train_samples, len(train))))
    elif args.max_train_samples:
        train = train.take(args.max_train_samples)
    if not args.streaming and len(train) == 0:
        raise DataError(
            "the training split is empty: check --train_split, --train_dir or --max_train_samples."
        )
    resolve_batch_sizes(args, accelerator, None if args.streaming else len(train))
    workers = args.dataloader_num_workers
    if workers is None:  # leave the cores to the model on small machines
        workers = max(1, min(8, (os.cpu_count() or 2) // max(1, accelerator.num_processes) - 1))
    # Training never reads labels (they may be strings, or missing); the evaluation rows get checked ones.
    common = {"image_column": image_column, "label_column": None, "image_size": args.image_size}
    loader_kwargs = {
        "num_workers": workers,
        "pin_memory": accelerator.device.type == "cuda",
        "collate_fn": ExampleCollator(args.skip_bad_images),
        "persistent_workers": False,
    }
    if workers:
        loader_kwargs["prefetch_factor"] = 4
        loader_kwargs["worker_init_fn"] = StopSignal.ignore_in_worker
        atexit.unregister(kill_daemon_processes)
        atexit.register(kill_daemon_processes)  # registered after multiprocessing's exit handler: runs first
    if args.streaming:
        shard, stream_workers = split_stream(
            train, accelerator.process_index, accelerator.num_processes, workers
        )
        if stream_workers < workers:
            logger.info("streaming: %d DataLoader worker(s), one per shard of this process's part of the "
                        "stream (more would read nothing)", stream_workers)  # fmt: skip
        rows = StreamingImageRows(
            shard,
            augmentation=args.two_view_augmentation,
            seed=args.seed,
            stream_id=accelerator.process_index,
            **common,
        )
        sampler = None
        train_loader = torch.utils.data.DataLoader(
            rows,
            batch_size=args.per_device_train_batch_size,
            drop_last=True,
            **{**loader_kwargs, **({} if stream_workers else {"prefetch_factor": None, "worker_init_fn": None}),
               "num_workers": stream_workers},
        )  # fmt: skip
    else:
        rows = None
        if len(train) >= args.total_batch_size:  # (checked below, before decoding anything)
            rows = decoded_rows(args, train, image_column, workers)
        if rows is None:
            rows = ImageRows(train, augmentation=args.two_view_augmentation, seed=args.seed, **common)
        if len(rows) < args.total_batch_size:  # (the image cache leaves out unreadable images)
            raise DataError(
                f"the training set has {len(rows)} images, fewer than one global batch of {args.total_batch_size}: "
                "lower --total_batch_size/--per_device_train_batch_size or add data."
            )
        sampler = EpochShuffleSampler(len(rows), seed=args.seed)
        train_loader = torch.utils.data.DataLoader(
            rows,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            drop_last=True,
            **(
                # batched crops: no per-image work left for workers
                {"collate_fn": rows.collate, "num_workers": 0, "pin_memory": loader_kwargs["pin_memory"]}
                if isinstance(rows, DecodedImages)
                else loader_kwargs
            ),
        )

    eval_rows = None
    if label_column is not None and args.validation_split and not args.streaming:
        try:
            held_out = load_image_dataset(
                args.dataset_name,
                args.dataset_config_name,
                args.train_dir,
                args.validation_split,
                False,
                args.cache_dir,
            )
            resolve_columns(held_out, image_column, label_column)
            bank = train
            if args.max_eval_train_samples:
                bank = bank.select(range(min(args.max_eval_train_samples, len(bank))))
            names = class_names(bank, label_column)
            eval_rows = {
                "train": labelled_rows(bank, args.train_split, label_column, names, common),
                "test": labelled_rows(held_out, args.validation_split, label_column, names, common),
                "names": names,
            }
            labels = eval_rows["train"].labels + eval_rows["test"].labels
            eval_rows["num_classes"] = len(names) if names else max(labels) + 1
        except DataError as error:
            logger.warning(
                "no labelled evaluation split (%s); kNN monitoring and the final evaluation are off", error
            )
    return rows, sampler, train_loader, eval_rows, loader_kwargs


# The default global batch shrinks (by halves, down to MIN_DEFAULT_BATCH) until an epoch has at least
# MIN_STEPS_PER_EPOCH steps: a few thousand images then get several times more updates in the same time.
MIN_STEPS_PER_EPOCH, MIN_DEFAULT_BATCH = 50, 64


def default_batch_size(args, dataset_size: int | None) -> int:
    """`--total_batch_size`, or for the built-in default (no preset, not set by the user) on a small
    dataset, the largest halving of it that gives `MIN_STEPS_PER_EPOCH` steps per epoch."""
    batch = args.total_batch_size
    if args.preset or "total_batch_size" in args.explicit or "per_device_train_batch_size" in args.explicit:
        return batch
    while (
        dataset_size is not None and batch > MIN_DEFAULT_BATCH and dataset_size // batch < MIN_STEPS_PER_EPOCH
    ):
        batch //= 2
    return batch


def resolve_batch_sizes(args, accelerator, dataset_size: int | None) -> None:
    """Set `per_device_train_batch_size` and the actual global `total_batch_size` (what the lr scales by)."""
    batch = default_batch_size(args, dataset_size)
    if batch != args.total_batch_size:
        logger.info("global batch %d (not %d) so that the %d images give %d steps per epoch; --total_batch_size "
                    "sets it", batch, args.total_batch_size, dataset_size, dataset_size // batch)  # fmt: skip
        args.total_batch_size = batch
    if args.per_device_train_batch_size is None:
        divisor = accelerator.num_processes * args.gradient_accumulation_steps
        if args.total_batch_size % divisor:
            raise SystemExit(
                f"error: --total_batch_size {args.total_batch_size} is not divisible by "
                f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation steps."
            )
        args.per_device_train_batch_size = args.total_batch_size // divisor
    if args.per_device_train_batch_size < 2:
        raise SystemExit(
            f"error: each process's batch is {args.per_device_train_batch_size} image(s); BatchNorm and the loss "
            "need at least 2: raise --total_batch_size or lower --gradient_accumulation_steps."
        )
    args.total_batch_size = (
        args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    )


def decoded_rows(args, train, image_column: str, workers: int) -> DecodedImages | None:
    """The training split decoded once (`--image_cache`), or None for per-image crops in workers."""
    if args.image_cache == "off" or args.streaming:
        return None
    images, _, bad, message = DecodedImages.decode(
        train, image_column, int(args.image_cache_max_gb * 2**30), workers, args.skip_bad_images
    )
    if images is None:
        if args.image_cache == "on":
            raise DataError(
                f"--image_cache on: {message}. Use --image_cache auto (per-image crops then) or raise "
                "--image_cache_max_gb."
            )
        logger.info("--image_cache: %s; decoding and cropping per image in %d worker(s)", message, workers)
        return None
    logger.info("--image_cache: %s; crops are made a batch at a time", message)
    if bad:
        logger.warning("skipped %d unreadable image(s), first: %s", len(bad), bad[0])
    return DecodedImages(images, args.image_size, args.two_view_augmentation, args.seed, bad)


def labelled_rows(dataset, split: str, label_column: str, names: list[str] | None, common: dict) -> ImageRows:
    """Evaluation rows of one split with checked class indices; images without a label are left out."""
    labels = class_indices(dataset, label_column, names, split)
    keep = [i for i, label in enumerate(labels) if label >= 0]
    if not keep:
        raise DataError(f"the {split!r} split has no labelled image: pass a labelled --validation_split.")
    if len(keep) < len(labels):
        logger.warning("%d images of the %r split have no label; the evaluation leaves them out",
                       len(labels) - len(keep), split)  # fmt: skip
        dataset, labels = dataset.select(keep), [labels[i] for i in keep]
    return ImageRows(dataset, mode="eval", labels=labels, **common)


class DeviceLoader:
    """A loader of a stream's batches moved to the training device (what Accelerate's prepared loaders do),
    for the loader that is not prepared."""

    def __init__(self, loader, device: torch.device, skip: int = 0):
        self.loader, self.device, self.skip = loader, device, skip

    def set_epoch(self, epoch: int) -> None:
        pass  # the stream's own `set_epoch` reshuffles it

    def skip_first(self, batches: int) -> DeviceLoader:
        """The same stream without its first `batches` batches (read and dropped: a stream cannot seek)."""
        return DeviceLoader(self.loader, self.device, batches)

    def __iter__(self):
        for batch in itertools.islice(self.loader, self.skip, None):
            yield {
                k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }


def peak_learning_rate(args) -> float:
    """`--learning_rate` is the rate at `--lr_reference_batch_size`; it scales linearly with the global batch."""
    return args.learning_rate * args.total_batch_size / args.lr_reference_batch_size


# Our names -> timm's: timm's "sgd" is Nesterov SGD; the paper (and `--optimizer sgd`) uses plain momentum.
TIMM_OPTIMIZERS = {"sgd": "momentum", "lars": "lars"}


def make_optimizer(
    model, name: str, lr: float, momentum: float, weight_decay: float, exclude_bias_and_norm: bool
):
    """timm's optimizer factory (`sgd`: `torch.optim.SGD` with plain momentum, as the paper; `lars`: timm's
    LARS); weight decay is left off biases and norm weights when `exclude_bias_and_norm` is set."""
    return create_optimizer_v2(
        model,
        opt=TIMM_OPTIMIZERS[name],
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        filter_bias_and_bn=exclude_bias_and_norm,
    )


def make_lr_lambda(args, steps_per_epoch: int, total_steps: int, peak_lr: float):
    """Linear warmup from `warmup_start_lr` to the peak, then cosine to `min_lr`, which the last step
    (`total_steps - 1`, counted from 0) uses. The warm-up takes at most half of a short run."""
    warmup = min(int(round(args.warmup_epochs * steps_per_epoch)), total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup:
            lr = args.warmup_start_lr + (peak_lr - args.warmup_start_lr) * step / warmup
        else:
            progress = (step - warmup) / max(1, total_steps - 1 - warmup)
            lr = args.min_lr + 0.5 * (peak_lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
        return lr / peak_lr

    return factor


def planned_steps(args, steps_per_epoch: int | None) -> int | None:
    """The run's length in optimisation steps, or None when `--time_budget_minutes` is to size it.

    `--max_train_steps`, or `--num_train_epochs` given by the user, fix the length (and cap a budget).
    Otherwise a budget decides; without one, the epochs of the defaults or the preset, but at least
    `--min_train_steps`, so that a small dataset still gets enough updates.
    """
    if args.max_train_steps:
        explicit = args.max_train_steps
    elif "num_train_epochs" in args.explicit and steps_per_epoch:
        explicit = math.ceil(args.num_train_epochs * steps_per_epoch)
    else:
        explicit = None
    if args.time_budget_minutes:
        return explicit  # a cap; the budget fits the length below it
    if explicit is not None:
        return explicit
    return max(math.ceil(args.num_train_epochs * steps_per_epoch), args.min_train_steps or 1)


class TimeBudget:
    """Fits the number of steps to `--time_budget_minutes` once the step time is known.

    The first `SKIP` steps (allocation, lazy initialisation, compilation) are not timed; the next
    `MEASURE` are. Every process then takes the slowest measurement and the latest clock, so all agree on
    the same number of steps, which leaves `reserve_seconds(step_time)` for the final save and evaluation.
    """

    SKIP, MEASURE = 3, 20
    OVERRUN = 1.25  # a run still going at this multiple of the budget stops (a safety net, not the plan)

    def __init__(self, minutes: float, started: float, cap: int | None, reserve_seconds):
        self.seconds, self.started, self.cap, self.reserve_seconds = (
            minutes * 60,
            started,
            cap,
            reserve_seconds,
        )
        self.timer_start: float | None = None

    def fit(self, step: int, accelerator) -> int | None:
        """Called after every step (on every process): the fitted number of steps at the fitting step."""
        now = time.time()
        if step == self.SKIP:
            self.timer_start = now
        if step != self.SKIP + self.MEASURE or self.timer_start is None:
            return None
        measured = torch.tensor(
            [(now - self.timer_start) / self.MEASURE, now - self.started], device=accelerator.device
        )
        step_time, elapsed = accelerator.gather(measured[None]).max(dim=0).values.tolist()
        reserve = self.reserve_seconds(step_time)
        total = step + max(1, int((self.seconds - elapsed - reserve) // step_time))
        total = min(total, self.cap) if self.cap else total
        logger.info(
            "time budget %.1f min: %.3f s/step measured, %.0f s reserved for saving and evaluation -> %d steps",
            self.seconds / 60, step_time, reserve, total,
        )  # fmt: skip
        return total

    def overrun(self, accelerator) -> bool:
        """Whether the run is far past its budget on any process (the same answer everywhere)."""
        late = torch.tensor(
            [time.time() - self.started > self.OVERRUN * self.seconds], device=accelerator.device
        )
        return bool(accelerator.gather(late.float()).max().item() > 0)


def evaluation_seconds(args, eval_rows, step_time: float) -> float:
    """A rough cost of the final save and evaluation, from the training step's time: each evaluated
    encoder (the model, and the random-init baseline) runs a forward over the bank and the test split in
    fp32, about a sixth of a two-view training step per image; the probes take a few seconds each."""
    seconds = 10.0  # save, figure, results
    if eval_rows is not None and args.do_eval:
        images = len(eval_rows["train"]) + len(eval_rows["test"])
        encoders = 2 if args.eval_baselines else 1
        per_image = step_time / (6 * args.per_device_train_batch_size)
        seconds += encoders * images * per_image * (1.5 if args.mixed_precision != "no" else 1.0)
        seconds += 5.0 * (encoders + int(args.eval_baselines))
    return seconds


def latest_checkpoint(output_dir: Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint (a partial one has no trainer_state.json and is never picked),
    or the newest of a step below `before`."""
    root = output_dir / "checkpoints"
    done = [
        p
        for p in root.glob("step_*")
        if (p / "trainer_state.json").exists()
        and re.fullmatch(r"step_\d+", p.name)
        and (before is None or int(p.name[5:]) < before)
    ]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def set_aside_newer_checkpoints(output_dir: Path, step: int) -> None:
    """Resuming from an older checkpoint abandons the newer ones (after a numerical fault, say): rename
    them `abandoned-step_N`, kept for inspection, so that 'latest' never mixes the two runs."""
    for path in sorted((output_dir / "checkpoints").glob("step_*")):
        if re.fullmatch(r"step_\d+", path.name) and int(path.name[5:]) > step:
            target = path.with_name(f"abandoned-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            logger.warning("resumed from step %d: the newer %s is now %s", step, path, target.name)


def save_checkpoint(accelerator, output_dir: Path, state: dict, save_total_limit: int | None) -> Path:
    """`accelerator.save_state` into a temporary folder, then an atomic rename to `step_<N>`.

    A kill at any moment leaves every `step_<N>` complete: unfinished writes and deletions live in hidden
    `.tmp-`/`.old-` folders, which `latest_checkpoint` never picks and the next run removes.
    """
    root = output_dir / "checkpoints"
    final = root / f"step_{state['global_step']}"
    tmp = root / f".tmp-step_{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            if final.exists():
                remove_checkpoint(final)
            os.replace(tmp, final)
    except Exception as error:  # noqa: BLE001  (a full disk raises OSError, RuntimeError or SafetensorError)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20
        raise SystemExit(
            f"error: could not write checkpoint {final} ({type(error).__name__}: {error}; {free:.0f} MiB free "
            "there). The previous checkpoints are intact: free disk space (or lower --save_total_limit) and "
            "resume with --resume_from_checkpoint latest."
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and save_total_limit:
        done = sorted(
            (p for p in root.glob("step_*") if (p / "trainer_state.json").exists()),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for old in done[:-save_total_limit]:
            remove_checkpoint(old)
    return final


def remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a kill midway leaves a hidden folder, never a half-deleted `step_<N>`."""
    hidden = path.with_name(f".old-{path.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_unfinished_writes(output_dir: Path) -> None:
    """Delete what a killed run left half-written: hidden checkpoint folders, the model staging folder and
    the best model's (a complete staged best model whose swap a kill interrupted is put in place)."""
    best, staged = output_dir / BEST_MODEL, output_dir / f".tmp-{BEST_MODEL}"
    if not best.exists() and (staged / BEST_STATE).exists():
        os.replace(staged, best)
    hidden = [output_dir / MODEL_STAGING, staged, output_dir / f".old-{BEST_MODEL}"]
    for path in [*(output_dir / "checkpoints").glob(".*-step_*"), *hidden]:
        shutil.rmtree(path, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers never see it half-written."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one device sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def checkpoint_or_stop(
    accelerator, model, output_dir: Path, state: dict, save_total_limit, fault=None, diverged=False
) -> Path:
    """Checkpoint the current step; on a numerical `fault`, or when the last update made the weights
    non-finite, end the run instead, naming the step, the likely causes and the checkpoints to resume
    from (`diverged`: the fault is known not to come from a few batches). Non-finite weights are never
    saved, and a fault's checkpoint rotates no older one out."""
    finite = weights_are_finite(model)
    if fault is None and finite:
        return save_checkpoint(accelerator, output_dir, dict(state), save_total_limit)
    step = state["global_step"]
    remedy = "a lower --learning_rate, a larger --eps or fp32 (--mixed_precision no)"
    if finite:
        path = save_checkpoint(accelerator, output_dir, dict(state), None)
        earlier = latest_checkpoint(output_dir, before=step)
        advice = f"The state after step {step}, the last completed one, is saved in {path}. " + (
            "The weights have diverged:"
            if diverged
            else "If a few batches cause this, resume from it with --on_nan skip; if the fault comes back at "
            "once, the weights have diverged:"
        )
        advice += f" resume from {earlier} with {remedy}." if earlier else f" start again with {remedy}."
    else:
        fault = fault or f"step {step}: the update made the weights non-finite"
        newest = latest_checkpoint(output_dir)
        advice = "The weights were not saved. " + (
            f"Resume from the newest checkpoint, {newest}, with {remedy}."
            if newest
            else f"No checkpoint exists (see --checkpointing_steps): start again with {remedy}."
        )
    raise SystemExit(f"error: numerical fault at {fault}\n{advice}")


def all_processes_agree(accelerator, flag: bool) -> bool:
    """True when `flag` is true on every process."""
    missing = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return accelerator.reduce(missing, reduction="sum").item() == 0


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (checkpoint, then a clean exit)."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: leave now; the checkpoints on disk are complete
            raise SystemExit(f"error: {signal.Signals(signum).name} again: stopped at once, without saving.")
        self.received = signum

    @staticmethod
    def ignore_in_worker(worker_id: int) -> None:
        """DataLoader `worker_init_fn`: a Ctrl-C or a scheduler's SIGTERM reaches the whole process group;
        workers ignore it and keep feeding the main process until it has checkpointed and ends them."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def agreed(self, accelerator) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def kill_daemon_processes() -> None:
    """At exit, multiprocessing ends daemon processes with SIGTERM, which DataLoader workers ignore (see
    `StopSignal.ignore_in_worker`): kill the workers of a loader that an exception left open, or the exit
    would wait for them forever (and first stop PyTorch from reporting those deaths)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()


def main(argv: list[str] | None = None) -> dict | None:
    """Run `pretrain`; a data problem, also one found mid-run in a DataLoader worker, ends it with one line."""
    try:
        return pretrain(argv)
    except DataError as error:
        message = data_error_message(error)
    # Raised outside the handler, so that the failed DataLoader (its traceback holds it) is freed now and
    # ends its workers.
    raise SystemExit(f"error: {message}")


def pretrain(argv: list[str] | None = None) -> dict | None:
    started = psutil.Process().create_time()  # a time budget counts the start-up too
    args = parse_args(argv)
    project = Path(args.output_dir)
    if args.resume_from_checkpoint is None and latest_checkpoint(project) is not None:
        # A fresh run would mix its checkpoints with these, and a later 'latest' could pick the old run's.
        raise SystemExit(
            f"error: --output_dir {project} holds checkpoints of an earlier run: pass --resume_from_checkpoint "
            f"latest to continue it, or start afresh in another --output_dir (or delete {project / 'checkpoints'})."
        )
    device = PartialState().device
    args.mixed_precision, precision_reason = choose_mixed_precision(args.mixed_precision, device)
    threads_reason = None
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", PartialState().num_processes))  # processes here
        threads, threads_reason = choose_cpu_threads(args.num_threads, local)
        torch.set_num_threads(threads)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(project),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False if args.streaming else None),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    logger.info(
        "precision: %s (%s; --mixed_precision no|bf16|fp16 to change; the loss is float64 either way)",
        "fp32" if args.mixed_precision == "no" else f"{args.mixed_precision} autocast",
        precision_reason,
    )
    if threads_reason is not None:
        logger.info(
            "CPU threads: %d per process (%s; --num_threads N to change)",
            torch.get_num_threads(),
            threads_reason,
        )
    if args.gradient_accumulation_steps > 1:
        logger.warning(
            "gradient accumulation: the CorInfoMax covariance and its log-det are estimated per micro-batch of "
            "%d x %d processes, not over the accumulated batch; the loss is not the large-batch loss.",
            args.per_device_train_batch_size or 0,
            accelerator.num_processes,
        )
    set_seed(args.seed)
    rows, sampler, train_loader, eval_rows, loader_kwargs = build_dataloaders(args, accelerator)
    peak_lr = peak_learning_rate(args)

    model = CorInfoMaxForPreTraining(args.model_config)
    if args.on_nan == "skip":
        model.loss_fn.on_error = "report"
    if args.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":  # torch's SyncBatchNorm has no CPU kernel
            logger.info("--sync_bn: not available on CPU; each process normalises its own share of the batch")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(
        model, args.optimizer, peak_lr, args.momentum, args.weight_decay, args.exclude_bias_and_norm_from_wd
    )
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps if sampler is not None else None
    if steps_per_epoch is not None:
        steps_per_epoch = math.ceil(steps_per_epoch / accelerator.num_processes)
    total_steps = planned_steps(args, steps_per_epoch)
    if sampler is None:
        # A stream is already split per process (`split_stream`); Accelerate would split its batches again.
        model, optimizer = accelerator.prepare(model, optimizer)
        train_loader = DeviceLoader(train_loader, accelerator.device)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if args.torch_compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)
    aug_device = accelerator.device
    augment = [
        BatchViewAugment(v, args.image_mean, args.image_std).to(aug_device)
        for v in (args.two_view_augmentation.view1, args.two_view_augmentation.view2)
    ]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    state = {
        "global_step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "skipped_steps": 0,
        "bad_images": len(getattr(rows, "bad_images", ())),  # those the image cache left out
        "history": [],
    }
    if args.resume_from_checkpoint:
        path = (
            latest_checkpoint(project)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if path is None:
            logger.info(
                "--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", project
            )
        else:
            try:
                accelerator.load_state(str(path))
                state = json.loads((path / "trainer_state.json").read_text())
            except Exception as error:  # noqa: BLE001  (any failure here has the same remedy)
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise SystemExit(
                    f"error: cannot resume from {path} ({type(error).__name__}: {first_line}). It is damaged or was "
                    "written with other model settings: resume from an older checkpoints/step_N or start afresh."
                ) from None
            logger.info("resumed from %s at step %d", path, state["global_step"])
            if accelerator.is_main_process:
                set_aside_newer_checkpoints(project, state["global_step"])
                set_aside_newer_best_model(project, state.get("best"))
    budget = None
    if args.time_budget_minutes:
        if "total_steps" in state:  # fitted before the interruption: the schedule must not change
            total_steps = state["total_steps"]
        else:
            budget = TimeBudget(
                args.time_budget_minutes,
                started,
                total_steps,
                lambda step_time: evaluation_seconds(args, eval_rows, step_time),
            )
            total_steps = total_steps or UNFITTED_STEPS
    steps_per_epoch = steps_per_epoch or total_steps
    # The schedule is a function of the step, so it is rebuilt, not checkpointed: a resumed run follows the
    # current flags (a lower --learning_rate after a numerical fault), and no pickled scheduler is loaded
    # (Accelerate unpickles registered objects with weights_only=False).
    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer,
        make_lr_lambda(args, steps_per_epoch, total_steps, peak_lr),
        last_epoch=state["global_step"] - 1,
    )

    if accelerator.is_main_process:
        project.mkdir(parents=True, exist_ok=True)
        remove_unfinished_writes(project)
        resolved = {
            k: v
            for k, v in vars(args).items()
            if k not in ("model_config", "two_view_augmentation", "hub_token")
        }
        write_atomically(project / "training_args.json", json.dumps(resolved, indent=2, default=str))
    if args.report_to != "none":
        accelerator.init_trackers(
            "corinfomax",
            {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
            if accelerator.is_main_process
            else {},
        )

    logger.info(
        "%d processes on %s, global batch %d, peak lr %.4g, %s steps (%s per epoch)",
        accelerator.num_processes,
        accelerator.device,
        args.total_batch_size,
        peak_lr,
        "time-budgeted" if total_steps == UNFITTED_STEPS else total_steps,
        steps_per_epoch if sampler is not None else "streaming: no fixed number",
    )
    spectrum_batch = None
    if eval_rows is not None:
        spectrum_batch = next(
            iter(
                torch.utils.data.DataLoader(
                    eval_rows["test"], batch_size=512, collate_fn=ExampleCollator(True)
                )
            )
        ).get("pixel_values")  # None when all of the first 512 are unreadable
    spectrum_start = (
        projection_spectrum(unwrapped, spectrum_batch, args) if spectrum_batch is not None else None
    )
    if state["global_step"] and "spectrum_start" in state:
        spectrum_start = torch.tensor(state["spectrum_start"])
    elif spectrum_start is not None:
        state["spectrum_start"] = spectrum_start.tolist()

    # Label-free collapse monitoring: RankMe of fixed training images, warnings from the logged history.
    rankme_images = rankme_rows(rows, args) if accelerator.is_main_process and args.rankme_samples else None
    monitor = CollapseMonitor(
        args.projector_dims[-1],
        window=args.collapse_window,
        rank_drop=args.collapse_rank_drop,
        low_rank=args.collapse_min_rank,
        patience=args.collapse_patience,
    )
    for record in state["history"]:  # a resumed run's monitor goes on from the history, without re-warning
        feed_monitor(monitor, record, args.lambda_R)
    state.setdefault("best", None)

    stop = StopSignal()
    checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)
    progress = tqdm(
        total=None if total_steps == UNFITTED_STEPS else total_steps,
        initial=state["global_step"],
        disable=not accelerator.is_local_main_process,
        desc="pretraining",
        dynamic_ncols=True,
    )
    generator = torch.Generator(device=aug_device)
    images_seen, window_start = 0, time.time()
    stopped_by, saved, consecutive_skips = None, None, 0
    # A faulty forward has already updated the BatchNorm statistics; these copies undo that.
    running_stats = unwrapped.batchnorm_statistics()
    model.train()
    while state["global_step"] < total_steps and stopped_by is None:
        epoch, whole_epoch, usable_batches = state["epoch"], state["step_in_epoch"] == 0, 0
        # Accelerate's loader sets its sampler's epoch from its own count of iterations when it starts;
        # after a resume that count is wrong, so it is set here (the skipping loader below copies it).
        train_loader.set_epoch(epoch)
        rows.set_epoch(epoch)
        loader = train_loader
        if state["step_in_epoch"]:
            done = state["step_in_epoch"] * args.gradient_accumulation_steps
            loader = (
                train_loader.skip_first(done)
                if isinstance(train_loader, DeviceLoader)
                else accelerator.skip_first_batches(train_loader, done)
            )
        for batch in loader:
            if batch["bad_images"]:
                state["bad_images"] += len(batch["bad_images"])
                logger.warning(
                    "skipped %d unreadable image(s) (total %d), first: %s",
                    len(batch["bad_images"]),
                    state["bad_images"],
                    batch["bad_images"][0],
                )
            usable = len(batch.get("index", ())) >= 2  # BatchNorm and the covariance need 2 images
            if args.skip_bad_images and accelerator.num_processes > 1:
                usable = all_processes_agree(accelerator, usable)  # drop a batch everywhere or nowhere
            if not usable:
                continue
            usable_batches += 1
            stats_before = [b.clone() for b in running_stats]
            generator.manual_seed(
                hash((args.seed, state["global_step"], accelerator.process_index)) & 0x7FFFFFFF
            )
            with accelerator.accumulate(model):
                v1 = augment[0](batch["view1"], generator, memory_format)
                v2 = augment[1](batch["view2"], generator, memory_format)
                try:
                    out = model(pixel_values=v1, pixel_values_2=v2)
                except CorInfoMaxNumericalError as error:
                    out, fault = None, str(error)
                else:
                    fault = (
                        None
                        if torch.isfinite(out.loss)
                        else (getattr(out, "error", None) or f"non-finite loss {out.loss.item()}")
                    )
                if fault is not None:
                    optimizer.zero_grad(set_to_none=True)
                    for buffer, before in zip(running_stats, stats_before, strict=True):
                        buffer.copy_(before)
                    fault = f"step {state['global_step'] + 1}: {fault}"
                    consecutive_skips += 1
                    if args.on_nan == "skip" and consecutive_skips <= MAX_CONSECUTIVE_SKIPS:
                        state["skipped_steps"] += 1
                        logger.warning("%s; skipped (%d so far)", fault, state["skipped_steps"])
                        continue
                    if args.on_nan == "skip":
                        fault += f" (after {MAX_CONSECUTIVE_SKIPS} skipped steps in a row)"
                    checkpoint_or_stop(
                        accelerator, unwrapped, project, state, None, fault, args.on_nan == "skip"
                    )
                consecutive_skips = 0
                accelerator.backward(out.loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            images_seen += v1.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            progress.update(1)
            step = state["global_step"]
            if step % args.logging_steps == 0 or step == total_steps:
                now = time.time()
                record = {
                    "step": step,
                    "epoch": epoch + state["step_in_epoch"] / steps_per_epoch,
                    "loss": out.loss.item(),
                    "invariance_loss": out.invariance_loss.item(),
                    "covariance_loss": out.covariance_loss.item(),
                    "lr": lr,
                    "images_per_second": images_seen / max(now - window_start, 1e-9),
                }
                for view in ("R1", "R2"):  # the same on every process: the loss gathers the global batch
                    for key, value in spectrum_summary(getattr(unwrapped.loss_fn, view)).items():
                        record[f"{key}_{view}"] = value
                if args.rankme_samples:
                    score = probe_rankme(unwrapped, rankme_images, args, accelerator)
                    if score is not None:
                        record["rankme"] = score
                images_seen, window_start = 0, time.time()
                if args.eval_steps and step % args.eval_steps == 0 and eval_rows is not None:
                    record["knn_top1"] = monitor_knn(unwrapped, eval_rows, args, accelerator, loader_kwargs)
                accelerator.log(record, step=step)
                warnings = feed_monitor(monitor, record, args.lambda_R)
                if warnings:
                    record["collapse_warnings"] = [w.kind for w in warnings]
                    for warning in warnings if accelerator.is_main_process else ():
                        logger.warning("%s", warning)
                state["history"].append(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", erank=f"{record['effective_rank_R1']:.1f}")
                best = state["best"]
                if args.save_best_by == "rankme" and "rankme" in record:
                    if best is None or record["rankme"] > best["rankme"]:
                        state["best"] = {"step": step, "rankme": record["rankme"]}
                        save_model(unwrapped, project, accelerator, best=state["best"])
            if checkpoint_every and step % checkpoint_every == 0:
                saved = checkpoint_or_stop(accelerator, unwrapped, project, state, args.save_total_limit)
            if stop.agreed(accelerator):
                stopped_by = stop.received or signal.SIGTERM
            if budget is not None:
                fitted = budget.fit(step, accelerator)
                if fitted is not None:
                    total_steps = state["total_steps"] = max(fitted, step)
                    scheduler = torch.optim.lr_scheduler.LambdaLR(
                        optimizer.optimizer,
                        make_lr_lambda(args, steps_per_epoch, total_steps, peak_lr),
                        last_epoch=step - 1,
                    )
                    progress.total = total_steps
                    progress.refresh()
                elif step % args.logging_steps == 0 and budget.overrun(accelerator):
                    logger.warning("stopped at step %d: %.0f%% of the time budget used", step,
                                   100 * budget.OVERRUN)  # fmt: skip
                    total_steps = step
            if step >= total_steps or stopped_by is not None:
                break
        else:
            if whole_epoch and not usable_batches:
                raise DataError(
                    f"no image of the training split could be read in a whole epoch ({state['bad_images']} "
                    "skipped): check the files and --image_column."
                )
            if sampler is None:
                logger.info("pass %d over the stream: %d batches", epoch + 1, usable_batches)
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if args.checkpointing_steps == "epoch":
                saved = checkpoint_or_stop(accelerator, unwrapped, project, state, args.save_total_limit)
    progress.close()
    if stopped_by is not None:
        path = saved
        if saved is None or saved.name != f"step_{state['global_step']}":  # not just written
            path = checkpoint_or_stop(accelerator, unwrapped, project, state, args.save_total_limit)
        logger.info(
            "received %s: saved %s; resume with --resume_from_checkpoint latest",
            signal.Signals(stopped_by).name,
            path,
        )
        accelerator.end_training()
        return None

    results = finish(
        args,
        accelerator,
        unwrapped,
        eval_rows,
        state,
        spectrum_batch,
        spectrum_start,
        loader_kwargs,
        time.time() - started,
    )
    accelerator.end_training()
    return results


def rankme_rows(rows, args) -> CachedRows | None:
    """The fixed training images RankMe is measured on: `--rankme_samples` of them, un-augmented (resize
    and centre crop), drawn once with `--seed` (a stream's first ones); None when none can be read."""
    n = args.rankme_samples
    if isinstance(rows, StreamingImageRows):
        stream = StreamingImageRows(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = list(itertools.islice(stream, n))
    else:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))[:n]
        if isinstance(rows, DecodedImages):
            labels = torch.full((len(pick),), -1, dtype=torch.long)
            return CachedRows(eval_view(rows.images[pick], args.image_size), labels, pick)
        views = ImageRows(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = [views[i] for i in pick.tolist()]
    batch = ExampleCollator(skip_bad_images=True)(examples)
    if "pixel_values" not in batch:
        return None
    return CachedRows(batch["pixel_values"], batch["labels"], batch["index"])


def probe_rankme(model, images: CachedRows | None, args, accelerator) -> float | None:
    """RankMe of the pooled backbone embeddings of `images` (eval mode, no gradients), computed on the
    main process (which alone holds the images) and sent to the others, so that every process takes the
    same `--save_best_by` decisions; None when there are no images or the embeddings are not finite."""
    from modeling_corinfomax.evaluation import extract_features  # noqa: PLC0415

    score = float("nan")
    if images is not None:
        # Slices, not a DataLoader: starting one draws from the global RNG, which training must not see.
        batches = [
            {"pixel_values": images.pixel_values[i : i + 256], "labels": images.index[i : i + 256]}
            for i in range(0, len(images), 256)
        ]
        features, _ = extract_features(model, NormalizingLoader(batches, args))
        if torch.isfinite(features).all():  # diverged weights: the next step's fault check ends the run
            score = rankme(features)
    if accelerator.num_processes > 1:
        score = broadcast(torch.tensor([score], device=accelerator.device)).item()
    return None if math.isnan(score) else score


def feed_monitor(monitor: CollapseMonitor, record: dict, lambda_R: float) -> list:
    """Give the collapse monitor one logged record; the warnings that begin at it (none for the records
    of a checkpoint written before the spectra of both views were logged). The effective rank of the
    first updates is left out: their running covariance still holds a part `lambda_R ** step` of
    `R_init * I`, which lifts it (measured: 11.6 of 16 after one update, 7.8 after two)."""
    if "effective_rank_R2" not in record:
        return []
    erank = min(record["effective_rank_R1"], record["effective_rank_R2"])
    return monitor.update(
        record["step"],
        erank if lambda_R ** record["step"] <= R_INIT_NEGLIGIBLE else None,
        record["invariance_loss"],
        record["covariance_loss"],
        record.get("rankme"),
    )


def set_aside_newer_best_model(output_dir: Path, best: dict | None) -> None:
    """Resuming from an older checkpoint abandons a best model saved after it: rename it `abandoned-best`,
    so that <output_dir>/best only ever holds a model of the run that goes on."""
    path = output_dir / BEST_MODEL
    if not (path / BEST_STATE).exists():
        return
    saved = json.loads((path / BEST_STATE).read_text())
    if best is None or saved["step"] != best["step"]:
        target = path.with_name(f"abandoned-{BEST_MODEL}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        logger.warning("%s held the model of step %d, not the resumed checkpoint's best (%s): it is now %s",
                       path, saved["step"], f"step {best['step']}" if best else "none", target)  # fmt: skip


def projection_spectrum(model, images, args) -> torch.Tensor:
    """Sorted eigenvalues of the covariance of normalised projections of fixed un-augmented images."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = normalize_batch(images, args.image_mean, args.image_std).to(next(model.parameters()).device)
        z = torch.nn.functional.normalize(model.corinfomax(x).projections.double(), dim=1)
        z = z - z.mean(0)
        eigs = covariance_eigenvalues(z.T @ z / z.shape[0]).cpu()
    model.train(was_training)
    return eigs


def eval_split(eval_rows: dict, split: str, args, loader_kwargs) -> torch.utils.data.Dataset:
    """The evaluation rows of `split`; with `--image_cache`, made once on first use and kept in memory."""
    rows = eval_rows[split]
    if isinstance(rows, ImageRows) and args.image_cache != "off":
        max_bytes = int(args.image_cache_max_gb * 2**30)
        cached = CachedRows.build(rows, max_bytes, loader_kwargs["num_workers"], args.skip_bad_images)
        if cached is not None:
            eval_rows[split] = rows = cached
    return rows


def eval_loader_kwargs(rows, loader_kwargs: dict) -> dict:
    """In-memory rows need no workers."""
    if isinstance(getattr(rows, "dataset", rows), CachedRows):
        return {
            "num_workers": 0,
            "collate_fn": loader_kwargs["collate_fn"],
            "pin_memory": loader_kwargs["pin_memory"],
        }
    return loader_kwargs


def eval_features(model, rows, args, accelerator, loader_kwargs):
    """Backbone features of un-augmented images (for kNN and the linear probe)."""
    from modeling_corinfomax.evaluation import extract_features  # noqa: PLC0415

    loader = torch.utils.data.DataLoader(
        rows, batch_size=256, shuffle=False, **eval_loader_kwargs(rows, loader_kwargs)
    )
    loader = accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader
    return extract_features(
        model,
        NormalizingLoader(loader, args),
        accelerator=accelerator if accelerator.num_processes > 1 else None,
    )


class NormalizingLoader:
    """Wrap a loader of uint8 eval views into `pixel_values` floats the models expect."""

    def __init__(self, loader, args):
        self.loader, self.args = loader, args

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        fmt = torch.channels_last if self.args.channels_last else torch.contiguous_format
        for batch in self.loader:
            if "pixel_values" not in batch:  # every image of the batch was unreadable (--skip_bad_images)
                continue
            yield {
                "pixel_values": normalize_batch(
                    batch["pixel_values"], self.args.image_mean, self.args.image_std, fmt
                ),
                "labels": batch["labels"],
            }


def monitor_knn(model, eval_rows, args, accelerator, loader_kwargs) -> float:
    from modeling_corinfomax.evaluation import knn_accuracy  # noqa: PLC0415

    n = args.max_eval_samples or len(eval_rows["test"])
    subset = {}
    for k in ("train", "test"):
        rows = eval_split(eval_rows, k, args, loader_kwargs)
        subset[k] = torch.utils.data.Subset(rows, range(min(n, len(rows))))
    xtr, ytr = eval_features(model.corinfomax, subset["train"], args, accelerator, loader_kwargs)
    xte, yte = eval_features(model.corinfomax, subset["test"], args, accelerator, loader_kwargs)
    num_classes = eval_rows["num_classes"]
    return knn_accuracy(xtr, ytr, xte, yte, num_classes, k=20, temperature=0.07)["top1"]


def evaluate_encoder(features_fn, num_classes) -> dict:
    from modeling_corinfomax.evaluation import knn_accuracy, linear_probe  # noqa: PLC0415

    (xtr, ytr), (xte, yte) = features_fn("train"), features_fn("test")
    knn = knn_accuracy(xtr, ytr, xte, yte, num_classes, k=20, temperature=0.07)
    linear = linear_probe(xtr, ytr, xte, yte, num_classes)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def finish(
    args, accelerator, model, eval_rows, state, spectrum_batch, spectrum_start, loader_kwargs, seconds
) -> dict:
    """Save the model, evaluate against the baselines, write eval_results.json and the figure, push."""
    project = Path(args.output_dir)
    accelerator.wait_for_everyone()
    save_model(model, project, accelerator)
    results: dict = {
        "train_runtime_seconds": round(seconds, 1),
        "global_step": state["global_step"],
        "skipped_steps": state["skipped_steps"],
        "bad_images": state["bad_images"],
    }
    if state["best"] is not None:
        results["best_rankme_step"], results["best_rankme"] = state["best"]["step"], state["best"]["rankme"]
        logger.info("best RankMe %.2f at step %d: %s", state["best"]["rankme"], state["best"]["step"],
                    project / BEST_MODEL)  # fmt: skip
    if eval_rows is not None and args.do_eval:
        num_classes = eval_rows["num_classes"]

        for split in ("train", "test"):
            eval_split(eval_rows, split, args, loader_kwargs)

        def features_of(encoder):
            return lambda split: eval_features(encoder, eval_rows[split], args, accelerator, loader_kwargs)

        ours = {split: features_of(model.corinfomax)(split) for split in ("train", "test")}
        results.update(evaluate_encoder(lambda split: ours[split], num_classes))
        if accelerator.is_main_process:
            write_pictures(project, ours, eval_rows)
        if args.eval_baselines:
            baseline_config = CorInfoMaxConfig(
                **{
                    **args.model_config.to_dict(),
                    "backbone_kwargs": {
                        **args.model_config.backbone_kwargs,
                        **zero_init_last_off(args.model_config),
                    },
                }
            )
            torch.manual_seed(args.seed)
            random_init = CorInfoMaxModel(baseline_config, add_projector=False).to(accelerator.device)
            if args.channels_last:
                random_init = random_init.to(memory_format=torch.channels_last)
            for key, value in evaluate_encoder(features_of(random_init), num_classes).items():
                results[f"{key}_random_init"] = value
            for key, value in evaluate_encoder(
                lambda split: raw_pixels(eval_rows[split], args), num_classes
            ).items():
                results[f"{key}_raw_pixels"] = value
        results["dataset"] = {
            "name": args.dataset_name or args.train_dir or "bundled fashion-mnist subset",
            "config": args.dataset_config_name,
            "split": args.validation_split,
        }
        results["protocols"] = {
            "knn": {
                "k": 20,
                "temperature": 0.07,
                "similarity": "cosine",
                "features": "backbone, un-augmented",
            },
            "linear": {"method": "logistic regression on frozen precomputed backbone features"},
        }
    if accelerator.is_main_process:
        from modeling_corinfomax.evaluation import update_eval_results  # noqa: PLC0415

        try:  # keep what eval.py / finetune.py already wrote there for the same dataset
            update_eval_results(project, results)
        except ValueError as error:
            logger.warning("%s: replacing %s/eval_results.json", error, project)
            write_atomically(project / "eval_results.json", json.dumps(results, indent=2))
        write_atomically(project / "training_log.json", json.dumps(state["history"], indent=2))
        spectrum_end = (
            projection_spectrum(model, spectrum_batch, args) if spectrum_batch is not None else None
        )
        plot_training(project / "training.png", state["history"], spectrum_start, spectrum_end)
        summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        print(json.dumps(summary, indent=2))
    if args.push_to_hub and accelerator.is_main_process:
        from modeling_corinfomax.export import publish  # noqa: PLC0415

        publish(
            project,
            repo_id=args.hub_model_id,
            token=args.hub_token or os.environ.get("HF_TOKEN"),
            private=args.hub_private_repo,
        )
    return results


def save_model(model, project: Path, accelerator, best: dict | None = None) -> None:
    """`save_pretrained` into a staging folder, then rename each file into place, so a kill or a full disk
    never leaves a half-written model.safetensors (nor destroys the previous one).

    With `best` (the step and score of `--save_best_by`), the model and `best` (as best_model.json) go to
    <output_dir>/best instead, swapped in whole as checkpoints are: the folder always holds one step's
    weights with that step's json (`remove_unfinished_writes` completes a swap a kill interrupted)."""
    staging = project / (f".tmp-{BEST_MODEL}" if best else MODEL_STAGING)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging), is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process and best is not None:
            (staging / BEST_STATE).write_text(json.dumps(best))
            if (project / BEST_MODEL).exists():
                os.replace(project / BEST_MODEL, project / f".old-{BEST_MODEL}")
            os.replace(staging, project / BEST_MODEL)
            shutil.rmtree(project / f".old-{BEST_MODEL}", ignore_errors=True)
        elif accelerator.is_main_process:
            for path in staging.iterdir():
                os.replace(path, project / path.name)
            staging.rmdir()
    except Exception as error:  # noqa: BLE001  (a full disk raises OSError, RuntimeError or SafetensorError)
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(
            f"error: could not write the model to {project} ({type(error).__name__}: {error}). Free disk space "
            "and run again with --resume_from_checkpoint latest (training resumes from the newest checkpoint)."
        ) from None
    accelerator.wait_for_everyone()


def zero_init_last_off(config: CorInfoMaxConfig) -> dict:
    """timm zero-initialises the last BN of each residual block; untrained, every image then maps to
    nearly the same vector. The random-init baseline turns it off where the architecture has it."""
    import inspect  # noqa: PLC0415

    import timm  # noqa: PLC0415

    model_cls = type(
        timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.backbone_kwargs)
    )
    return (
        {"zero_init_last": False}
        if "zero_init_last" in inspect.signature(model_cls.__init__).parameters
        else {}
    )


def write_pictures(project: Path, features: dict, eval_rows: dict) -> None:
    """`embeddings.png` and `neighbours.png` of the final encoder (the model card shows them)."""
    from modeling_corinfomax.reporting import write_embedding_pictures  # noqa: PLC0415

    if any(len(features[split][0]) != len(eval_rows[split]) for split in ("train", "test")):
        logger.info("no embedding pictures: some evaluation images were unreadable (--skip_bad_images)")
        return
    written = write_embedding_pictures(
        project,
        *features["train"],
        *features["test"],
        lambda i: eval_rows["train"][i]["pixel_values"],
        lambda i: eval_rows["test"][i]["pixel_values"],
        class_names=eval_rows["names"],
    )
    logger.info("pictures of the embeddings: %s", ", ".join(str(path) for path in written))


def raw_pixels(rows, args):
    """Flattened normalised un-augmented pixels: the no-learning baseline."""
    loader = torch.utils.data.DataLoader(rows, batch_size=512, collate_fn=ExampleCollator(True))
    xs, ys, grey = [], [], True
    for batch in loader:
        pixels = batch["pixel_values"]
        grey = grey and bool((pixels == pixels[:, :1]).all())
        xs.append(normalize_batch(pixels, args.image_mean, args.image_std))
        ys.append(batch["labels"])
    # Grey images decoded to three equal channels: one copy of each pixel (three would divide the probe's
    # L2 penalty by three and slow its convergence).
    return torch.cat(xs)[:, : 1 if grey else None].flatten(1), torch.cat(ys)


def plot_training(path: Path, history: list[dict], spectrum_start, spectrum_end) -> None:
    """Loss curves (total and the two terms) and the projection covariance spectrum at start vs end."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    steps = [h["step"] for h in history]
    for ax, key, title in zip(
        axes[:3],
        ("loss", "invariance_loss", "covariance_loss"),
        ("CorInfoMax loss", "invariance term (MSE)", "covariance term (-logdet/D)"),
    ):
        ax.plot(steps, [h[key] for h in history])
        ax.set(title=title, xlabel="step")
    ax = axes[3]
    if spectrum_start is not None and spectrum_end is not None:
        ax.semilogy(spectrum_start.clamp_min(1e-12).numpy(), label="start")
        ax.semilogy(spectrum_end.clamp_min(1e-12).numpy(), label="end")
        ax.legend()
    ax.set(title="projection covariance eigenvalues", xlabel="index (sorted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
