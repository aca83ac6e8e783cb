"""Convert a checkpoint of the original CorInfoMax code (github.com/serdarozsoy/corinfomax-ssl) into a
`CorInfoMaxForPreTraining` save_pretrained folder.

    python hub/convert_official.py <official .pth> <out_dir> [--preset NAME] [--alpha 250 ...]

Accepted files (the official code's `torch.save` calls), loaded with `torch.load(weights_only=True)` only:

- full checkpoints `t_<time>_<name>_model<epoch>.pth`: `{"model_state_dict": {"backbone.*", "projector.*"},
  "parameters_dict": {...}, ...}` from every setting (CIFAR 3x3 stems, Tiny ImageNet's 7x7 stem, ImageNet-100 R18/R50, the
  ImageNet-1K projector with BatchNorm);
- backbone-only files `t_<time>_<name>_resnet50.pth` (plain torchvision ResNet keys; the projector is
  then freshly initialised, with `--projector_dims` or the preset's sizes).

The backbone (BasicBlock/Bottleneck, depth, width), the stem (3x3 CIFAR or 7x7), the projector sizes and
BatchNorm are read from the weights; the loss hyperparameters from `parameters_dict` (alpha=sim_loss_weight,
lambda_R=la_R, lambda_mu=la_mu, R_init=R_ini, eps=R_eps_weight, normalize=normalize_on) or `--preset`;
any flag overrides. torchvision's ResNet keys are timm's. The converter then rebuilds the original
network (torchvision ResNet with fc=Identity, the CIFAR stem patch, the official nn.Sequential projector)
and checks that our model gives the same features and projections on a random batch. The loss's running
covariances are not in official checkpoints: ours start at `R_init * I`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxForPreTraining
from modeling_corinfomax.cli.flags import HelpFormatter, exits_on_error
from modeling_corinfomax.errors import CheckpointError
from modeling_corinfomax.modeling_corinfomax import build_projector
from modeling_corinfomax.presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS
from modeling_corinfomax.reporting import TRAINING_ARGS_NAME

# Our config field -> the official `parameters_dict` key.
OFFICIAL_FLAGS = {
    "alpha": "sim_loss_weight",
    "lambda_R": "la_R",
    "lambda_mu": "la_mu",
    "R_init": "R_ini",
    "eps": "R_eps_weight",
    "normalize": "normalize_on",
}
# (block, blocks per stage, width of layer1's first conv) -> the name in torchvision and timm.
RESNETS = {
    ("BasicBlock", (2, 2, 2, 2), 64): "resnet18",
    ("BasicBlock", (3, 4, 6, 3), 64): "resnet34",
    ("Bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("Bottleneck", (3, 4, 23, 3), 64): "resnet101",
    ("Bottleneck", (3, 8, 36, 3), 64): "resnet152",
    ("Bottleneck", (3, 4, 6, 3), 128): "wide_resnet50_2",
    ("Bottleneck", (3, 4, 23, 3), 128): "wide_resnet101_2",
}
# Official `--dataset` values -> our preset (image size, normalisation), most specific first.
DATASET_PRESETS = (
    ("cifar100", "cifar100"),
    ("cifar10", "cifar10"),
    ("tiny", "tiny-imagenet"),
    ("imagenet100", "imagenet100-r50"),
    ("imagenet-100", "imagenet100-r50"),
    ("imagenet", "imagenet1k-r50"),
)
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
REFUSED = (
    "{path} could not be loaded with torch.load(weights_only=True): {error}. Official CorInfoMax checkpoints "
    "hold only tensors and plain Python values; anything else (pickled classes or functions) is refused, "
    "because unpickling it can run arbitrary code. If you trust the file, re-save its tensors with plain "
    "keys in a separate trusted environment and convert that."
)


class ConversionError(CheckpointError, ValueError):
    """The file is not an official CorInfoMax checkpoint this converter understands."""


@dataclass
class OfficialCheckpoint:
    """The parts of an official checkpoint: torchvision ResNet weights, the projector (`None` for a
    backbone-only file), the run's hyperparameters (`None` if absent) and the keys that were skipped."""

    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None
    parameters: dict[str, Any] | None
    layout: str
    ignored: list[str] = field(default_factory=list)


def load_official(path: str | Path) -> OfficialCheckpoint:
    """Read an official checkpoint (full dict or backbone-only) with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass an official .pth checkpoint.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (every refusal gets the same explanation)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(REFUSED.format(path=path, error=first_line)) from None
    if not isinstance(raw, dict):
        raise ConversionError(
            f"{path} holds a {type(raw).__name__}, not a dict of tensors or a checkpoint dict."
        )
    parameters = raw.get("parameters_dict") if isinstance(raw.get("parameters_dict"), dict) else None
    state = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), dict)), raw)
    tensors = {re.sub(r"^module\.", "", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}

    if any(k.startswith("backbone.") for k in tensors):
        backbone = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
        projector = {k[len("projector.") :]: v for k, v in tensors.items() if k.startswith("projector.")}
        ignored = [k for k in tensors if not k.startswith(("backbone.", "projector."))]
        layout = "full" if projector else "backbone (prefixed)"
        projector = projector or None
    elif "conv1.weight" in tensors:
        backbone, projector, layout = tensors, None, "backbone-only"
        ignored = []
    else:
        keys = sorted(state)[:8]
        raise ConversionError(
            f"{path} is not an official CorInfoMax checkpoint: expected 'model_state_dict' with 'backbone.*' and "
            f"'projector.*' keys, or a ResNet state dict with 'conv1.weight'; found keys {keys}."
        )
    # fc is Identity in the official model; a supervised torchvision file would carry one: not ours to keep.
    ignored += [f"backbone.{k}" for k in backbone if k.startswith("fc.")]
    backbone = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
    return OfficialCheckpoint(backbone, projector, parameters, layout, ignored)


def infer_resnet(backbone: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """`(architecture, cifar_stem)` of a torchvision ResNet state dict, from its key layout and shapes."""
    conv1 = backbone.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise ConversionError(
            "the backbone has no 'conv1.weight': it is not a torchvision ResNet state dict."
        )
    kernel = tuple(conv1.shape[-2:])
    if kernel not in ((3, 3), (7, 7)):
        raise ConversionError(
            f"conv1 has a {kernel} kernel; official stems are 3x3 (CIFAR) or 7x7 (ImageNet)."
        )
    block = "Bottleneck" if "layer1.0.conv3.weight" in backbone else "BasicBlock"
    depth = []
    for stage in range(1, 5):
        blocks = {int(m[1]) for k in backbone if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks:
            raise ConversionError(f"the backbone has no layer{stage}: not a 4-stage ResNet.")
        depth.append(max(blocks) + 1)
    width = backbone["layer1.0.conv1.weight"].shape[0]
    if block == "Bottleneck" and backbone["layer1.0.conv2.weight"].shape[1] != width:
        raise ConversionError(
            "grouped 3x3 convolutions (ResNeXt) are not supported; only ResNet/Wide-ResNet."
        )
    name = RESNETS.get((block, tuple(depth), width))
    if name is None:
        known = ", ".join(sorted(set(RESNETS.values())))
        raise ConversionError(
            f"no known ResNet has {block} blocks {tuple(depth)} of width {width}; supported: {known}. "
            "Pass --backbone if it is a timm/torchvision ResNet with the same keys."
        )
    return name, kernel == (3, 3)


def infer_projector(projector: dict[str, torch.Tensor], in_features: int) -> tuple[list[int], bool]:
    """`(projector_dims, projector_batchnorm)` of the official `nn.Sequential` projector weights."""
    indices = sorted({int(k.split(".")[0]) for k in projector})
    linears = [
        i for i in indices if projector.get(f"{i}.weight") is not None and projector[f"{i}.weight"].ndim == 2
    ]
    batchnorm = any(f"{i}.running_mean" in projector for i in indices)
    dims = [projector[f"{i}.weight"].shape[0] for i in linears]
    if not dims:
        raise ConversionError(f"the projector has no Linear layers (keys {sorted(projector)[:6]}).")
    # Ours has the official layout (Linear [BN] ReLU ... Linear without bias): keys and shapes must agree.
    expected = build_projector(in_features, dims, batchnorm).state_dict()
    shapes = {k: tuple(v.shape) for k, v in projector.items()}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ConversionError(
            f"the projector's layout {sorted(shapes)} is not the official one for {in_features}-d features "
            f"(expected {sorted(expected)}): Linear(+bias) [BatchNorm1d] ReLU per hidden layer, then a bias-free Linear."
        )
    return dims, batchnorm


def preset_for_dataset(dataset: Any) -> str | None:
    """Our preset name for an official `--dataset` value ('cifar10', 'tiny_imagenet', ...), or None."""
    name = re.sub(r"[\s_]", "", str(dataset or "").lower())
    return next((preset for key, preset in DATASET_PRESETS if key in name), None)


def check_contradictions(values: dict, params: dict, stem: tuple, inferred_projector: tuple | None) -> None:
    """Refuse flags that contradict the weights, and an official loss weighting ours cannot express."""
    backbone, cifar_stem = stem
    if inferred_projector is not None:
        dims, batchnorm = inferred_projector
    if values["backbone"] != backbone or values["cifar_stem"] != cifar_stem:
        raise ConversionError(
            f"--backbone {values['backbone']} / --cifar_stem {values['cifar_stem']} contradict the weights "
            f"({backbone}, cifar_stem={cifar_stem}); drop the flag."
        )
    if inferred_projector is not None and (
        values["projector_dims"] != dims or values.get("projector_batchnorm", batchnorm) != batchnorm
    ):
        raise ConversionError(
            f"--projector_dims/--projector_batchnorm contradict the checkpoint's projector ({dims}, "
            f"batchnorm={batchnorm}); drop the flags."
        )
    if params.get("cov_loss_weight", 1.0) != 1.0:
        raise ConversionError(
            f"parameters_dict['cov_loss_weight']={params['cov_loss_weight']}: our loss fixes the log-det weight at 1 "
            "(as every official run). Divide alpha by it instead if you want the same minimiser."
        )


def resolve_config(
    checkpoint: OfficialCheckpoint, overrides: dict[str, Any]
) -> tuple[CorInfoMaxConfig, dict]:
    """Our config from the weights, `parameters_dict`, a preset and the overrides (in increasing priority).
    Returns the config and where each value came from."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}

    def put(key: str, value: Any, source: str) -> None:
        values[key], sources[key] = value, source

    backbone, cifar_stem = infer_resnet(checkpoint.backbone)
    put("backbone", backbone, "weights")
    put("cifar_stem", cifar_stem, "weights (conv1 kernel)")
    params = checkpoint.parameters or {}
    preset_name = overrides.pop("preset", None) or preset_for_dataset(params.get("dataset"))
    if preset_name is not None and preset_name not in PRESETS:
        raise ConversionError(f"--preset {preset_name!r} is unknown; choose one of {sorted(PRESETS)}.")
    preset = PRESETS.get(preset_name, {})
    for key in ("image_size", "image_mean", "image_std"):
        if key in preset:
            put(key, preset[key], f"preset {preset_name}")
    if "image_size" not in values:
        put("image_size", 32 if cifar_stem else 224, "stem")
        put("image_mean", IMAGENET_MEAN, "default")
        put("image_std", IMAGENET_STD, "default")
    for ours in OFFICIAL_FLAGS:
        if ours in preset:
            put(ours, preset[ours], f"preset {preset_name}")
    for ours, official in OFFICIAL_FLAGS.items():
        if params.get(official) is not None:
            put(ours, params[official], f"parameters_dict[{official!r}]")

    # The width of the last BatchNorm of layer4 is the feature size (512 for BasicBlock nets, else 2048).
    feature_dim = [
        v for k, v in checkpoint.backbone.items() if re.fullmatch(r"layer4\.\d+\.bn\d\.weight", k)
    ][-1]
    feature_dim = feature_dim.shape[0]
    inferred_projector = None
    if checkpoint.projector is not None:
        dims, batchnorm = inferred_projector = infer_projector(checkpoint.projector, feature_dim)
        put("projector_dims", dims, "weights")
        put(
            "projector_batchnorm", batchnorm, "weights (projector.1.running_mean)" if batchnorm else "weights"
        )
    elif "projector_dims" in preset:
        put("projector_dims", preset["projector_dims"], f"preset {preset_name}")
        put("projector_batchnorm", preset["projector_batchnorm"], f"preset {preset_name}")
    else:  # the ImageNet-1K projector: backbone-only files come from the ImageNet scripts
        put("projector_dims", [8192, 8192, 512], "default (ImageNet-1K run)")
        put("projector_batchnorm", True, "default (ImageNet-1K run)")
    for key, value in overrides.items():
        put(key, value, "flag")

    check_contradictions(values, params, (backbone, cifar_stem), inferred_projector)
    return CorInfoMaxConfig(**values), sources


def official_network(
    checkpoint: OfficialCheckpoint, config: CorInfoMaxConfig
) -> tuple[nn.Module, nn.Module | None]:
    """The original model rebuilt the way the official code builds it: a torchvision ResNet with
    `fc = Identity()` (CIFAR: 3x3 stride-1 conv1, no max-pool) and the `nn.Sequential` projector."""
    backbone = getattr(torchvision.models, config.backbone)(weights=None)
    backbone.fc = nn.Identity()
    if config.cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    backbone.load_state_dict(checkpoint.backbone)
    if checkpoint.projector is None:
        return backbone.eval(), None
    sizes = [backbone.inplanes, *config.projector_dims]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if config.projector_batchnorm:
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
        layers.append(nn.ReLU(True))
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    projector = nn.Sequential(*layers)
    projector.load_state_dict(checkpoint.projector)
    return backbone.eval(), projector.eval()


def verify_against_original(model, checkpoint: OfficialCheckpoint, config, seed: int) -> dict[str, float]:
    """The largest feature (and projection) differences between `model` and the original network rebuilt
    from the checkpoint, on seeded random images; a converter bug raises."""
    backbone, projector = official_network(checkpoint, config)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(
        4, 3, 32 if config.cifar_stem else 64, 32 if config.cifar_stem else 64, generator=generator
    )
    with torch.no_grad():
        ours = model.corinfomax(x)
        features = backbone(x)
        report_diffs = {"features": (ours.pooler_output - features).abs().max().item()}
        if projector is not None:
            report_diffs["projections"] = (ours.projections - projector(features)).abs().max().item()
    scale = max(1.0, features.abs().max().item())
    if any(diff > 1e-4 * scale for diff in report_diffs.values()):
        raise ConversionError(
            f"the converted model differs from the original network (max abs differences {report_diffs}); "
            "this is a converter bug for this layout, please report it with the report below."
        )
    return report_diffs


def convert(
    path: str | Path, out_dir: str | Path, overrides: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Convert `path` into `out_dir` (a `CorInfoMaxForPreTraining` save_pretrained folder) and verify it.

    Returns the report also written to `out_dir/conversion.json`: the source file and its sha256, the
    layout, the config values with their sources, skipped keys and the largest feature/projection
    differences from the rebuilt original network.
    """
    path, out_dir = Path(path), Path(out_dir)
    if (out_dir / "config.json").exists():
        raise CheckpointError(f"{out_dir} already holds a model; choose an empty output folder.")
    checkpoint = load_official(path)
    config, sources = resolve_config(checkpoint, dict(overrides or {}))

    model = CorInfoMaxForPreTraining(config).eval()
    state = {f"corinfomax.backbone.{k}": v for k, v in checkpoint.backbone.items()}
    state.update({f"corinfomax.projector.{k}": v for k, v in (checkpoint.projector or {}).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = ("loss_fn.",) + (() if checkpoint.projector else ("corinfomax.projector.",))
    missing = [k for k in missing if not k.startswith(allowed_missing)]
    if missing or unexpected:
        raise ConversionError(
            f"the weights do not fit timm's {config.backbone}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )

    report_diffs = verify_against_original(model, checkpoint, config, seed)

    model.save_pretrained(out_dir)
    if checkpoint.parameters is not None:
        args = {
            "source": f"official CorInfoMax code, parameters_dict of {path.name}",
            **checkpoint.parameters,
        }
        (out_dir / TRAINING_ARGS_NAME).write_text(json.dumps(args, indent=2, default=str) + "\n")
    report = {
        "source": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "layout": checkpoint.layout,
        "config": {k: getattr(config, k) for k in sources},
        "sources": sources,
        "ignored_keys": checkpoint.ignored,
        "max_abs_difference": report_diffs,
        "notes": [
            "the loss's running covariances (R1, R2, mu1, mu2) are not in official checkpoints: they start at "
            "R_init * I and 0"
        ]
        + (
            ["the projector is freshly initialised (backbone-only file)"]
            if checkpoint.projector is None
            else []
        ),
    }
    (out_dir / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="an official CorInfoMax .pth file")
    parser.add_argument(
        "out_dir", help="the folder to write (CorInfoMaxForPreTraining.save_pretrained format)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="defaults where the file has no parameters_dict"
    )
    parser.add_argument("--backbone", help="override the inferred ResNet")
    parser.add_argument("--cifar_stem", type=lambda s: s.lower() in ("1", "true", "yes"), help="true/false")
    parser.add_argument(
        "--projector_dims", type=int, nargs="+", help="for backbone-only files, e.g. 8192 8192 512"
    )
    parser.add_argument(
        "--projector_batchnorm", type=lambda s: s.lower() in ("1", "true", "yes"), help="true/false"
    )
    for ours, official in OFFICIAL_FLAGS.items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if ours == "normalize" else float
        parser.add_argument(f"--{ours}", type=kind, help=f"official {official}")
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--image_mean", type=float, nargs=3)
    parser.add_argument("--image_std", type=float, nargs=3)
    return parser.parse_args(argv)


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = vars(parse_args(argv))
    path, out_dir = args.pop("checkpoint"), args.pop("out_dir")
    report = convert(path, out_dir, args)
    print(json.dumps(report, indent=2))
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
