"""Export the encoder of a saved model to ONNX: `pixel_values` (batch, 3, H, W) in, `embedding` (the pooled,
pre-projector `pooler_output`) out, dynamic batch axis.

    corinfomax-export-onnx MODEL [--output FILE] [--opset N] [--verify] [--no_dynamo]

MODEL is a save_pretrained folder (any CorInfoMax head, or a timm-format backbone) or a Hub id (offline:
the Hub cache). The file goes to MODEL/onnx/model.onnx by default (./ORG--NAME/onnx/model.onnx for a Hub id)
and carries the preprocessing (image_size, image_mean, image_std) and embedding_dim in its metadata. `--verify` runs onnxruntime and
PyTorch on the bundled Fashion-MNIST test images, preprocessed by the model's own image processor, prints
the largest relative difference and both speeds, and fails above 1e-4. Needs `pip install 'corinfomax[onnx]'`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from modeling_corinfomax.cli.flags import BooleanFlag, HelpFormatter, exits_on_error
from modeling_corinfomax.errors import CorInfoMaxError
from modeling_corinfomax.export.onnx import (
    DEFAULT_OPSET,
    MAX_RELATIVE_ERROR,
    default_onnx_path,
    export_onnx,
    load_encoder,
    read_onnx_metadata,
    verify_onnx,
)

VERIFY_IMAGES = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model", help="a save_pretrained folder or a Hub id")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="the .onnx file (default: MODEL/onnx/model.onnx, or ./ORG--NAME/onnx/model.onnx for a Hub id)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument(
        "--verify",
        action=BooleanFlag,
        default=False,
        help=f"compare with PyTorch on real images; fail above a relative error of {MAX_RELATIVE_ERROR:g}",
    )
    parser.add_argument(
        "--dynamo",
        action=BooleanFlag,
        default=True,
        help="trace with torch.export; --no_dynamo uses the (deprecated) TorchScript exporter",
    )
    return parser.parse_args(argv)


def demo_pixel_values(model_name_or_path: str, count: int = VERIFY_IMAGES) -> torch.Tensor:
    """The first `count` bundled Fashion-MNIST test images, preprocessed by the model's image processor."""
    from transformers import AutoImageProcessor  # noqa: PLC0415

    from modeling_corinfomax.data import load_image_dataset  # noqa: PLC0415

    processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    rows = itertools.islice(load_image_dataset(split="test", streaming=True), count)
    return processor([row["image"].convert("RGB") for row in rows], return_tensors="pt")["pixel_values"]


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = load_encoder(args.model)
    output = export_onnx(
        model, args.output or default_onnx_path(args.model), opset=args.opset, dynamo=args.dynamo
    )
    result = {"onnx": str(output), **read_onnx_metadata(output)}
    if args.verify:
        result.update(verify_onnx(model, output, demo_pixel_values(args.model)))
    print(json.dumps(result, indent=2))
    if args.verify and result["max_relative_error"] > MAX_RELATIVE_ERROR:
        raise CorInfoMaxError(
            f"{output} disagrees with PyTorch: max relative error {result['max_relative_error']:.2e} > "
            f"{MAX_RELATIVE_ERROR:g}. Try the other exporter (--dynamo / --no_dynamo) or another --opset."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
