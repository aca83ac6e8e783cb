#!/usr/bin/env python
"""The ONNX encoder against PyTorch on this CPU: agreement on real images and images/s at batch 32.

    python bench/onnx_export.py [--seconds 3] [--repeats 3] [--max_load 1.5]

Two random-init CorInfoMax models, each saved to a temporary folder and exported with both exporters
(`export_onnx`, torch.export-based "dynamo" and TorchScript):
- tiny: resnet10t with the CIFAR stem at 32 px, on the bundled Fashion-MNIST test images;
- resnet18 at 224 px, on the twelve photos of Debian's `mate-backgrounds` (nature).
Each image goes through the model's own image processor. `verify_onnx` gives the largest relative error
(||onnx - torch|| / ||torch|| per image) and both engines' images/s with PyTorch's thread count; the table
shows the median over `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import machine_info, print_table, wait_for_quiet  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxModel  # noqa: E402
from modeling_corinfomax.cli.export_onnx import demo_pixel_values  # noqa: E402
from modeling_corinfomax.export.onnx import export_onnx, verify_onnx  # noqa: E402

PHOTOS = sorted(Path("/usr/share/backgrounds/mate/nature").glob("*.jpg"))
MODELS = {
    "resnet10t CIFAR stem, 32 px": dict(backbone="resnet10t", cifar_stem=True, image_size=32),
    "resnet18, 224 px": dict(backbone="resnet18", image_size=224),
}


def real_images(folder: Path, image_size: int) -> torch.Tensor:
    if image_size <= 32:
        return demo_pixel_values(str(folder))
    processor = AutoImageProcessor.from_pretrained(folder)
    return processor([Image.open(p).convert("RGB") for p in PHOTOS], return_tensors="pt")["pixel_values"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per engine and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_load", type=float, help="wait until the 1-minute load average is below this")
    args = parser.parse_args()
    wait_for_quiet(args.max_load)
    info = machine_info(torch.device("cpu"))
    print({k: info[k] for k in ("cpu", "cpu_cores", "torch_threads", "cpu_capability", "torch")})

    rows = []
    with tempfile.TemporaryDirectory(prefix="corinfomax-bench-onnx-") as tmp:
        for name, kwargs in MODELS.items():
            torch.manual_seed(0)
            folder = Path(tmp) / kwargs["backbone"]
            model = CorInfoMaxModel(CorInfoMaxConfig(**kwargs)).eval()
            model.save_pretrained(folder)
            images = real_images(folder, kwargs["image_size"])
            for exporter, dynamo in (("dynamo", True), ("torchscript", False)):
                start = time.perf_counter()
                path = export_onnx(model, folder / f"{exporter}.onnx", dynamo=dynamo)
                export_s = time.perf_counter() - start
                checks = [
                    verify_onnx(model, path, images, batch_size=args.batch_size, seconds=args.seconds)
                    for _ in range(args.repeats)
                ]
                ort_ips = statistics.median(c["onnxruntime_images_per_s"] for c in checks)
                torch_ips = statistics.median(c["torch_images_per_s"] for c in checks)
                rows.append(
                    {
                        "model": name,
                        "exporter": exporter,
                        "export s": export_s,
                        "images": len(images),
                        "max rel. error": max(c["max_relative_error"] for c in checks),
                        "onnxruntime img/s": ort_ips,
                        "PyTorch img/s": torch_ips,
                        "ratio": ort_ips / torch_ips,
                    }
                )
                print(rows[-1], flush=True)
    print_table(
        rows,
        list(rows[0]),
        title=f"ONNX (onnxruntime, CPU) vs PyTorch, batch {args.batch_size}, {info['torch_threads']} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
    )


if __name__ == "__main__":
    main()
