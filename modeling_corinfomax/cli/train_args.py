"""The flags of `corinfomax-train` (train.py): parsing, the precedence of defaults, presets, config
files and flags, and the validation that refuses bad values before any data is loaded.

Precedence: built-in `DEFAULTS` < `--preset` < `--config` file < flags on the command line. A data source
on the command line replaces the preset's source and everything tied to it (`preset_values`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from accelerate.tracking import get_available_trackers as available_trackers
from accelerate.utils import LoggerType

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxModel
from modeling_corinfomax.cli.flags import (
    BooleanFlag,
    OneLineErrorParser,
    add_dataset_flags,
    add_host_memory_flag,
)
from modeling_corinfomax.data import PHOTO_RESOLUTION, TwoViewAugmentation, min_resolution
from modeling_corinfomax.data.resolution import SAMPLE_SIZE
from modeling_corinfomax.errors import ConfigurationError, DataError
from modeling_corinfomax.presets import BUNDLED_DEMO, DEFAULTS, PRESETS
from modeling_corinfomax.starting_point import resolve_starting_point

DESCRIPTION = """Pretrain a CorInfoMax image encoder with Accelerate on a `datasets` image corpus.

    accelerate launch train.py                                   # bundled Fashion-MNIST demo (CPU, ~10 min)
    accelerate launch train.py --preset cifar10                  # the paper's CIFAR-10 run from the Hub
    accelerate launch train.py --preset cifar10 --train_dir my_images   # the paper's recipe on your images
    accelerate launch --multi_gpu train.py --preset imagenet1k-r50 --dataset_name ILSVRC/imagenet-1k
    accelerate launch train.py --train_dir path/to/images --backbone convnext_tiny --image_size 224

Flags follow transformers' `run_image_classification_no_trainer.py`; every `CorInfoMaxConfig` field
is a flag of the same name. Precedence: built-in defaults < `--preset` < `--config` file < flags; a data
source on the command line (`--train_dir`, `--dataset_name`) replaces the preset's, which keeps its recipe.
"""

# Every tracker Accelerate can log to (`--report_to`).
TRACKERS = tuple(t.value for t in LoggerType if t.value != "all")

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


def build_parser() -> argparse.ArgumentParser:
    """The flags of corinfomax-train / train.py, grouped as in `--help`; each help ends with its default."""
    p = OneLineErrorParser(
        allow_abbrev=False,  # a misspelt flag is refused, never taken for a longer one
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("presets and config files")
    g.add_argument("--preset", choices=sorted(PRESETS), help="every hyperparameter of an original run")
    g.add_argument("--config", help="YAML or JSON file of flag values (unknown keys are refused)")
    for add_flags in (
        add_data_flags,
        add_model_flags,
        add_optimisation_flags,
        add_speed_flags,
        add_output_flags,
    ):
        add_flags(p)
    add_defaults_to_help(p)
    return p


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Where the images come from and which columns hold them."""
    bool_flag = BooleanFlag
    g = parser.add_argument_group("data")
    add_dataset_flags(g, label_help="optional: labels are used only for monitoring")
    g.add_argument("--train_dir", help="a local folder of images (imagefolder)")
    g.add_argument("--train_split")
    g.add_argument("--validation_split", help="labelled split for monitoring and the final evaluation")
    g.add_argument("--max_train_samples", type=int)
    g.add_argument("--max_eval_samples", type=int, help="size of the held-out split used for kNN monitoring")
    g.add_argument("--streaming", action=bool_flag)
    g.add_argument("--cache_dir")
    g.add_argument("--skip_bad_images", action=bool_flag, help="skip unreadable images (counted and logged)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The `CorInfoMaxConfig` fields: backbone, projector and the loss's hyperparameters."""
    bool_flag = BooleanFlag
    g = parser.add_argument_group("model (CorInfoMaxConfig fields)")
    g.add_argument(
        "--model_name_or_path",
        help="continue pretraining from these weights: a CorInfoMax folder or Hub id (backbone and projector), "
        "or a timm model (hf-hub:org/name, a timm name with pretrained weights, a timm-format or TimmWrapper "
        "folder, a .safetensors/.pth file with --backbone): the backbone starts from it, the projector fresh. "
        "The architecture is the checkpoint's; the recipe comes from the flags and preset",
    )
    g.add_argument(
        "--resume_loss_state",
        action=bool_flag,
        help="with a CorInfoMax --model_name_or_path: also start from its loss's running covariances and means",
    )
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
    g.add_argument(
        "--image_size",
        type=int,
        help="training and evaluation crop size. Default (no preset, flag or config): from the images, "
        f"whose sizes are read from {SAMPLE_SIZE} of them: their median short side, at most {PHOTO_RESOLUTION} (photos) and at least {min_resolution()} ({min_resolution(True)} "
        "with --cifar_stem), so that tiny images are upsampled until the last stage keeps a 2x2 map. On a CPU, "
        "a first run (no --image_size, length or budget given) is lowered until its planned steps fit in 15 "
        "minutes (a step is timed before training)",
    )
    g.add_argument("--image_mean", type=float, nargs=3)
    g.add_argument("--image_std", type=float, nargs=3)


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """Optimizer, batch, run length and learning-rate schedule."""
    bool_flag = BooleanFlag
    g = parser.add_argument_group("optimisation")
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
        "and save; an explicit --num_train_epochs/--max_train_steps caps it. A resolution from the data (no "
        "--image_size) that leaves fewer than 500 steps in the budget is lowered until it does (a step is timed "
        "before training)",
    )
    g.add_argument("--warmup_epochs", type=float)
    g.add_argument("--warmup_start_lr", type=float)
    g.add_argument("--min_lr", type=float)
    g.add_argument("--seed", type=int)


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """Precision, threads, compilation, data loading and distribution."""
    bool_flag = BooleanFlag
    g = parser.add_argument_group("speed and distribution")
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
    add_host_memory_flag(g, default=None)  # the default is in presets.DEFAULTS
    g.add_argument("--dataloader_num_workers", type=int)
    g.add_argument(
        "--image_cache",
        choices=["auto", "on", "off"],
        help="decode the training split once into memory and crop whole batches (auto: when its images share "
        "one size and fit in --image_cache_max_gb; the evaluation views are kept in memory too); off: decode "
        "and crop per image in DataLoader workers, every epoch",
    )
    g.add_argument("--image_cache_max_gb", type=float, help="memory limit of --image_cache, per process")
    g.add_argument(
        "--decode_on_device",
        action=bool_flag,
        help="per-image path (no image cache): workers only read each JPEG's bytes and header; the training "
        "device decodes the batch (nvJPEG on a GPU) and cuts both views there. Other formats are decoded "
        "by the workers as usual. Off by default (bench/jpeg.py measures it)",
    )
    g.add_argument("--sync_bn", action=bool_flag)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """Checkpoints, logging, collapse monitoring, the final evaluation and the Hub."""
    bool_flag = BooleanFlag
    g = parser.add_argument_group("checkpoints, monitoring and output")
    g.add_argument("--output_dir")
    g.add_argument("--checkpointing_steps", help="an integer number of steps, or 'epoch'")
    g.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest'")
    g.add_argument("--save_total_limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument(
        "--report_to",
        help=f"experiment trackers, comma-separated: {', '.join(TRACKERS)}; all (every installed one) or none",
    )
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
        help="collapse warning: the fraction of the window's highest effective rank that, lost at two logging "
        "steps in a row, is a collapse",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; resolve defaults < --preset < --config < explicit flags; validate everything."""
    p = build_parser()
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
    demo = bundled_demo_recipe(chosen) if uses_bundled_data(preset, chosen) else {}
    values = {**DEFAULTS, **demo, **preset_values(preset, chosen), **chosen, "preset": preset}
    args = argparse.Namespace(**values)
    args.bundled_demo = bool(demo)  # its recipe's epochs cap its budget (`cli.train.run_length`)
    args.explicit = sorted(chosen)  # what the user set (flags or --config), for the run-length rules
    apply_starting_point(args)
    validate_args(args)
    return args


def apply_starting_point(args: argparse.Namespace) -> None:
    """`--model_name_or_path`: the run takes the checkpoint's architecture (over the defaults and the preset;
    a different one set by the user is refused) and, unless set, the normalisation its weights were trained
    with. `args.starting_point` is the resolved source (None without the flag)."""
    args.starting_point = None
    if args.resume_loss_state and not args.model_name_or_path:
        raise SystemExit("error: --resume_loss_state needs --model_name_or_path (a CorInfoMax model).")
    if not args.model_name_or_path:
        return
    explicit_backbone = args.backbone if "backbone" in args.explicit else None
    try:
        start = resolve_starting_point(args.model_name_or_path, explicit_backbone)
    except ConfigurationError as error:
        raise SystemExit(f"error: {error}") from None
    for key, value in start.architecture.items():
        if key in args.explicit and getattr(args, key) != value:
            raise SystemExit(
                f"error: --{key} {getattr(args, key)} conflicts with --model_name_or_path {args.model_name_or_path}, "
                f"whose {key} is {value}: drop --{key} (the architecture is the checkpoint's)."
            )
        setattr(args, key, value)
    for key, value in start.preprocessing.items():
        if key not in args.explicit:
            setattr(args, key, value)
    args.starting_point = start


def uses_bundled_data(preset: str | None, chosen: dict) -> bool:
    """True for the bundled demo: no preset (each names its dataset) and no data source of the user's."""
    return preset is None and not chosen.get("dataset_name") and not chosen.get("train_dir")


def bundled_demo_recipe(chosen: dict) -> dict:
    """The bundled demo's recipe (`BUNDLED_DEMO`, the same on every machine: its time budget sizes the run to
    the machine's speed). Its default time budget gives way when the user sets the run's length (epochs,
    steps or a budget)."""
    recipe = dict(BUNDLED_DEMO)
    if {"num_train_epochs", "max_train_steps", "time_budget_minutes"} & chosen.keys():
        recipe.pop("time_budget_minutes")
    return recipe


def preset_values(preset: str | None, chosen: dict) -> dict:
    """The preset's values; when the user names a data source (`--dataset_name`/`--train_dir`), the preset's
    source and everything tied to it (config, splits, columns) give way to the defaults, so columns are
    resolved for the new source while every hyperparameter of the recipe stays."""
    values = dict(PRESETS[preset]) if preset else {}
    if chosen.get("dataset_name") or chosen.get("train_dir"):
        for key in DATA_SOURCE_KEYS:
            values.pop(key, None)
    return values


def add_defaults_to_help(parser: argparse.ArgumentParser) -> None:
    """Append each flag's built-in default to its help (flags are SUPPRESSed so presets can tell what was
    given; argparse would otherwise show no default)."""
    for action in parser._actions:
        key = action.dest
        if key not in DEFAULTS or DEFAULTS[key] is False or isinstance(DEFAULTS[key], dict):
            continue
        demo = [f"{BUNDLED_DEMO[key]} for the bundled demo"] if key in BUNDLED_DEMO else []
        if DEFAULTS[key] is None and not demo:
            continue
        value = DEFAULTS[key]
        shown = " ".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
        demo = f" ({'; '.join(demo)})" if demo else ""
        action.help = f"{action.help + '; ' if action.help else ''}default: {shown}{demo}"


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
    try:  # without --image_size, the size comes from the data (`set_image_size`); the rest is checked now
        fields = {k: getattr(args, k) for k in CONFIG_FIELDS}
        args.model_config = CorInfoMaxConfig(**{**fields, "image_size": args.image_size or PHOTO_RESOLUTION})
    except (ValueError, TypeError) as error:
        fail(str(error))
    check_ranges(args, fail)
    check_combinations(args, fail)
    try:
        args.two_view_augmentation = TwoViewAugmentation.from_dict(args.augmentation)
    except (DataError, TypeError) as error:
        fail(f"bad augmentation setting: {error}")
    check_backbone_accepts_image_size(args.model_config, fail, forward=args.image_size is not None)


def check_ranges(args: argparse.Namespace, fail) -> None:
    """Each number within its range."""
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


def check_combinations(args: argparse.Namespace, fail) -> None:
    """Flags that need each other or exclude each other, and the files and services they name."""
    if args.push_to_hub:
        check_push_is_possible(args, fail)
    args.report_to = resolve_trackers(args.report_to, fail)
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


def set_image_size(args: argparse.Namespace, image_size: int) -> None:
    """Set the resolution chosen from the data (`--image_size` was not given) and check the backbone takes it;
    a backbone that cannot take it raises `ConfigurationError` (found after the flags, with the data)."""

    def fail(message: str):
        raise ConfigurationError(message)

    args.image_size = args.model_config.image_size = image_size
    check_backbone_accepts_image_size(args.model_config, fail)


def set_backbone(args: argparse.Namespace, backbone: str) -> None:
    """Set a backbone the run chose itself (the time budget's rule, or a resumed run's choice)."""
    args.backbone = args.model_config.backbone = backbone
    args.model_config.validate_corinfomax()


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


def check_backbone_accepts_image_size(config: CorInfoMaxConfig, fail, forward: bool = True) -> None:
    """Build the backbone once and (`forward`) run two images through it, so a size it cannot take fails now
    (without `forward`: the size is not known yet, only the backbone is checked)."""
    try:
        model = CorInfoMaxModel(config, add_projector=False).eval()
        with torch.no_grad():
            if forward:
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


def resolve_trackers(value: str, fail) -> str | list[str]:
    """`--report_to` as Accelerate's `log_with` takes it: "none", "all", or a list of installed trackers."""
    names = [name.strip() for name in str(value).split(",") if name.strip()]
    if names in (["none"], ["all"]):
        return names[0]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names:
        fail(
            f"--report_to {value!r}: unknown tracker {unknown}; choose from {', '.join(TRACKERS)}, all or none."
        )
    installed = {str(getattr(t, "value", t)) for t in available_trackers()}
    for name in names:
        if name not in installed:
            fail(
                f"--report_to {name} needs `pip install {name.replace('_', '-')}`; or pass --report_to none."
            )
    return names
