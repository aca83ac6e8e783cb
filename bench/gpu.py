#!/usr/bin/env python
"""GPU readiness: one run that says whether our training step uses a GPU well, in under 6 minutes on one H200.

    python bench/gpu.py --device cuda         # the full check (ResNet-50, 224 px, ImageNet-1K projector)
    python bench/gpu.py --device cpu --tiny   # CPU smoke run of every section (~30 s on 2 quiet cores)
    python bench/gpu.py --device cuda --no-compile --batch_size 128 --output /tmp/gpu.json

Device run, one shell line from the repository root. It uses .venv, .venv-gpu or python3, the first that
has the packages; otherwise it makes .venv-gpu on top of python3's torch and installs the light packages
only (torch and torchvision pinned to the installed versions, so nothing heavy is downloaded):

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; M='import torch, torchvision, timm, transformers, accelerate, yaml'; PY=; for p in .venv/bin/python .venv-gpu/bin/python python3; do command -v $p >/dev/null && $p -c "$M" 2>/dev/null && PY=$p && break; done; if [ -z "$PY" ]; then PIN=$(python3 -c 'import torch as t, torchvision as v; print("torch==" + t.__version__.split("+")[0], "torchvision==" + v.__version__.split("+")[0])') || { echo 'need a python3 with torch and torchvision'; exit 1; }; python3 -m venv --system-site-packages .venv-gpu && PY=.venv-gpu/bin/python && $PY -m pip install -q $PIN timm transformers accelerate pyyaml || exit 1; fi; $PY -c "$M; assert torch.cuda.is_available(), 'no CUDA device'" && $PY bench/gpu.py --device cuda --output "${OUT:-bench/results}/gpu.json"

Sections, each a table and a key of the JSON (`--output`, default `bench/results/gpu.json`, or
`gpu_cpu_smoke.json` on a CPU):

- gemm: the measured dense bf16 matmul peak of the device (an n x n x n GEMM, n = 8192; CUDA events);
- train_step: ResNet-50 at 224 px with the ImageNet-1K projector (8192-8192-512 with BatchNorm),
  `--batch_size` images per view. "ours" is `train.py`'s step (bench/common.py `TrainStep`: timm
  backbone, channels_last, bf16 autocast through Accelerate, the float64 Cholesky loss, the views'
  colour ops on the device from uint8 crops), eager and under `torch.compile`; "baseline_fp16" is the
  original ImageNet-1K recipe (bench/train_step.py `BaselineStep`: torchvision ResNet-50, NCHW, fp16
  autocast with a GradScaler as the official `--amp`, the official loss formula with `torch.logdet`,
  from ready float views); "baseline" is the same in fp32. Images/s, the memory the step adds
  (`torch.cuda.max_memory_allocated` minus what the built model holds), ratios to baseline_fp16 and
  the backbone's FLOP/s as a fraction of the measured GEMM peak;
- flops: the backbone's FLOPs per image (forward) and per training step (two views, forward and
  backward), counted with `torch.utils.flop_counter.FlopCounterMode`;
- loss: `CorInfoMaxLoss` alone (float64 inside, forward + backward) on (batch, D) projections, D = 512
  and 128, as a share of our step's time;
- pipeline: the step fed by a DataLoader whose workers make the two views' crops (`InMemoryTwoViewDataset`
  batched crops of a synthetic in-memory uint8 set: no decoding, so a lower bound for real images),
  against the same step on pre-made crops and on pre-made views; pipeline share = 1 - compute / end
  to end;
- jpeg: the step fed with real JPEGs decoded every step (bench/jpeg.py's ImageNet-like photos made from
  `--photos`): host DataLoader workers decoding and cropping per image (train.py's path) against
  `--decode_on_device` (workers read bytes, the device decodes and crops); loader-only, end-to-end and
  compute images/s;
- agreement: the float64 loss and its gradients on CUDA against the CPU on the same tensors, over a
  few steps of the running state. On a CPU run: our Cholesky loss against the official LU formula
  (`torch.logdet`), a second independent computation, and the output says so.

The goals (ours >= 3x the original recipe's images/s, backbone >= 40% of the measured bf16 GEMM peak,
loss < 5% of the step at D = 512, CUDA/CPU agreement <= 1e-12) are printed with PASS/FAIL; on a CPU they
are a smoke test of the script, not GPU results. Timings: warm-up, then the median of repeats, the
device synchronised around each timed region (CUDA events for the GEMM, `time.perf_counter` otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import alternate, machine_info, median, pick_device, print_table, timed, write_json  # noqa: E402
from loss import bench_loss  # noqa: E402
from train_step import (  # noqa: E402
    OfficialCovarianceLoss,
    backbone_flops,
    bench_case,
    case_setup,
    make_accelerator,
    our_step,
)

from modeling_corinfomax import CorInfoMaxLoss  # noqa: E402
from modeling_corinfomax.data import InMemoryTwoViewDataset, TwoViewAugmentation  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What one run measures; `--tiny` shrinks every section until a 2-core CPU runs them in seconds."""

    case: str  # a bench/train_step.py case
    batch: int  # images per view
    warmup: int
    steps: int  # steps per timed repeat
    repeats: int
    compile: bool
    gemm_n: int
    gemm_calls: int  # GEMMs per timed repeat
    loss_dims: tuple[int, ...]
    loss_repeats: int
    workers: int
    prefetch: int  # batches each worker keeps ready
    source_size: int  # side of the synthetic images the crops are cut from
    source_images: int
    jpeg_images: int  # ImageNet-like JPEGs of the jpeg section
    agreement_dim: int
    agreement_steps: int


FULL = Sizes(
    case="in1k-r50",
    batch=256,
    warmup=3,
    steps=5,
    repeats=5,
    compile=True,
    gemm_n=8192,
    gemm_calls=10,
    loss_dims=(512, 128),
    loss_repeats=20,
    workers=max(1, min(12, (os.cpu_count() or 2) - 2)),
    prefetch=2,
    source_size=256,
    source_images=1024,
    jpeg_images=1024,
    agreement_dim=512,
    agreement_steps=3,
)
TINY = replace(
    FULL,
    case="tiny-r18",
    batch=8,
    warmup=1,
    steps=1,
    repeats=1,
    compile=False,
    gemm_n=256,
    gemm_calls=2,
    loss_repeats=3,
    workers=1,
    prefetch=1,
    source_size=36,
    source_images=64,
    jpeg_images=24,
)

# The goals: images/s ratio, % of the GEMM peak, % of the step, relative error.
GOAL_RATIO, GOAL_PEAK, GOAL_LOSS_SHARE, GOAL_AGREEMENT = 3.0, 40.0, 5.0, 1e-12


def region_seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds `fn` takes: CUDA events around it on a GPU (no host overhead), `perf_counter` otherwise."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def gemm_peak(n: int, calls: int, warmup: int, repeats: int, device: torch.device) -> dict:
    """Dense bf16 TFLOP/s of an n x n x n matmul (median over repeats of `calls` back-to-back GEMMs)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator) for _ in "ab")
    out = torch.empty_like(a)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)

    for _ in range(warmup):
        run()
    seconds = [region_seconds(run, device) / calls for _ in range(repeats)]
    tflops = [2 * n**3 / s / 1e12 for s in seconds]
    return {
        "n": n,
        "dtype": "bfloat16",
        "seconds_per_gemm": seconds,
        "tflops_per_repeat": tflops,
        "tflops": median(tflops),
    }


def train_step_section(sizes: Sizes, args, device: torch.device, accelerator, peak_tflops: float) -> dict:
    """bench/train_step.py's side-by-side timing of the variants, ratios to the original recipe."""
    variants = args.variants or ["baseline_fp16", "baseline", "ours"] + (["ours_compile"] * sizes.compile)
    options = argparse.Namespace(
        variants=variants,
        batch_size=sizes.batch,
        warmup=sizes.warmup,
        steps=sizes.steps,
        repeats=sizes.repeats,
        max_load=None,
        compile=sizes.compile,
        no_memory=True,  # CPU peak memory needs a fresh process per variant; CUDA's is always measured
        peak_tflops=peak_tflops,
    )
    baseline = "baseline_fp16" if "baseline_fp16" in variants else variants[0]
    return bench_case(sizes.case, options, device, accelerator, baseline=baseline)


def flops_section(sizes: Sizes, step: dict, device: torch.device) -> dict:
    """FLOPs of one image's backbone forward, and of a training step (counted by bench_case)."""
    forward, model_forward = backbone_flops(sizes.case, sizes.batch, device, backward=False)
    _, config, _, _ = case_setup(sizes.case, sizes.batch, device)
    images = 2 * sizes.batch  # two views
    return {
        "backbone": config.backbone,
        "image_size": config.image_size,
        "images_per_step": images,
        "backbone_forward_flops_per_image": forward / images,
        "model_forward_flops_per_image": model_forward / images,
        "backbone_train_step_flops": step["flops_per_step_backbone"],
        "model_train_step_flops": step["flops_per_step_model"],
        "train_step_over_forward": step["flops_per_step_backbone"] / forward,
    }


def fastest(step: dict, prefix: str) -> dict:
    """The row of the fastest variant whose name starts with `prefix`."""
    return min((r for r in step["rows"] if r["variant"].startswith(prefix)), key=lambda r: r["s/step"])


def loss_section(sizes: Sizes, step: dict, device: torch.device) -> dict:
    """CorInfoMaxLoss forward + backward on (batch, D) projections against our fastest step."""
    ours = fastest(step, "ours")
    rows = []
    for d in sizes.loss_dims:
        result = bench_loss(sizes.batch, d, device, sizes.loss_repeats, sizes.warmup + 1)
        seconds = result["median_ms"] / 1e3
        rows.append(
            {
                "N": sizes.batch,
                "D": d,
                "loss ms": result["median_ms"],
                "min ms": result["min_ms"],
                "step": ours["variant"],
                "step ms": 1e3 * ours["s/step"],
                "% of step": 100 * seconds / ours["s/step"],
            }
        )
    return {"rows": rows}


def pipeline_section(sizes: Sizes, device: torch.device, accelerator) -> dict:
    """Our step fed by DataLoader workers making the crops, against it on pre-made crops and views."""
    _, config, batch, _ = case_setup(sizes.case, sizes.batch, device)
    generator = torch.Generator().manual_seed(0)
    shape = (sizes.source_images, 3, sizes.source_size, sizes.source_size)
    images = InMemoryTwoViewDataset(
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
        config.image_size,
        TwoViewAugmentation(),
    )
    # The loader keeps up to workers x prefetch batches ready, made while the first steps run. The
    # end-to-end timing starts after twice that many steps (which also warm the step up), when a loader
    # slower than the step has run out of that stock and the timing shows the rate the workers sustain.
    before = max(2 * sizes.workers * sizes.prefetch, sizes.warmup)
    batches = 1 + before + sizes.repeats * sizes.steps
    loader = torch.utils.data.DataLoader(
        images,
        batch_size=batch,
        sampler=torch.utils.data.RandomSampler(images, replacement=True, num_samples=batch * batches),
        collate_fn=images.collate,
        num_workers=sizes.workers,
        prefetch_factor=sizes.prefetch if sizes.workers else None,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    step = our_step("ours", sizes.case, sizes.batch, device, accelerator)
    started = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_batch_s = time.perf_counter() - started
    crops = (first["view1"].to(device), first["view2"].to(device))
    views = step.views(*crops)

    def end_to_end() -> None:
        batch_ = next(iterator)
        step(batch_["view1"], batch_["view2"])

    for _ in range(before):
        end_to_end()
    times = {"end_to_end": [timed(end_to_end, sizes.steps, device) for _ in range(sizes.repeats)]}
    runs = {"compute_and_augment": lambda: step(*crops), "compute": lambda: step.update(*views)}
    times |= alternate(runs, sizes.repeats, sizes.steps, device)
    t = {k: median(v) for k, v in times.items()}
    return {
        "workers": sizes.workers,
        "source_images": list(shape),
        "image_size": config.image_size,
        "batch_size": batch,
        "times_s_per_step": times,
        "first_batch_s": first_batch_s,
        "row": {
            "workers": sizes.workers,
            "e2e img/s": batch / t["end_to_end"],
            "compute+aug img/s": batch / t["compute_and_augment"],
            "compute img/s": batch / t["compute"],
            "pipeline share": 1 - t["compute"] / t["end_to_end"],
            "of which loader": 1 - t["compute_and_augment"] / t["end_to_end"],
            "device augment share": 1 - t["compute"] / t["compute_and_augment"],
            "first batch s": first_batch_s,
        },
    }


def loss_and_grads(fn: Callable, z1: torch.Tensor, z2: torch.Tensor) -> list[torch.Tensor]:
    """[loss, d loss/d z1, d loss/d z2] of `fn(z1, z2)`, on the CPU."""
    z1, z2 = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    value = fn(z1, z2)
    value.backward()
    return [t.detach().cpu() for t in (value, z1.grad, z2.grad)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def agreement_section(sizes: Sizes, device: torch.device) -> dict:
    """The float64 loss and its gradients over a few steps of the running state: CUDA against CPU, and
    our Cholesky loss against the official LU formula on the CPU (the only comparison on a CPU run)."""
    n, d = sizes.batch, sizes.agreement_dim
    ours = CorInfoMaxLoss(dim=d)
    official = OfficialCovarianceLoss(d, ours.lambda_R, ours.lambda_mu, ours.R_init, ours.eps, "cpu")

    def reference(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1, z2 = F.normalize(z1, p=2), F.normalize(z2, p=2)
        return ours.alpha * F.mse_loss(z1, z2) + official(z1, z2)

    on_device = CorInfoMaxLoss(dim=d).to(device) if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    errors: dict[str, list[list[float]]] = {"cpu_vs_reference": []}
    if on_device is not None:
        errors["cuda_vs_cpu"] = []
    losses = []
    for _ in range(sizes.agreement_steps):
        z1 = torch.randn(n, d, dtype=torch.float64, generator=generator)
        z2 = z1 + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=generator)
        cpu = loss_and_grads(lambda a, b: ours(a, b).loss, z1, z2)
        others = {"cpu_vs_reference": loss_and_grads(reference, z1, z2)}
        if on_device is not None:
            others["cuda_vs_cpu"] = loss_and_grads(
                lambda a, b: on_device(a, b).loss, z1.to(device), z2.to(device)
            )
        for key, other in others.items():
            errors[key].append([relative_error(o, c) for o, c in zip(other, cpu)])
        losses.append(cpu[0].item())
    mode = "cuda_vs_cpu" if on_device is not None else "cpu_vs_reference"
    summary = {
        key: {"loss": max(e[0] for e in errs), "grad": max(max(e[1:]) for e in errs)}
        for key, errs in errors.items()
    }
    return {
        "mode": mode,
        "compared": (
            "CorInfoMaxLoss float64 on CUDA vs on CPU, same tensors"
            if mode == "cuda_vs_cpu"
            else "no CUDA device: CorInfoMaxLoss (Cholesky) vs the official formula (LU torch.logdet), CPU"
        ),
        "N": n,
        "D": d,
        "steps": sizes.agreement_steps,
        "losses": losses,
        "relative_error_per_step": errors,
        "max_relative_error": summary,
        "relative_error": summary[mode]["loss"],
    }


COMPARE = {">=": lambda v, t: v >= t, "<": lambda v, t: v < t, "<=": lambda v, t: v <= t}


FAULTS: list[str] = []  # the jpeg section's faulty steps


def guarded(step, *crops) -> None:
    """A step whose numerical fault is left undone (`TrainStep` restores the state) and counted: a faulty
    step skips its backward, so a section with faults times less than a step's work (it says so)."""
    try:
        step(*crops)
    except FloatingPointError as error:
        FAULTS.append(str(error)[:200])


def jpeg_section(sizes: Sizes, device: torch.device, accelerator, photos: Path) -> dict:
    """Our step fed with real JPEGs decoded every step (bench/jpeg.py's ImageNet-like photos, short side
    375-500 px): by host workers (train.py's per-image path) against `--decode_on_device` (workers read
    bytes, the device decodes and crops). Images/s of the loader alone, end to end, and of the compute."""
    from jpeg import build_jpegs  # noqa: PLC0415

    from modeling_corinfomax.data import (  # noqa: PLC0415
        ExampleCollator,
        ImageViewDataset,
        batch_crops,
        load_image_dataset,
    )

    if not any(photos.glob("*.jpg")):
        return {"skipped": f"no photographs in {photos} (--photos DIR)", "rows": []}
    _, config, batch, _ = case_setup(sizes.case, sizes.batch, device)
    root = build_jpegs(Path(tempfile.mkdtemp()) / "jpegs", sizes.jpeg_images, (375, 500), photos)
    dataset = load_image_dataset(None, None, str(root), "train", False, None)
    step = our_step("ours", sizes.case, sizes.batch, device, accelerator)
    for group in step.optimizer.param_groups:  # the warm-up's first rate: real photos at the peak rate
        group["lr"] *= 0.01  # diverge within a few dozen steps, and a faulty step skips its backward
    before = max(2 * sizes.workers * sizes.prefetch, sizes.warmup)
    rows, crops = [], None
    for mode in ("two_view", "jpeg_bytes"):
        images = ImageViewDataset(dataset, "image", None, config.image_size, mode=mode)
        batches = 2 + 2 * before + 2 * sizes.repeats * sizes.steps
        loader = torch.utils.data.DataLoader(
            images, batch_size=batch, collate_fn=ExampleCollator(), num_workers=sizes.workers,
            sampler=torch.utils.data.RandomSampler(images, replacement=True, num_samples=batch * batches),
            prefetch_factor=sizes.prefetch if sizes.workers else None, pin_memory=device.type == "cuda",
            drop_last=True,
        )  # fmt: skip
        iterator = iter(loader)
        crops = batch_crops(next(iterator), config.image_size, device)

        def load_only() -> None:
            batch_crops(next(iterator), config.image_size, device)  # noqa: B023

        def end_to_end() -> None:
            guarded(step, *batch_crops(next(iterator), config.image_size, device))  # noqa: B023

        for _ in range(before):  # the workers' stock is used up: the timings show their sustained rate
            load_only()
        load_s = median([timed(load_only, sizes.steps, device) for _ in range(sizes.repeats)])
        for _ in range(before):
            end_to_end()
        e2e_s = median([timed(end_to_end, sizes.steps, device) for _ in range(sizes.repeats)])
        rows.append({"decode": "host workers" if mode == "two_view" else "on the device",
                     "workers": sizes.workers, "loader img/s": batch / load_s, "e2e img/s": batch / e2e_s})  # fmt: skip
        iterator = None  # shuts the workers down
    compute_s = median(
        [timed(lambda: guarded(step, *crops), sizes.steps, device) for _ in range(sizes.repeats)]
    )
    for row in rows:
        row["compute img/s"] = batch / compute_s
        row["pipeline share"] = 1 - compute_s / (batch / row["e2e img/s"])
    return {"images": sizes.jpeg_images, "image_size": config.image_size, "batch_size": batch, "rows": rows,
            "faulty_steps": len(FAULTS), "first_fault": FAULTS[0] if FAULTS else None}  # fmt: skip


def goals(results: dict) -> list[dict]:
    """Each goal with its measured value and PASS/FAIL (FAIL too when the run could not measure it)."""
    step = results["train_step"]
    base = next((r for r in step["rows"] if r["variant"] == "baseline_fp16"), None)
    ours = fastest(step, "ours")
    loss512 = next((r for r in results["loss"]["rows"] if r["D"] == 512), None)
    agreement = results["agreement"]
    checks = [
        (
            f"{ours['variant']} vs the original recipe (baseline_fp16), img/s ratio",
            ours["img/s"] / base["img/s"] if base else None,
            ">=",
            GOAL_RATIO,
        ),
        (
            f"{ours['variant']} backbone, % of the measured bf16 GEMM peak",
            ours["% of bf16 peak"],
            ">=",
            GOAL_PEAK,
        ),
        (
            "float64 loss at D=512, % of our step",
            loss512["% of step"] if loss512 else None,
            "<",
            GOAL_LOSS_SHARE,
        ),
        (
            f"loss agreement ({agreement['mode']}), relative error",
            agreement["relative_error"],
            "<=",
            GOAL_AGREEMENT,
        ),
    ]
    return [
        {
            "goal": name,
            "measured": value,
            "target": f"{op} {target:g}",
            "result": "PASS" if value is not None and COMPARE[op](value, target) else "FAIL",
        }
        for name, value, op, target in checks
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="default: cuda when available, else cpu (then --tiny is implied)")
    p.add_argument(
        "--tiny", action="store_true", help="ResNet-18 at 32 px, batch 8: a smoke run of every section"
    )
    p.add_argument("--batch_size", type=int, help="images per view (default 256; 8 with --tiny)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="also time ours under torch.compile (default: on, off with --tiny)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=["baseline_fp16", "baseline", "ours", "ours_fp32", "ours_compile"],
        help="train-step variants (default: baseline_fp16 baseline ours ours_compile)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 3; 1 with --tiny)")
    p.add_argument("--steps", type=int, help="steps per timed repeat (default 5; 1 with --tiny)")
    p.add_argument("--repeats", type=int, help="timed repeats (default 5; 1 with --tiny)")
    p.add_argument("--workers", type=int, help="DataLoader workers of the pipeline and jpeg sections")
    p.add_argument(
        "--photos",
        type=Path,
        default=Path("/usr/share/backgrounds/mate/nature"),
        help="photographs (*.jpg) the jpeg section makes its ImageNet-like JPEGs from (Debian's mate-backgrounds)",
    )
    p.add_argument("--output", help="JSON path (default bench/results/gpu.json, gpu_cpu_smoke.json on a CPU)")
    args = p.parse_args(argv)
    if args.variants and not any(v.startswith("ours") for v in args.variants):
        p.error(f"--variants {' '.join(args.variants)} has none of ours: add ours (the goals compare it)")
    return args


def resolve_sizes(args) -> Sizes:
    """The mode's sizes with the flags that were given."""
    sizes = TINY if args.tiny else FULL
    flags = {"batch": args.batch_size, "compile": args.compile, "warmup": args.warmup, "steps": args.steps}
    flags |= {"repeats": args.repeats, "workers": args.workers}
    return replace(sizes, **{k: v for k, v in flags.items() if v is not None})


def check_finite(results: dict) -> None:
    """Stop with an error when a measured number is NaN or infinite (a broken timing, not a result)."""
    bad = []

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(path)

    walk(results, "")
    if bad:
        raise SystemExit(f"error: non-finite measurements at {', '.join(bad[:10])}")


def print_sections(results: dict, kind: str) -> None:
    """The tables of every section (GitHub markdown, as RESULTS.md shows them)."""
    gemm, step, loss, pipeline, agreement = (
        results[k] for k in ("gemm", "train_step", "loss", "pipeline", "agreement")
    )
    print(
        f"\nbf16 GEMM {gemm['n']}^3: {gemm['tflops']:.3g} TFLOP/s, median of {len(gemm['seconds_per_gemm'])}"
    )
    columns = ["variant", "batch", "img/s", "s/step", "min-max s/step", "vs baseline", "median ratio"]
    columns += ["peak mem MiB", "backbone TFLOP/s", "% of bf16 peak"]
    print_table(
        step["rows"], columns, title=f"training step, case {step['case']} (vs baseline: vs baseline_fp16)"
    )
    print_table([results["flops"]], list(results["flops"]), title="FLOPs (FlopCounterMode)")
    print_table(loss["rows"], list(loss["rows"][0]), title="CorInfoMaxLoss alone (float64 inside), fwd+bwd")
    print_table(
        [pipeline["row"]],
        list(pipeline["row"]),
        title=f"data pipeline: InMemoryTwoViewDataset crops in {pipeline['workers']} worker(s) from "
        f"synthetic uint8 images {pipeline['source_images']}, colour ops on the device",
    )
    jpeg = results["jpeg"]
    if jpeg["rows"]:
        print_table(jpeg["rows"], list(jpeg["rows"][0]), title=f"real JPEGs ({jpeg['images']}, short side 375-500 "
                    f"px) decoded every step at {jpeg['image_size']} px, batch {jpeg['batch_size']}")  # fmt: skip
        if jpeg["faulty_steps"]:
            print(f"WARNING: {jpeg['faulty_steps']} faulty step(s) skipped their backward, so the e2e and compute "
                  f"columns undercount a step; first: {jpeg['first_fault']}")  # fmt: skip
    else:
        print(f"\njpeg section skipped: {jpeg['skipped']}")
    rows = [
        {"comparison": k, "loss rel. error": v["loss"], "grad rel. error": v["grad"]}
        for k, v in agreement["max_relative_error"].items()
    ]
    print_table(
        rows,
        list(rows[0]),
        title=f"float64 loss agreement, N={agreement['N']}, D={agreement['D']}, {agreement['steps']} steps: "
        f"{agreement['compared']}",
    )
    print_table(
        results["goals"],
        ["goal", "measured", "target", "result"],
        title="goals" + ("" if kind == "GPU check" else f" -- {kind}: the verdicts only check the script"),
    )
    print("\nseconds per section: " + ", ".join(f"{k} {v:.1f}" for k, v in results["elapsed_s"].items()))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA device: running the CPU smoke version (--tiny); these are not GPU numbers")
        args.tiny = True
    device = pick_device(args.device)
    sizes = resolve_sizes(args)
    info = machine_info(device)
    print(json.dumps(info, indent=2))
    on_gpu = device.type == "cuda" and not args.tiny
    kind = "GPU check" if on_gpu else f"SMOKE RUN on {device} (not a GPU result)"
    print(f"\n{kind}: {sizes}", flush=True)
    accelerator = make_accelerator(device)
    results: dict = {"machine": info, "args": vars(args), "sizes": asdict(sizes), "smoke_run": not on_gpu}
    results["elapsed_s"] = elapsed = {}

    def run(name: str, fn: Callable[[], dict]) -> dict:
        started = time.perf_counter()
        results[name] = fn()
        elapsed[name] = time.perf_counter() - started
        print(f"{name}: {elapsed[name]:.1f} s", flush=True)
        return results[name]

    gemm = run(
        "gemm", lambda: gemm_peak(sizes.gemm_n, sizes.gemm_calls, sizes.warmup + 1, sizes.repeats, device)
    )
    step = run("train_step", lambda: train_step_section(sizes, args, device, accelerator, gemm["tflops"]))
    run("flops", lambda: flops_section(sizes, step, device))
    run("loss", lambda: loss_section(sizes, step, device))
    run("pipeline", lambda: pipeline_section(sizes, device, accelerator))
    run("jpeg", lambda: jpeg_section(sizes, device, accelerator, args.photos))
    run("agreement", lambda: agreement_section(sizes, device))
    results["goals"] = goals(results)
    print_sections(results, kind)
    check_finite(results)
    write_json("gpu" if device.type == "cuda" else "gpu_cpu_smoke", results, args.output)


if __name__ == "__main__":
    main()
