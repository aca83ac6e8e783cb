"""bench/gpu.py's CPU smoke run (`--device cpu --tiny`): every section runs, its numbers are sane, the
FLOP count matches an independent count and the float64 loss agrees with the official formula."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision
from helpers import REPO_ROOT, train_env
from torch import nn

SECTIONS = ("gemm", "train_step", "flops", "loss", "pipeline", "agreement")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON of one tiny CPU run of bench/gpu.py (HF_HUB_OFFLINE=1, OMP_NUM_THREADS=2)."""
    output = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny"]
    result = subprocess.run(
        [*command, "--output", str(output)],
        env=train_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SMOKE RUN on cpu" in result.stdout  # never mistaken for a GPU result
    return json.loads(output.read_text())


def numbers(value) -> list[float]:
    """Every int and float inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_every_section_reports_finite_numbers_and_positive_measurements(report):
    for section in SECTIONS:
        values = numbers(report[section])
        assert values and all(math.isfinite(v) for v in values), section
    assert report["smoke_run"] is True and report["machine"]["device"] == "cpu"
    assert report["gemm"]["tflops"] > 0
    rows = {row["variant"]: row for row in report["train_step"]["rows"]}
    assert set(rows) == {"baseline_fp16", "baseline", "ours"}
    for row in rows.values():
        for key in ("img/s", "s/step", "vs baseline", "backbone TFLOP/s", "% of bf16 peak"):
            assert row[key] > 0, (row["variant"], key)
    assert rows["baseline_fp16"]["vs baseline"] == 1  # the ratios are to the original recipe's AMP path
    assert [row["D"] for row in report["loss"]["rows"]] == [512, 128]
    for row in report["loss"]["rows"]:
        assert row["loss ms"] > 0 and row["% of step"] > 0
    pipeline = report["pipeline"]["row"]
    assert pipeline["workers"] == 1
    for key in ("e2e img/s", "compute+aug img/s", "compute img/s", "first batch s"):
        assert pipeline[key] > 0, key
    assert -1 < pipeline["pipeline share"] < 1
    assert [goal["result"] in ("PASS", "FAIL") for goal in report["goals"]] == [True] * 4
    assert all(math.isfinite(goal["measured"]) for goal in report["goals"])


def analytic_forward_flops(backbone: nn.Module, image_size: int) -> tuple[int, int]:
    """(all convolutions and linear layers, the first convolution) FLOPs of one image's forward,
    2 * multiply-adds from each layer's output shape, counted with forward hooks."""
    counts: list[int] = []

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            counts.append(2 * output.numel() * module.in_channels // module.groups * kh * kw)
        else:
            counts.append(2 * output.numel() * module.in_features)

    for module in backbone.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(hook)
    with torch.no_grad():
        backbone(torch.zeros(1, 3, image_size, image_size))
    return sum(counts), counts[0]


def test_flop_count_matches_an_independent_count(report):
    flops = report["flops"]
    backbone = getattr(torchvision.models, flops["backbone"])().eval()  # eval: BatchNorm takes one image
    backbone.fc = nn.Identity()
    forward, first_conv = analytic_forward_flops(backbone, flops["image_size"])
    assert flops["backbone_forward_flops_per_image"] == forward
    # The backward of each convolution costs twice its forward (input and weight gradients), except the
    # first one's: the images need no gradient.
    assert flops["backbone_train_step_flops"] == flops["images_per_step"] * (3 * forward - first_conv)
    assert flops["model_forward_flops_per_image"] > forward  # plus the projector


def test_float64_loss_agrees_with_the_official_formula(report):
    agreement = report["agreement"]
    assert agreement["mode"] == "cpu_vs_reference" and "official formula" in agreement["compared"]
    assert agreement["D"] == 512 and agreement["steps"] >= 2  # the running state took part
    assert agreement["relative_error"] <= 1e-12
    assert agreement["max_relative_error"]["cpu_vs_reference"]["grad"] <= 1e-12
