"""Helpers for the tests that run train.py in a subprocess (test_train.py, test_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that the tests can `import train`
    sys.path.insert(0, str(REPO_ROOT))

# A run small enough for CI: 256 real images, batch 32, resnet18 at 32 px, no final evaluation.
SMALL = [
    "--max_train_samples", "256", "--total_batch_size", "32", "--projector_dims", "64", "64", "16",
    "--logging_steps", "1", "--dataloader_num_workers", "0", "--no-do_eval",
]  # fmt: skip


def train_env(env_extra: dict | None = None) -> dict[str, str]:
    """The environment of a train.py subprocess: offline, two CPU threads."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        **(env_extra or {}),
    }


def run_train(args: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run train.py to the end; stdout and stderr are captured."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        env=train_env(env_extra),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
        **kwargs,
    )


def start_train(args: list[str], **kwargs) -> subprocess.Popen:
    """Start train.py in the background, stderr merged into a text stdout pipe."""
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        env=train_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path/model.safetensors`."""
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Both folders' model.safetensors hold bit-identical tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
