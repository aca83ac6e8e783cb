"""The backbone alone in timm's own format (plain timm keys, timm's config.json): it loads with
`timm.create_model("hf-hub:...")` and with transformers' TimmWrapper, with no custom code."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf

from ..configuration_corinfomax import CorInfoMaxConfig, eval_resize_size
from ..modeling_corinfomax import (
    CorInfoMaxForImageClassification,
    CorInfoMaxForPreTraining,
    CorInfoMaxModel,
    register_cifar_stem_architecture,
)
from ..wrappers import corinfomax_encoder
from .common import DEFAULT_LICENSE, OFFICIAL_CODE_URL, PAPER_ARXIV_ID, PAPER_TITLE

_HEADS = {
    cls.__name__: cls for cls in (CorInfoMaxForPreTraining, CorInfoMaxModel, CorInfoMaxForImageClassification)
}


def timm_architecture(config: CorInfoMaxConfig) -> str:
    """The timm architecture name of the backbone: `config.backbone`, or `<backbone>_cifar_stem`."""
    if not config.cifar_stem:
        return config.backbone
    return register_cifar_stem_architecture(config.backbone)


def timm_data_config(config: CorInfoMaxConfig) -> dict[str, Any]:
    """The evaluation preprocessing of `make_image_processor` in timm's terms: resize the short side to
    `int(image_size * 8/7)` (bicubic), centre-crop `image_size`, normalise with the config's mean/std."""
    resize = eval_resize_size(config.image_size)
    crop_pct = config.image_size / resize
    if math.floor(config.image_size / crop_pct) != resize:
        # timm resizes to floor(image_size / crop_pct): never let float rounding lose a pixel.
        crop_pct = config.image_size / (resize + 0.5)
    return {
        "input_size": (3, config.image_size, config.image_size),
        "interpolation": "bicubic",
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
    }


def export_timm_backbone(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    license: str | None = DEFAULT_LICENSE,
    description: str | None = None,
) -> Path:
    """Write the backbone alone in timm's format: `model.safetensors` with plain timm keys and timm's
    `config.json` (`architecture`, `num_classes: 0`, `pretrained_cfg` with our evaluation preprocessing).

    The folder loads with `timm.create_model("local-dir:DIR", pretrained=True)`, transformers'
    `AutoModel.from_pretrained(DIR)` (a `TimmWrapperModel` whose `pooler_output` equals our
    `pooler_output`), `AutoModelForImageClassification.from_pretrained(DIR, num_labels=N)`,
    `AutoImageProcessor` and `pipeline("image-feature-extraction", model=DIR)`. A CIFAR-stem backbone is
    written as `<backbone>_cifar_stem`, which exists once `modeling_corinfomax` is imported.

    Args:
        model: a `CorInfoMaxModel`, `CorInfoMaxForPreTraining` or `CorInfoMaxForImageClassification`.
        output_dir: the folder to write (created if needed).
        license: recorded in `pretrained_cfg["license"]`.
        description: recorded in `pretrained_cfg["description"]`.

    Returns:
        `output_dir` as a `Path`.
    """
    corinfomax = corinfomax_encoder(model)
    config = corinfomax.config
    backbone = corinfomax.backbone
    if getattr(backbone, "num_classes", 0) != 0:
        raise ValueError(
            f"the backbone has a {backbone.num_classes}-class head; CorInfoMax backbones are built with "
            "num_classes=0. Export the backbone of a CorInfoMax checkpoint."
        )
    source_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    data_config = timm_data_config(config)
    # A shallow copy shares the weights but gets its own metadata: the source checkpoint's tag, paper,
    # license and test sizes describe timm's ImageNet weights, not ours.
    exported = copy.copy(backbone)
    exported.pretrained_cfg = {
        "architecture": timm_architecture(config),
        "custom_load": False,
        **data_config,
        "fixed_input_size": source_cfg.get("fixed_input_size", False),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": source_cfg.get("first_conv"),
        "classifier": source_cfg.get("classifier"),
        "license": license,
        "description": description,
        "paper_name": PAPER_TITLE,
        "paper_ids": f"arXiv:{PAPER_ARXIV_ID}",
        "origin_url": OFFICIAL_CODE_URL,
    }
    exported.pretrained_cfg = {
        k: v for k, v in exported.pretrained_cfg.items() if v is not None or k in {"pool_size"}
    }
    output_dir = Path(output_dir)
    save_for_hf(exported, output_dir, safe_serialization=True, data_config=data_config)

    config_path = output_dir / "config.json"
    timm_config = json.loads(config_path.read_text())
    # timm 1.0.31 records num_classes in model_args and transformers' TimmWrapper passes num_classes
    # itself: "got multiple values for keyword argument 'num_classes'". The top-level num_classes stays.
    timm_config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(timm_config, indent=2) + "\n")
    return output_dir


def load_saved_model(checkpoint_dir: str | os.PathLike) -> torch.nn.Module:
    """Load a CorInfoMax `save_pretrained` folder with the head it was saved from (`config.architectures`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no config.json: pass the folder a CorInfoMax model was saved to with "
            "save_pretrained (train.py's --output_dir, or hub/convert_official.py's output)."
        )
    config = CorInfoMaxConfig.from_pretrained(checkpoint_dir)
    names = [name for name in (config.architectures or []) if name in _HEADS]
    model_class = _HEADS[names[0]] if names else CorInfoMaxForPreTraining
    return model_class.from_pretrained(checkpoint_dir).eval()
