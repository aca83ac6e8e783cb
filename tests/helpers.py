"""Helpers for the tests that run train.py in a subprocess (test_train.py, test_faults.py, ...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so that the tests can `import train`
    sys.path.insert(0, str(REPO_ROOT))

# A run small enough for CI: 256 real images, batch 32, resnet18 at 28 px (not the demo's 40), no final
# evaluation.
SMALL = [
    "--max_train_samples", "256", "--total_batch_size", "32", "--image_size", "28", "--projector_dims", "64", "64", "16",
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


def start_train(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.Popen:
    """Start train.py in the background (under `launcher`, e.g. `accelerate launch ...`, else `python`),
    stderr merged into a text stdout pipe."""
    return subprocess.Popen(
        [*(launcher or [sys.executable]), str(REPO_ROOT / "train.py"), *args],
        env=train_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


class TrainInBackground:
    """train.py in the background, in its own session (a process group: its DataLoader workers too), to be
    signalled when it reaches a given point, never after a fixed sleep. A thread reads its merged stdout
    and stderr line by line, so a full pipe never stalls the run while the test waits.

    Use as a context manager: a run still alive at the end (a failed wait) is killed.
    """

    def __init__(self, args: list[str], launcher: list[str] | None = None):
        self.proc = start_train(args, launcher, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # universal newlines: tqdm's carriage returns end lines too
            self.lines.append(line)

    def __enter__(self) -> TrainInBackground:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.send(signal.SIGKILL)
        self.finish()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        """Return as soon as `condition()` holds (it is checked every 2 ms: file conditions, such as a
        checkpoint folder appearing, cannot be waited on otherwise); fail if the run ends first, or after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self.reader.join(timeout=60)
                raise AssertionError(
                    f"train.py ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.002)

    def send(self, sig: int, group: bool = True) -> None:
        """Send `sig` to the whole process group, or to the main process only."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the run to end; its exit status (-N for signal N) and everything it printed."""
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        return self.proc.returncode, self.output()


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path/model.safetensors`."""
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Both folders' model.safetensors hold bit-identical tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
