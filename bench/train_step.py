#!/usr/bin/env python
"""Pretraining throughput of our training step against the original code's path.

    python bench/train_step.py                                  # both cases, defaults sized to the device
    python bench/train_step.py --cases cifar-r18 --batch_size 64 --repeats 3   # quick CPU run
    python bench/train_step.py --compile                        # also time torch.compile
    python bench/train_step.py --check_trajectory               # bf16 vs fp32 loss over 50 steps

"ours" is the step of `train.py --mixed_precision bf16`: `CorInfoMaxForPreTraining` on a timm
backbone in channels_last, bf16 autocast through Accelerate, the float64 Cholesky loss, the two
`BatchViewAugment`s on the device (so ours starts from uint8 crops), timm's SGD. "baseline" is the
official code's path, rebuilt here from the method notes: torchvision ResNet (`fc = Identity`, the
same CIFAR stem patch), the same projector, the official loss formula (float64 state promoted,
`torch.logdet`), `torch.optim.SGD`, fp32, NCHW, no compile, starting from normalised float views
(the original augments in its DataLoader workers). Both get the same batch on the host and move it
to the device each step. "baseline_fp16" (`--variants`) is the baseline under the ImageNet-1K script's
`--amp`: fp16 autocast and a GradScaler.

Images/s counts images, each seen as two views. Variants are timed alternately after warm-up, in
a rotating order; the table gives the median over repeats, the ratio of the medians ("vs
baseline") and the median of the per-repeat ratios (robust to a machine whose speed drifts). Peak
memory is what the first steps add to the built model (gradients, optimizer state, activations):
`max_memory_allocated` on CUDA, the peak RSS of a fresh process on CPU (with a fixed glibc mmap
threshold, so that freed activations leave the RSS). FLOPs of the backbone come from
`FlopCounterMode`; on CUDA the achieved fraction of the device's dense bf16 peak is shown.

`--check_trajectory` trains our step in fp32 and in bf16 for 50 steps from the same weights on the same
batches (the bundled data, `train.py`'s warm-up learning rates unless `--trajectory_lr`), and a control:
the fp32 step again, from the initial weights rounded to bf16 once. Early CorInfoMax training is chaotic
(the loss spikes as the covariance estimates move), so any perturbation grows; bf16 passes when the first
step agrees to bf16 precision and its deviation from fp32 over the 50 steps is no larger than the
control's (median relative difference within 2x). Results go to `bench/results/`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from common import (
    TrainStep,
    alternate,
    machine_info,
    median,
    peak_rss_bytes,
    pick_device,
    print_table,
    rss_bytes,
    synchronize,
    wait_for_quiet,
    write_json,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modeling_corinfomax import CorInfoMaxConfig
from modeling_corinfomax.data import TwoViewAugmentation, normalize_batch
from modeling_corinfomax.presets import PRESETS

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of the CUDA device name; the
# first match wins, so more specific names come first. `--peak_tflops` overrides.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


@dataclass(frozen=True)
class Case:
    """A backbone/resolution pair taken from one of the original runs' presets (`overrides` replace
    some of the preset's values, for reduced smoke-test versions)."""

    preset: str
    cpu_batch: int
    cuda_batch: int
    overrides: dict = field(default_factory=dict)


CASES = {
    "cifar-r18": Case(preset="cifar10", cpu_batch=256, cuda_batch=256),
    "r50-224": Case(preset="imagenet100-r50", cpu_batch=8, cuda_batch=256),
    "in1k-r50": Case(preset="imagenet1k-r50", cpu_batch=8, cuda_batch=256),
    # The ImageNet-1K recipe shrunk to a CPU smoke test (bench/gpu.py --tiny).
    "tiny-r18": Case(
        preset="imagenet1k-r50",
        cpu_batch=8,
        cuda_batch=8,
        overrides={"backbone": "resnet18", "image_size": 32, "projector_dims": [256, 256, 64]},
    ),
}
DEFAULT_CASES = ["cifar-r18", "r50-224"]


# ---------------------------------------------------------------------------------------------------
# The baseline: the official code's path


class OfficialModel(nn.Module):
    """torchvision ResNet (`zero_init_residual=True`, `fc = Identity`, optional CIFAR stem) and the
    Linear-[BN]-ReLU-Linear-[BN]-ReLU-Linear(no bias) projector (BatchNorm1d in the ImageNet-1K `_bn`
    script); each view's projection L2-normalised."""

    def __init__(
        self,
        architecture: str,
        cifar_stem: bool,
        projector_dims: list[int],
        projector_batchnorm: bool = False,
    ):
        super().__init__()
        self.backbone = getattr(torchvision.models, architecture)(zero_init_residual=True)
        in_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        if cifar_stem:
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.backbone.maxpool = nn.Identity()
        layers: list[nn.Module] = []
        for hidden in projector_dims[:-1]:
            layers += [nn.Linear(in_dim, hidden)]
            layers += [nn.BatchNorm1d(hidden)] if projector_batchnorm else []
            layers += [nn.ReLU(inplace=True)]
            in_dim = hidden
        layers.append(nn.Linear(in_dim, projector_dims[-1], bias=False))
        self.projector = nn.Sequential(*layers)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = F.normalize(self.projector(self.backbone(x1)), p=2)
        z2 = F.normalize(self.projector(self.backbone(x2)), p=2)
        return z1, z2


class OfficialCovarianceLoss:
    """The official `CovarianceLoss` formula (method notes 1.2): the state is plain float64 tensors, so
    float32 projections are promoted at `z - mu'`; LU-based `torch.logdet`; no error check."""

    def __init__(self, dim: int, la_R: float, la_mu: float, R_ini: float, eps: float, device):
        eye = torch.eye(dim, dtype=torch.float64, device=device)
        self.R1, self.R2 = R_ini * eye, R_ini * eye.clone()
        self.mu1 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.mu2 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.R_eps = eps * eye
        self.la_R, self.la_mu = la_R, la_mu

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        n, d = z1.shape
        mu1 = self.la_mu * self.mu1 + (1 - self.la_mu) * z1.mean(0)
        mu2 = self.la_mu * self.mu2 + (1 - self.la_mu) * z2.mean(0)
        z1c, z2c = z1 - mu1, z2 - mu2
        R1 = self.la_R * self.R1 + (1 - self.la_R) * (z1c.T @ z1c) / n
        R2 = self.la_R * self.R2 + (1 - self.la_R) * (z2c.T @ z2c) / n
        loss = -(torch.logdet(R1 + self.R_eps) + torch.logdet(R2 + self.R_eps)) / d
        self.R1, self.R2, self.mu1, self.mu2 = R1.detach(), R2.detach(), mu1.detach(), mu2.detach()
        return loss


class BaselineStep:
    """One official training step: forward both views, loss, `zero_grad`, backward, SGD step, and the
    official per-batch NaN check on `loss.item()`.

    `amp=True` is the ImageNet-1K script's `--amp` path instead: forward and loss under fp16
    `autocast`, `loss.item()`, then `scaler.scale(loss).backward()`, `scaler.step`, `scaler.update`,
    `zero_grad` with a `GradScaler` (the float64 loss state keeps the covariances out of autocast)."""

    def __init__(self, preset: dict, device: torch.device, lr: float, seed: int = 0, amp: bool = False):
        torch.manual_seed(seed)
        self.model = OfficialModel(
            preset["backbone"], preset["cifar_stem"], preset["projector_dims"], preset["projector_batchnorm"]
        ).to(device)
        self.model.train()
        self.loss_fn = OfficialCovarianceLoss(
            preset["projector_dims"][-1],
            preset["lambda_R"],
            preset["lambda_mu"],
            preset["R_init"],
            preset["eps"],
            device,
        )
        self.alpha, self.device = preset["alpha"], device
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=preset["momentum"], weight_decay=preset["weight_decay"]
        )
        self.scaler = torch.amp.GradScaler(device.type) if amp else None

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> float:
        x1, x2 = x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True)
        if self.scaler is not None:
            return self.amp_step(x1, x2)
        z1, z2 = self.model(x1, x2)
        loss = self.alpha * F.mse_loss(z1, z2) + self.loss_fn(z1, z2)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        value = loss.item()
        if math.isnan(value):
            raise FloatingPointError("baseline loss is NaN")
        return value

    def amp_step(self, x1: torch.Tensor, x2: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=torch.float16):
            z1, z2 = self.model(x1, x2)
            loss = self.alpha * F.mse_loss(z1, z2) + self.loss_fn(z1, z2)
        value = loss.item()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if math.isnan(value):
            raise FloatingPointError("baseline loss is NaN")
        return value


# ---------------------------------------------------------------------------------------------------


def case_setup(name: str, batch_size: int | None, device: torch.device):
    case = CASES[name]
    preset = {**PRESETS[case.preset], **case.overrides}
    config = CorInfoMaxConfig(**{k: preset[k] for k in CONFIG_KEYS})
    batch = batch_size or (case.cuda_batch if device.type == "cuda" else case.cpu_batch)
    lr = preset["learning_rate"] * batch / preset["lr_reference_batch_size"]  # as train.py scales it
    return preset, config, batch, lr


CONFIG_KEYS = (
    "backbone", "cifar_stem", "projector_dims", "projector_batchnorm", "normalize", "alpha",
    "lambda_R", "lambda_mu", "R_init", "eps", "image_size", "image_mean", "image_std",
)  # fmt: skip


def make_step(variant: str, name: str, batch_size: int | None, device: torch.device, accelerator):
    """(step closure, model) for one variant of one case, fed from fixed host batches."""
    preset, config, batch, lr = case_setup(name, batch_size, device)
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    crops = [
        torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator) for _ in "12"
    ]
    pin = device.type == "cuda"
    if variant in ("baseline", "baseline_fp16"):
        step = BaselineStep(preset, device, lr, amp=variant == "baseline_fp16")
        views = [normalize_batch(c, config.image_mean, config.image_std) for c in crops]
        views = [v.pin_memory() if pin else v for v in views]
        return (lambda: step(*views)), step.model
    step = our_step(variant, name, batch_size, device, accelerator)
    crops = [c.pin_memory() if pin else c for c in crops]
    return (lambda: step(*crops)), step.model


def our_step(variant: str, name: str, batch_size: int | None, device: torch.device, accelerator) -> TrainStep:
    """Our step for `variant` (ours: bf16 through `accelerator`; ours_fp32; ours_compile) of one case."""
    preset, config, _, lr = case_setup(name, batch_size, device)
    return TrainStep(
        config,
        TwoViewAugmentation(),
        device,
        accelerator=None if variant == "ours_fp32" else accelerator,
        lr=lr,
        optimizer=preset["optimizer"],
        momentum=preset["momentum"],
        weight_decay=preset["weight_decay"],
        exclude_bias_and_norm_from_wd=preset["exclude_bias_and_norm_from_wd"],
        compile=variant == "ours_compile",
    )


def backbone_flops(name: str, batch: int, device: torch.device, backward: bool = True) -> tuple[float, float]:
    """(backbone, whole model) FLOPs of one training step (two views, forward + backward, or the forward
    alone with `backward=False`), counted by `FlopCounterMode` on a batch of 2 and scaled to `batch`
    (every counted op is linear in the batch, except the loss's D x D work, which is negligible)."""
    _, config, _, _ = case_setup(name, 2, device)
    model = OfficialModel(
        config.backbone, config.cifar_stem, config.projector_dims, config.projector_batchnorm
    ).to(device)
    x = torch.randn(2, 3, config.image_size, config.image_size, device=device)
    counts = {}
    for part, fn in (("backbone", model.backbone), ("model", lambda t: model.projector(model.backbone(t)))):
        with FlopCounterMode(display=False) as counter:
            out = fn(x).sum()
            if backward:
                out.backward()
        counts[part] = counter.get_total_flops() * 2 * batch / 2  # two views
    return counts["backbone"], counts["model"]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def memory_probe(variant: str, name: str, batch_size: int | None, steps: int) -> int:
    """CPU bytes the step needs beyond what exists before its first call (weights, inputs): gradients,
    optimizer state, activations, workspace. Meant for a fresh process: peak RSS never goes down."""
    device = torch.device("cpu")
    accelerator = make_accelerator(device) if variant in ("ours", "ours_compile") else None
    step, _ = make_step(variant, name, batch_size, device, accelerator)
    before = rss_bytes()
    for _ in range(steps):
        step()
    return peak_rss_bytes() - before


def memory_in_subprocess(variant: str, name: str, args) -> int | None:
    """Run `memory_probe` in a fresh interpreter (the peak RSS of a process never goes down)."""
    cmd = [sys.executable, __file__, "--memory_probe", f"{name}:{variant}", "--warmup", str(args.warmup)]
    if args.batch_size:
        cmd += ["--batch_size", str(args.batch_size)]
    # A fixed mmap threshold makes glibc return every freed block of 128 KiB or more at once, so the
    # peak RSS follows the live tensors instead of the allocator's timing-dependent caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in result.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["bytes"]
    print(f"warning: memory probe {name}:{variant} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
    return None


def make_accelerator(device: torch.device):
    from accelerate import Accelerator  # noqa: PLC0415

    return Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")


def default_variants(device: torch.device, compile: bool) -> list[str]:
    variants = ["baseline", "ours"]
    if device.type == "cuda":
        variants += ["ours_fp32", "ours_compile"]
    elif compile:
        variants += ["ours_compile"]
    return variants


def bench_case(name: str, args, device: torch.device, accelerator, baseline: str = "baseline") -> dict:
    """Time `args.variants` of case `name` alternately; "vs baseline" and the ratios are against
    the variant `baseline`."""
    variants = args.variants or default_variants(device, args.compile)
    _, _, batch, _ = case_setup(name, args.batch_size, device)
    runs, memory = {}, {}
    for variant in variants:  # build, warm up and (on CUDA) measure memory one variant at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step, model = make_step(variant, name, args.batch_size, device, accelerator)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        for _ in range(args.warmup):
            step()
        synchronize(device)
        if device.type == "cuda":
            memory[variant] = torch.cuda.max_memory_allocated(device) - before
        runs[variant] = step
    if device.type == "cpu" and not args.no_memory:
        memory = {v: memory_in_subprocess(v, name, args) for v in variants}
    load_before = wait_for_quiet(args.max_load)
    steps = args.steps or (10 if device.type == "cuda" else 1)
    times = alternate(runs, args.repeats, steps, device)
    load_after = os.getloadavg()[0]
    flops_backbone, flops_model = backbone_flops(name, batch, device)
    peak = peak_tflops(device, args.peak_tflops)
    base = median(times[baseline]) if baseline in times else None
    rows = []
    for variant in variants:
        seconds = median(times[variant])
        row = {
            "case": name,
            "variant": variant,
            "batch": batch,
            "img/s": batch / seconds,
            "s/step": seconds,
            "min-max s/step": f"{min(times[variant]):.3g}-{max(times[variant]):.3g}",
            "vs baseline": base / seconds if base else None,
            "peak mem MiB": memory[variant] / 2**20 if memory.get(variant) is not None else None,
            "backbone TFLOP/s": flops_backbone / seconds / 1e12,
        }
        if peak:
            row["% of bf16 peak"] = 100 * flops_backbone / seconds / 1e12 / peak
        rows.append(row)
    if base:  # per-repeat ratios: robust to drifts of the machine's speed between repeats
        for row in rows:
            ratios = [b / o for b, o in zip(times[baseline], times[row["variant"]])]
            row["median ratio"] = median(ratios)
            row["ratio per repeat"] = ", ".join(f"{r:.2f}" for r in ratios)
    return {
        "case": name,
        "preset": CASES[name].preset,
        "batch_size": batch,
        "steps_per_repeat": steps,
        "times_s_per_step": times,
        "flops_per_step_backbone": flops_backbone,
        "flops_per_step_model": flops_model,
        "peak_bf16_tflops": peak,
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------
# bf16 vs fp32 loss trajectory


def trajectory_batches(config: CorInfoMaxConfig, batch: int, steps: int) -> tuple[list, int]:
    """`steps` batches of uint8 crops from the bundled Fashion-MNIST through `ImageViewDataset` (real
    images), or of random pixels when the bundled data is missing; and the number of rows of that dataset."""
    from modeling_corinfomax.data import (  # noqa: PLC0415
        DataError,
        ExampleCollator,
        ImageViewDataset,
        load_image_dataset,
        resolve_columns,
    )

    try:
        train = load_image_dataset()
    except DataError:
        generator = torch.Generator().manual_seed(0)
        size = config.image_size
        shape = (batch, 3, size, size)
        views = [
            tuple(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in "12")
            for _ in range(steps)
        ]
        return views, batch * steps
    image_column, label_column = resolve_columns(train)
    rows = len(train)
    train = train.select(range(min(rows, batch * steps)))
    crops = ImageViewDataset(
        train, image_column, label_column, config.image_size, augmentation=TwoViewAugmentation()
    )
    loader = torch.utils.data.DataLoader(
        crops, batch_size=batch, drop_last=True, collate_fn=ExampleCollator()
    )
    batches = [(b["view1"], b["view2"]) for b in loader]
    return [batches[i % len(batches)] for i in range(steps)], rows


def check_trajectory(args, device: torch.device, accelerator) -> dict:
    """The losses of our fp32 and bf16 steps over the same batches from the same initial weights."""
    name = args.cases[0]
    preset, config, batch, peak_lr = case_setup(name, args.batch_size, device)
    batches, rows = trajectory_batches(config, batch, args.trajectory_steps)
    if args.trajectory_lr is None:  # the first steps of train.py's schedule (the warm-up) on this data
        from modeling_corinfomax.cli import train  # noqa: PLC0415

        steps_per_epoch = rows // batch
        total_steps = math.ceil(preset["num_train_epochs"] * steps_per_epoch)
        factor = train.schedule(argparse.Namespace(**preset), steps_per_epoch, total_steps, peak_lr)
        lrs = [peak_lr * factor(i) for i in range(len(batches))]
    else:
        lrs = [args.trajectory_lr] * len(batches)
    torch.manual_seed(0)
    from modeling_corinfomax import CorInfoMaxForPreTraining  # noqa: PLC0415

    init = copy.deepcopy(CorInfoMaxForPreTraining(config).state_dict())
    rounded = {k: v.bfloat16().to(v.dtype) if v.is_floating_point() and v.dtype != torch.float64 else v
               for k, v in init.items()}  # fmt: skip
    losses: dict[str, list[float]] = {}
    for variant, acc, weights in (
        ("fp32", None, init),
        ("bf16", accelerator, init),
        ("control", None, rounded),
    ):
        step = TrainStep(
            config,
            TwoViewAugmentation(),
            device,
            accelerator=acc,
            lr=lrs[0],
            optimizer=preset["optimizer"],
            momentum=preset["momentum"],
            weight_decay=preset["weight_decay"],
            state_dict=weights,
        )
        losses[variant] = []
        for lr, views in zip(lrs, batches):
            for group in step.optimizer.param_groups:
                group["lr"] = lr
            losses[variant].append(step(*views).item())
        print(f"{variant}: first {losses[variant][0]:.6f}, last {losses[variant][-1]:.6f}", flush=True)

    def relative(variant: str) -> list[float]:
        return [abs(b - f) / abs(f) for f, b in zip(losses["fp32"], losses[variant])]

    rel, control = relative("bf16"), relative("control")
    worst = max(range(len(rel)), key=rel.__getitem__)
    last = {v: sum(losses[v][-10:]) / 10 for v in losses}
    first_ok = rel[0] <= args.trajectory_rtol
    spread_ok = median(rel) <= 2 * median(control)
    passed = first_ok and spread_ok
    print(
        f"\nloss trajectory, {name}, batch {batch}, lr {lrs[0]:.3g} to {lrs[-1]:.3g}, {len(rel)} steps\n"
        f"  first step: bf16 vs fp32 {rel[0]:.2e} (tolerance {args.trajectory_rtol:g}: "
        f"{'ok' if first_ok else 'FAIL'})\n"
        f"  median relative difference: bf16 vs fp32 {median(rel):.2e}, control vs fp32 {median(control):.2e} "
        f"({'ok' if spread_ok else 'FAIL'}: bf16 within 2x of the control)\n"
        f"  largest: bf16 {max(rel):.2e} at step {worst + 1}, control {max(control):.2e}\n"
        f"  mean loss of the last 10 steps: fp32 {last['fp32']:.4f}, bf16 {last['bf16']:.4f}, "
        f"control {last['control']:.4f}\n"
        f"  {'PASS' if passed else 'FAIL'}"
    )
    return {
        "case": name,
        "batch_size": batch,
        "lr": lrs,
        "steps": len(rel),
        "loss_fp32": losses["fp32"],
        "loss_bf16": losses["bf16"],
        "loss_control": losses["control"],
        "relative_difference": rel,
        "relative_difference_control": control,
        "max_relative_difference": max(rel),
        "median_relative_difference": median(rel),
        "median_relative_difference_control": median(control),
        "mean_last_10": last,
        "rtol_first_step": args.trajectory_rtol,
        "passed": passed,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=DEFAULT_CASES)
    p.add_argument(
        "--batch_size", type=int, help="override every case's batch (default: per case and device)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=["baseline", "baseline_fp16", "ours", "ours_fp32", "ours_compile"],
        help="default: baseline ours (+ ours_fp32 ours_compile on CUDA, + ours_compile with --compile); "
        "baseline_fp16 is the official ImageNet-1K --amp path (fp16 autocast + GradScaler)",
    )
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--steps", type=int, help="steps per timed repeat (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (alternating)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--peak_tflops", type=float, help="bf16 peak of the device (default: from a small table)")
    p.add_argument("--no_memory", action="store_true", help="skip the CPU peak-memory probes (subprocesses)")
    p.add_argument("--max_load", type=float, help="wait until the 1-min load average is below this")
    p.add_argument(
        "--check_trajectory", action="store_true", help="bf16 vs fp32 loss of our step, first case"
    )
    p.add_argument("--trajectory_steps", type=int, default=50)
    p.add_argument(
        "--trajectory_lr",
        type=float,
        help="a constant lr (default: train.py's warm-up schedule for the preset)",
    )
    p.add_argument(
        "--trajectory_rtol",
        type=float,
        default=1e-3,
        help="tolerance of the first step's relative difference",
    )
    p.add_argument("--output", help="JSON path (default bench/results/train_step.json)")
    p.add_argument("--memory_probe", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.memory_probe:
        name, variant = args.memory_probe.split(":")
        print(json.dumps({"bytes": memory_probe(variant, name, args.batch_size, args.warmup + 1)}))
        return
    load = wait_for_quiet(args.max_load)
    info = machine_info(device)
    info["load_average_1m_when_started_timing"] = round(load, 2)
    print(json.dumps(info, indent=2))
    accelerator = make_accelerator(device)
    payload: dict = {"machine": info, "args": vars(args)}
    if args.check_trajectory:
        payload["trajectory"] = check_trajectory(args, device, accelerator)
        write_json("train_step_trajectory", payload, args.output)
        return
    results = [bench_case(name, args, device, accelerator) for name in args.cases]
    payload["cases"] = results
    columns = ["case", "variant", "batch", "img/s", "s/step", "min-max s/step", "vs baseline"]
    columns += ["median ratio", "ratio per repeat", "peak mem MiB", "backbone TFLOP/s"]
    columns += ["% of bf16 peak"] if any("% of bf16 peak" in r for c in results for r in c["rows"]) else []
    for result in results:
        print_table(
            result["rows"],
            columns,
            title=f"{result['case']} (preset {result['preset']}), load average {result['load_average_1m']}",
        )
    write_json("train_step", payload, args.output)


if __name__ == "__main__":
    main()
