"""Where a pretraining run's weights start: `--model_name_or_path`, for continued pretraining.

A run starts from random weights, or from one of these (`resolve_starting_point` tells them apart by what
the source holds, not by its name):

- **a CorInfoMax model** (a `save_pretrained` folder of any head, or its Hub id): backbone and projector
  weights, and with `resume_loss_state` the loss's running covariances and means;
- **a timm model**: an `hf-hub:org/name` id, a timm name with a pretrained tag (`resnet50.a1_in1k`) whose
  weights timm finds (the local Hugging Face cache when offline), a timm-format folder or Hub id
  (`config.json` with an `architecture`, as our timm export writes), a transformers `TimmWrapper`
  checkpoint (the same config, `timm_model.`-prefixed keys), or a bare `.safetensors`/`.pth` file of the
  architecture `--backbone` names: the backbone starts from those weights, the projector from scratch.

The architecture (backbone, its kwargs, the CIFAR stem and, for a CorInfoMax source, the projector) is the
source's: `architecture_fields` gives the values, and a run that set a different one is refused by the
caller. The rest of the recipe (loss, optimiser, resolution) comes from the run's flags as usual.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import ConfigurationError
from .modeling_corinfomax import CIFAR_STEM_SUFFIX, register_cifar_stem_architecture

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
TIMM_WRAPPER_PREFIX = "timm_model."
PRETRAINING_PREFIX = "corinfomax."
LOSS_PREFIX = "loss_fn."


@dataclass
class StartingPoint:
    """A resolved `--model_name_or_path`: what it is, the architecture it fixes, and where its weights are.

    `kind` is `"corinfomax"`, `"timm"` (a timm-format folder or TimmWrapper checkpoint, read from
    `folder`), `"timm_name"` (weights timm fetches itself) or `"timm_file"` (a bare weights file).
    """

    source: str
    kind: str
    architecture: dict
    folder: Path | None = None
    timm_name: str | None = None
    file: Path | None = None
    preprocessing: dict = field(default_factory=dict)  # image_mean / image_std the weights were trained with

    def describe(self) -> str:
        what = {"corinfomax": "a CorInfoMax model", "timm_file": "a timm weights file"}.get(
            self.kind, "a timm model"
        )
        return f"{self.source} ({what}, {architecture_name(self.architecture)})"


def architecture_name(fields: dict) -> str:
    return fields["backbone"] + (" with the CIFAR stem" if fields.get("cifar_stem") else "")


def resolve_starting_point(
    source: str, backbone: str | None = None, revision: str | None = None
) -> StartingPoint:
    """Tell what `source` is (see the module docstring) from its config, without loading weights.

    `backbone` is needed only for a bare weights file, which does not name its architecture. Raises
    `ConfigurationError` naming the source and what would work.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ConfigurationError(
                f"--model_name_or_path {source}: a weights file must end in {', '.join(CHECKPOINT_SUFFIXES)}."
            )
        if not backbone:
            raise ConfigurationError(
                f"--model_name_or_path {source} is a bare weights file, which does not name its architecture: "
                "pass --backbone (the timm name it was saved from), or point at its folder with config.json."
            )
        return StartingPoint(source, "timm_file", timm_architecture_fields(backbone), file=path)
    if path.is_dir():
        return from_folder(source, path)
    if source.startswith("hf-hub:"):
        return from_folder(source, download(source.removeprefix("hf-hub:"), revision))
    if "/" not in source and timm.is_model(source):  # a timm name, with or without a pretrained tag
        cfg = timm.models.get_pretrained_cfg(source)
        preprocessing = {"image_mean": list(cfg.mean), "image_std": list(cfg.std)} if cfg is not None else {}
        fields = timm_architecture_fields(source.split(".")[0])
        return StartingPoint(source, "timm_name", fields, timm_name=source, preprocessing=preprocessing)
    if source.count("/") == 1:
        return from_folder(source, download(source, revision))
    raise ConfigurationError(
        f"--model_name_or_path {source}: not a folder, a weights file, a timm model name or a Hub id "
        "(org/name or hf-hub:org/name)."
    )


def download(repo_id: str, revision: str | None) -> Path:
    """The config and weights of a Hub repo, from the cache when offline."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin"]
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise ConfigurationError(
            f"--model_name_or_path {repo_id}: cannot get it from the Hub or its local cache "
            f"({type(error).__name__}: {str(error).splitlines()[0]}). Check the id, the network, or "
            "download it first (`hf download`)."
        ) from None


def from_folder(source: str, folder: Path) -> StartingPoint:
    """A CorInfoMax folder (`model_type: corinfomax`) or a timm-format / TimmWrapper one (`architecture`)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigurationError(
            f"--model_name_or_path {source}: {folder} has no config.json; pass a CorInfoMax or timm model folder."
        )
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "corinfomax":
        fields = {key: config[key] for key in ("backbone", "backbone_kwargs", "cifar_stem") if key in config}
        fields.update(
            projector_dims=config["projector_dims"], projector_batchnorm=config["projector_batchnorm"]
        )
        preprocessing = {key: config[key] for key in ("image_mean", "image_std") if key in config}
        return StartingPoint(source, "corinfomax", fields, folder=folder, preprocessing=preprocessing)
    if "architecture" in config:
        fields = timm_architecture_fields(config["architecture"], config.get("model_args"))
        cfg = config.get("pretrained_cfg") or {}
        preprocessing = {f"image_{key}": list(cfg[key]) for key in ("mean", "std") if key in cfg}
        return StartingPoint(source, "timm", fields, folder=folder, preprocessing=preprocessing)
    raise ConfigurationError(
        f"--model_name_or_path {source}: its config.json is neither a CorInfoMax config (model_type "
        f"{config.get('model_type')!r}) nor a timm one (no 'architecture')."
    )


def timm_architecture_fields(architecture: str, model_args: dict | None = None) -> dict:
    """The CorInfoMax architecture fields of a timm architecture (`<name>_cifar_stem` is our CIFAR stem)."""
    kwargs = {k: v for k, v in (model_args or {}).items() if k not in ("num_classes", "pretrained")}
    cifar_stem = architecture.endswith(CIFAR_STEM_SUFFIX)
    backbone = architecture.removesuffix(CIFAR_STEM_SUFFIX)
    if not timm.is_model(backbone):
        raise ConfigurationError(
            f"--model_name_or_path names the architecture {architecture!r}, which this timm "
            f"({timm.__version__}) does not know: upgrade timm, or check the name."
        )
    return {"backbone": backbone, "backbone_kwargs": kwargs, "cifar_stem": cifar_stem}


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weights (one file, or the shards of an index)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if name.endswith(".safetensors"):
                return load_file(folder / name)
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    raise ConfigurationError(f"{folder} has no weights file ({', '.join(WEIGHT_FILES)}).")


def backbone_weights(start: StartingPoint) -> dict[str, torch.Tensor]:
    """The backbone's weights with timm's keys, without the classifier."""
    if start.kind == "timm":
        weights = read_weights(start.folder)
        if any(k.startswith(TIMM_WRAPPER_PREFIX) for k in weights):  # a TimmWrapper built by transformers
            weights = {k.removeprefix(TIMM_WRAPPER_PREFIX): v for k, v in weights.items()}
        return weights
    name = start.timm_name or start.architecture["backbone"]
    if start.architecture["cifar_stem"]:
        name = register_cifar_stem_architecture(name)
    overlay = {"file": str(start.file)} if start.kind == "timm_file" else None
    try:
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay=overlay,
            **start.architecture["backbone_kwargs"],
        )
    except (RuntimeError, OSError, ValueError) as error:
        raise ConfigurationError(
            f"--model_name_or_path {start.source}: timm could not load its weights ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). Offline, the weights must be in the Hugging Face cache."
        ) from None
    return model.state_dict()


def load_starting_weights(model: nn.Module, start: StartingPoint, resume_loss_state: bool = False) -> str:
    """Copy the starting weights into `model` (a `CorInfoMaxForPreTraining` of `start`'s architecture):
    every backbone tensor, the projector's for a CorInfoMax source, the loss state with
    `resume_loss_state`. Anything missing or of another shape raises `ConfigurationError`. Returns a line
    for the log."""
    encoder = model.corinfomax
    if start.kind != "corinfomax":
        if resume_loss_state:
            raise ConfigurationError(
                f"--resume_loss_state: {start.source} is a timm model, it has no CorInfoMax loss state."
            )
        loaded = copy_into(encoder.backbone, backbone_weights(start), start, classifier_ok=True)
        return f"{start.describe()}: backbone ({loaded} tensors); projector and loss state fresh"
    weights = {k.removeprefix(PRETRAINING_PREFIX): v for k, v in read_weights(start.folder).items()}
    encoder_part = {k: v for k, v in weights.items() if k.startswith(("backbone.", "projector."))}
    has_projector = any(k.startswith("projector.") for k in encoder_part)
    target = encoder if has_projector else encoder.backbone
    if not has_projector:  # a classification checkpoint: its backbone only
        encoder_part = {k.removeprefix("backbone."): v for k, v in encoder_part.items()}
    loaded = copy_into(target, encoder_part, start)
    parts = "backbone, projector" if has_projector else "backbone (it has no projector: fresh)"
    if not resume_loss_state:
        return f"{start.describe()}: {parts} ({loaded} tensors); loss state fresh"
    loss = {k.removeprefix(LOSS_PREFIX): v for k, v in weights.items() if k.startswith(LOSS_PREFIX)}
    if not loss:
        raise ConfigurationError(
            f"--resume_loss_state: {start.source} holds no loss state (it was saved without its pretraining "
            "head): drop --resume_loss_state, or pass the training run's folder."
        )
    copy_into(model.loss_fn, loss, start)
    return f"{start.describe()}: {parts} and loss state ({loaded + len(loss)} tensors)"


def copy_into(
    module: nn.Module, weights: dict[str, torch.Tensor], start: StartingPoint, classifier_ok=False
) -> int:
    """Load `weights` into `module` exactly (every tensor present, each of its shape); a classifier the
    backbone was built without (`num_classes=0`) is left out where `classifier_ok`."""
    expected = module.state_dict()
    extra = sorted(set(weights) - set(expected))
    if classifier_ok:  # the source's classification head: not part of a num_classes=0 backbone
        extra = [k for k in extra if not is_classifier_key(module, k)]
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or extra or wrong:
        problems = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("other shapes", wrong))
            if keys
        )
        raise ConfigurationError(
            f"--model_name_or_path {start.source}: its weights do not fit {architecture_name(start.architecture)} "
            f"({problems}). Was it saved from another architecture or with other backbone_kwargs?"
        )
    module.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=True)
    return len(expected)


def is_classifier_key(backbone: nn.Module, key: str) -> bool:
    """A key of timm's classifier (`pretrained_cfg["classifier"]`, e.g. `fc` or `head.fc`)."""
    classifier = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    names = classifier if isinstance(classifier, list | tuple) else [classifier]
    return any(key.startswith(name + ".") for name in names)
