"""ONNX export of the encoder: `pixel_values` (batch, 3, H, W) in, `embedding` (batch, num_features) out, the
`pooler_output` (pre-projector embedding) of any model `AutoModel` loads: a CorInfoMax folder of any head
(`CorInfoMaxModel`, `...ForPreTraining`, `...ForImageClassification`) or, say, a timm-format backbone
(transformers' `TimmWrapperModel`). The batch axis is dynamic; H and W are fixed at the model's image size.

The file records its opset and, in `metadata_props`, what a consumer needs to preprocess: `image_size`,
`image_mean`, `image_std` (JSON lists) and `embedding_dim` (`read_onnx_metadata` reads them back).

Why not optimum's exporter: it picks its ONNX config by `model_type` and knows no `corinfomax`, and
optimum-onnx 0.1.0 requires `transformers<4.58` (pip would downgrade transformers 5). The graph is traced
by timm's `onnx_export` (the exporter timm itself ships) with PyTorch's torch.export-based ("dynamo")
exporter, the maintained one and the default since PyTorch 2.9; the TorchScript exporter (`dynamo=False`)
is deprecated. Both exported resnet10t (CIFAR stem), resnet18, vit_tiny, swin_tiny, convnext_atto,
efficientnet_b0, tf_efficientnet_b0 and regnety_002 with a dynamic batch and agreed with PyTorch to <= 1.2e-6
(torch 2.14, onnxruntime 1.32); the TorchScript one exported 2-10x faster (swin_tiny: 9 s against 32 s
on two cores), so `dynamo=False` is there for a backbone torch.export cannot trace.

Needs the `onnx` extra: `pip install 'corinfomax[onnx]'` (onnx, onnxscript; onnxruntime to verify).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from ..errors import CheckpointError, ConfigurationError
from ..modeling_corinfomax import CorInfoMaxForImageClassification, CorInfoMaxPreTrainedModel
from ..wrappers import corinfomax_encoder

ONNX_FILE = Path("onnx") / "model.onnx"
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "pixel_values", "embedding"
MAX_RELATIVE_ERROR = 1e-4


def require(module: str) -> Any:
    """Import an optional dependency of the ONNX export, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigurationError(
            f"ONNX export needs the {module} package: pip install 'corinfomax[onnx]' "
            "(onnx, onnxscript and onnxruntime)."
        ) from None


class PooledEncoder(nn.Module):
    """`pixel_values` -> `pooler_output`: the model as the ONNX graph sees it (the projector or head, whose
    outputs are not returned, is pruned from the graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = corinfomax_encoder(model) if isinstance(model, CorInfoMaxPreTrainedModel) else model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (batch_size, 3, height, width) normalised images -> (batch_size, num_features)."""
        return self.model(pixel_values=pixel_values, return_dict=True).pooler_output


def load_encoder(model_name_or_path: str | os.PathLike) -> nn.Module:
    """`AutoModel.from_pretrained` (a Hub id offline comes from the Hub cache), in eval mode, with errors that
    say what to pass. A CorInfoMax classifier loads as itself: as `CorInfoMaxModel` its (unused) projector
    would be reported missing."""
    name = str(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
        classifier = CorInfoMaxForImageClassification.__name__ in (config.architectures or [])
        model_class = CorInfoMaxForImageClassification if classifier else AutoModel
        return model_class.from_pretrained(name, config=config).eval()
    except (OSError, ValueError) as error:  # no such folder or repo, no config.json, an unknown model_type
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"cannot load {name!r} with AutoModel ({first_line}). Pass a save_pretrained folder (config.json "
            "and weights) or a Hub id (offline: one in the Hub cache)."
        ) from None


def input_spec(model: nn.Module) -> dict[str, Any]:
    """`image_size`, `image_mean` and `image_std` of the model's inputs: a CorInfoMax config's fields, else
    timm's data config (`TimmWrapperConfig.pretrained_cfg`), else the image processor saved with it."""
    config = model.config
    timm_cfg = getattr(config, "pretrained_cfg", None) or {}
    spec = {
        "image_size": getattr(config, "image_size", None) or timm_cfg.get("input_size", [None])[-1],
        "image_mean": getattr(config, "image_mean", None) or timm_cfg.get("mean"),
        "image_std": getattr(config, "image_std", None) or timm_cfg.get("std"),
    }
    if spec["image_mean"] is None or spec["image_std"] is None:
        processor = AutoImageProcessor.from_pretrained(config.name_or_path)
        spec.update(image_mean=processor.image_mean, image_std=processor.image_std)
    if spec["image_size"] is None:
        raise ConfigurationError(
            f"{type(config).__name__} names no image size (no `image_size`, no timm `pretrained_cfg`): "
            "export a model whose config has one."
        )
    return {
        "image_size": int(spec["image_size"]),
        "image_mean": [float(v) for v in spec["image_mean"]],
        "image_std": [float(v) for v in spec["image_std"]],
    }


def default_onnx_path(model_name_or_path: str | os.PathLike) -> Path:
    """`<folder>/onnx/model.onnx` for a local folder; `./<org>--<name>/onnx/model.onnx` for a Hub id (the
    Hub cache is never written to)."""
    name = str(model_name_or_path)
    root = Path(name) if Path(name).is_dir() else Path(name.replace("/", "--"))
    return root / ONNX_FILE


def export_onnx(
    model: str | os.PathLike | nn.Module,
    output: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> Path:
    """Export the encoder of `model` to ONNX: input `pixel_values` (batch, 3, image_size, image_size) float32
    normalised images, output `embedding` (batch, num_features) = `pooler_output`; dynamic batch axis.

    Args:
        model: a folder or Hub id (`load_encoder`), or a loaded model: any CorInfoMax head, or a model whose
            output has `pooler_output`.
        output: the `.onnx` file to write; default `default_onnx_path(model)` (required for a loaded model).
        opset: the ONNX opset (recorded in the file's `opset_import`).
        dynamo: trace with torch.export (default) rather than the deprecated TorchScript exporter.

    Returns:
        The path of the written file. Weights above 2 GB go to `<file>.data` next to it.
    """
    onnx = require("onnx")
    if dynamo:
        require("onnxscript")
    lowest, highest = (18 if dynamo else 7), onnx.defs.onnx_opset_version()
    if not lowest <= opset <= highest:
        raise ConfigurationError(
            f"opset {opset} is outside {lowest}-{highest}, what onnx {onnx.__version__} and the "
            f"{'torch.export-based' if dynamo else 'TorchScript'} exporter support; the default is "
            f"{DEFAULT_OPSET}, and opsets below 18 need the TorchScript exporter (--no_dynamo, dynamo=False)."
        )
    from timm.utils.onnx import onnx_export  # noqa: PLC0415  (imports onnx)

    if isinstance(model, nn.Module):
        if output is None:
            raise ValueError("pass `output` (the .onnx file to write) when exporting a loaded model.")
    else:
        output = output or default_onnx_path(model)
        model = load_encoder(model)
    encoder = PooledEncoder(model).eval()
    spec = input_spec(encoder.model)
    size = spec["image_size"]
    # Batch 2: torch.export specialises a size-1 dimension, which would fix the batch axis.
    example = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        embedding = getattr(encoder.model(pixel_values=example, return_dict=True), "pooler_output", None)
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        raise CheckpointError(
            f"{type(encoder.model).__name__} gives no pooled embedding (`pooler_output` of shape (batch, dim)): "
            "export a CorInfoMax model or a backbone model such as transformers' TimmWrapperModel."
        )

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx_export(
        encoder,
        str(output),
        example_input=example,
        opset=opset,
        use_dynamo=dynamo,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    # Weights stay where the exporter put them (in the file, or in `<file>.data` above 2 GB).
    proto = onnx.load(str(output), load_external_data=False)
    if _opset(proto) != opset:  # torch.export's exporter converts from 18 and keeps 18 if that fails
        output.unlink()
        raise ConfigurationError(
            f"the exporter wrote opset {_opset(proto)}, not {opset} (its conversion failed, see the log); "
            f"export with --opset {_opset(proto)} or with the other exporter (--dynamo / --no_dynamo)."
        )
    metadata = {
        **spec,
        "embedding_dim": embedding.shape[1],
        "model_type": getattr(encoder.model.config, "model_type", ""),
        INPUT_NAME: "(batch, 3, image_size, image_size) float32 RGB in [0, 1], then (x - image_mean) / image_std",
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(output))
    return output


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def read_onnx_metadata(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The file's `metadata_props` (JSON values decoded) and its `opset` (of the default ONNX domain)."""
    onnx = require("onnx")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    metadata = {}
    for prop in proto.metadata_props:
        try:
            metadata[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            metadata[prop.key] = prop.value
    metadata["opset"] = _opset(proto)
    return metadata


def _images_per_second(run, batch: torch.Tensor, seconds: float) -> float:
    run(batch)  # warm-up: allocations, onnxruntime's first-run graph work
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        run(batch)
        runs += 1
    return runs * len(batch) / elapsed


def verify_onnx(
    model: str | os.PathLike | nn.Module,
    onnx_path: str | os.PathLike,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    seconds: float = 0.5,
) -> dict[str, Any]:
    """Run the ONNX file (onnxruntime, CPU) and the PyTorch model on the same images and time both.

    Args:
        model: the model exported (a folder or Hub id, or the loaded model).
        onnx_path: its ONNX file.
        images: (N, 3, H, W) normalised pixel values, e.g. `AutoImageProcessor(...)["pixel_values"]`.
        batch_size: the batch timed (the images repeated to fill it).
        seconds: how long each engine is timed, at least two batches.

    Returns:
        `{"max_relative_error"` (||onnx - torch|| / ||torch|| of each image's embedding, the max over
        images), `"num_images", "batch_size", "threads", "onnxruntime_images_per_s",
        "torch_images_per_s"}`; both engines use PyTorch's intra-op thread count.
    """
    ort = require("onnxruntime")
    encoder = PooledEncoder(model if isinstance(model, nn.Module) else load_encoder(model)).eval()
    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run_onnx(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0])

    def run_torch(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(pixels)

    images = images.float().contiguous()
    ours, reference = run_onnx(images), run_torch(images)
    if ours.shape != reference.shape:
        raise CheckpointError(
            f"{onnx_path} gives embeddings of shape {tuple(ours.shape)}, the model {tuple(reference.shape)}: "
            "it was exported from another model; export it again."
        )
    error = ((ours - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)).max().item()
    batch = images.repeat(math.ceil(batch_size / len(images)), 1, 1, 1)[:batch_size].contiguous()
    return {
        "max_relative_error": error,
        "num_images": len(images),
        "batch_size": batch_size,
        "threads": threads,
        "onnxruntime_images_per_s": _images_per_second(run_onnx, batch, seconds),
        "torch_images_per_s": _images_per_second(run_torch, batch, seconds),
    }
