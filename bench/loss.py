"""Micro-benchmark of CorInfoMaxLoss: forward+backward time against the projection size D, the
log-determinant alone by three methods, and one backbone training step for scale.

    python bench/loss.py                               # CPU, and CUDA when available
    python bench/loss.py --dims 64 512 --repeats 5 --skip_backbone --output /tmp/loss.json

Times are the median of `--repeats` runs after `--warmup` runs. The loss runs in training mode (the
state updates each call) on float32 projections, as in training; everything inside is float64.
Results go to a table on stdout and to JSON (`bench/results/loss.json` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from modeling_corinfomax import CorInfoMaxLoss  # noqa: E402
from modeling_corinfomax.loss import cholesky_logdet  # noqa: E402
from modeling_corinfomax.modeling_corinfomax import apply_cifar_stem  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=1024, help="N, the (global) batch of projections")
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[64, 128, 512, 2048], help="projection sizes D"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--backbone_batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument(
        "--backbone_repeats", type=int, default=3, help="a CPU step takes seconds: few repeats"
    )
    parser.add_argument("--skip_backbone", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "loss.json")
    return parser.parse_args()


def timed(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `fn` per call, `repeats` calls after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def bench_loss(n: int, d: int, device: torch.device, repeats: int, warmup: int) -> dict:
    """CorInfoMaxLoss forward + backward on (n, d) float32 projections; ImageNet-1K hyperparameters."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z1 = torch.randn(n, d, generator=g).to(device).requires_grad_()
    z2 = (z1.detach() + 0.5 * torch.randn(n, d, generator=g).to(device)).requires_grad_()
    loss_fn = CorInfoMaxLoss(dim=d).to(device)

    def step():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).loss.backward()

    times = timed(step, device, repeats, warmup)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "state": loss_fn}


def bench_logdets(
    loss_fn: CorInfoMaxLoss, device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """log det(R1 + eps I) forward + backward alone, on the loss's current (trained) state."""
    d = loss_fn.dim
    A0 = loss_fn.R1 + loss_fn.eps * torch.eye(d, dtype=torch.float64, device=device)
    methods = {
        "cholesky_logdet (ours)": lambda A: cholesky_logdet(A)[0],
        "cholesky + autograd": lambda A: 2 * torch.linalg.cholesky(A).diagonal().log().sum(),
        "slogdet (LU)": lambda A: torch.linalg.slogdet(A).logabsdet,
    }
    results = {}
    for name, logdet in methods.items():
        A = A0.clone().requires_grad_()

        def step(logdet=logdet, A=A):
            A.grad = None
            logdet(A).backward()

        results[name] = 1e3 * statistics.median(timed(step, device, repeats, warmup))
    return results


def bench_backbone(args: argparse.Namespace, device: torch.device) -> dict:
    """One training step (forward, backward, SGD) of the timm backbone with the CIFAR stem on one view."""
    model = apply_cifar_stem(timm.create_model(args.backbone, pretrained=False, num_classes=0)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(args.backbone_batch_size, 3, args.image_size, args.image_size, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    times = timed(step, device, args.backbone_repeats, warmup=1)
    return {
        "model": f"{args.backbone} (CIFAR stem)",
        "batch_size": args.backbone_batch_size,
        "image_size": args.image_size,
        "median_ms": 1e3 * statistics.median(times),
        "times_ms": [1e3 * t for t in times],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loss": [],
        "backbone": [],
    }
    print(f"CorInfoMaxLoss forward+backward, N={args.batch_size}, median of {args.repeats} (ms)")
    header = (
        f"{'device':<6} {'D':>5} {'loss':>9} {'loss min':>9} {'cholesky_logdet':>16} {'chol+autograd':>14} "
        f"{'slogdet':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in devices:
        device = torch.device(name)
        for d in args.dims:
            result = bench_loss(args.batch_size, d, device, args.repeats, args.warmup)
            logdets = bench_logdets(result.pop("state"), device, args.repeats, args.warmup)
            report["loss"].append(
                {"device": name, "N": args.batch_size, "D": d, **result, "logdet_ms": logdets}
            )
            print(
                f"{name:<6} {d:>5} {result['median_ms']:>9.2f} {result['min_ms']:>9.2f} "
                f"{logdets['cholesky_logdet (ours)']:>16.2f} "
                f"{logdets['cholesky + autograd']:>14.2f} {logdets['slogdet (LU)']:>9.2f}"
            )
        if not args.skip_backbone:
            backbone = bench_backbone(args, device)
            report["backbone"].append({"device": name, **backbone})
            print(
                f"{name:<6} one {backbone['model']} training step, batch {backbone['batch_size']} at "
                f"{backbone['image_size']} px: {backbone['median_ms']:.0f} ms"
            )
    print("(the log-det columns time one log-determinant; the loss computes two, plus the covariances)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
