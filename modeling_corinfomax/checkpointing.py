"""Checkpoints and model saves that a kill, a full disk or a numerical fault never leaves half-written.

`CheckpointSaver` owns the layout of a training run's output folder:

    <output_dir>/checkpoints/step_<N>/    `accelerator.save_state` + trainer_state.json, one per save
    <output_dir>/model.safetensors ...    the final model (`save_pretrained`)
    <output_dir>/best/                    `--save_best_by`: the best step's model + best_model.json
    <output_dir>/.run.lock                `RunLock`: the running run's host and pid (one run per folder)

Every write goes to a hidden `.tmp-` folder first and is renamed into place; deletions rename to
`.old-` first. A `step_<N>` folder is therefore always complete, and `latest()` never picks a partial
one. Shaped like timm's `CheckpointSaver` (`timm/utils/checkpoint_saver.py`), on Accelerate's state.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil
import torch

from .errors import CheckpointError, TrainingFault
from .training import all_processes_agree

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_STAGING = ".tmp-model"  # save_pretrained writes here, then the files are renamed into the output folder
BEST_MODEL, BEST_STATE = "best", "best_model.json"  # --save_best_by: <output_dir>/best/best_model.json
FAULT_REMEDY = "a lower --learning_rate, a larger --eps or fp32 (--mixed_precision no)"


def _on_any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (the same answer everywhere)."""
    return not all_processes_agree(accelerator, not flag)


def write_atomically(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers never see it half-written."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one device sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def checkpoint_step(path: Path) -> int | None:
    """N of a `step_<N>` folder; None for any other name (hidden, abandoned)."""
    return int(path.name[5:]) if re.fullmatch(r"step_\d+", path.name) else None


def latest_checkpoint(output_dir: Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint (a partial one has no trainer_state.json and is never picked),
    or the newest of a step below `before`."""
    done = [
        p
        for p in (Path(output_dir) / CHECKPOINTS).glob("step_*")
        if (p / TRAINER_STATE_NAME).exists()
        and checkpoint_step(p) is not None
        and (before is None or checkpoint_step(p) < before)
    ]
    return max(done, key=checkpoint_step, default=None)


def remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a kill midway leaves a hidden folder, never a half-deleted `step_<N>`."""
    hidden = path.with_name(f".old-{path.name}")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_unfinished_writes(output_dir: Path) -> None:
    """Delete what a killed run left half-written: hidden checkpoint folders, the model staging folder and
    the best model's (a complete staged best model whose swap a kill interrupted is put in place)."""
    best, staged = output_dir / BEST_MODEL, output_dir / f".tmp-{BEST_MODEL}"
    if not best.exists() and (staged / BEST_STATE).exists():
        os.replace(staged, best)
    hidden = [output_dir / MODEL_STAGING, staged, output_dir / f".old-{BEST_MODEL}"]
    for path in [*(output_dir / CHECKPOINTS).glob(".*-step_*"), *hidden]:
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename `path` to `abandoned-<name>` (kept for inspection, never picked again)."""
    target = path.with_name(f"abandoned-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def set_aside_newer_checkpoints(output_dir: Path, step: int) -> None:
    """Resuming from an older checkpoint abandons the newer ones (after a numerical fault, say): rename
    them `abandoned-step_N`, so that 'latest' never mixes the two runs."""
    for path in sorted((output_dir / CHECKPOINTS).glob("step_*")):
        if (checkpoint_step(path) or 0) > step:
            target = set_aside(path)
            logger.warning("resumed from step %d: the newer %s is now %s", step, path, target.name)


def set_aside_newer_best_model(output_dir: Path, best: dict | None) -> None:
    """Resuming from an older checkpoint abandons a best model saved after it: rename it `abandoned-best`,
    so that <output_dir>/best only ever holds a model of the run that goes on."""
    path = output_dir / BEST_MODEL
    if not (path / BEST_STATE).exists():
        return
    saved = json.loads((path / BEST_STATE).read_text())
    if best is None or saved["step"] != best["step"]:
        target = set_aside(path)
        logger.warning("%s held the model of step %d, not the resumed checkpoint's best (%s): it is now %s",
                       path, saved["step"], f"step {best['step']}" if best else "none", target)  # fmt: skip


class CheckpointSaver:
    """Atomic training checkpoints and model saves in one output folder, on every process alike.

    Args:
        accelerator: the run's `Accelerator` (`save_state`/`load_state`, the main process, barriers).
        output_dir: the run's `--output_dir`.
        save_total_limit: keep only the newest N checkpoints (None: all).
    """

    def __init__(self, accelerator, output_dir: str | os.PathLike, save_total_limit: int | None = None):
        self.accelerator, self.output_dir, self.save_total_limit = (
            accelerator,
            Path(output_dir),
            save_total_limit,
        )
        self.last_saved: Path | None = None

    def latest(self, before: int | None = None) -> Path | None:
        """The newest complete checkpoint (of a step below `before`)."""
        return latest_checkpoint(self.output_dir, before)

    def prepare_folder(self) -> None:
        """Create the output folder and remove what a killed run left half-written (main process)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished_writes(self.output_dir)

    def resume(self, path: Path) -> dict:
        """Load the state of checkpoint `path`; return its trainer state. Newer checkpoints (and a best
        model not of this checkpoint's best step) are set aside."""
        try:
            self.accelerator.load_state(str(path))
            state = json.loads((path / TRAINER_STATE_NAME).read_text())
        except Exception as error:  # noqa: BLE001  (any failure here has the same remedy)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"cannot resume from {path} ({type(error).__name__}: {first_line}). It is damaged or was "
                "written with other model settings: resume from an older checkpoints/step_N or start afresh."
            ) from None
        if self.accelerator.is_main_process:
            set_aside_newer_checkpoints(self.output_dir, state["global_step"])
            set_aside_newer_best_model(self.output_dir, state.get("best"))
        return state

    def save(self, state: dict, rotate: bool = True) -> Path:
        """`accelerator.save_state` into a temporary folder, then an atomic rename to `step_<N>`; with
        `rotate`, the checkpoints beyond `save_total_limit` are removed (oldest first)."""
        accelerator, root = self.accelerator, self.output_dir / CHECKPOINTS
        final = root / f"step_{state['global_step']}"
        tmp = root / f".tmp-step_{state['global_step']}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        # Every process writes its part (its random states) into `tmp`; the main process renames it only
        # once all have written theirs, and all stop together when any write failed.
        error = None
        try:
            accelerator.save_state(str(tmp))
        except Exception as caught:  # noqa: BLE001  (a full disk raises OSError, RuntimeError or SafetensorError)
            error = caught
        failed = _on_any_process(self.accelerator, error is not None)
        if not failed and accelerator.is_main_process:
            try:
                (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state))
                if final.exists():
                    remove_checkpoint(final)
                os.replace(tmp, final)
            except OSError as caught:
                error = caught
        if failed or _on_any_process(self.accelerator, error is not None):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(root).free / 2**20
            what = (
                f"{type(error).__name__}: {error}" if error is not None else "another process failed to write"
            )
            raise CheckpointError(
                f"could not write checkpoint {final} ({what}; {free:.0f} MiB free there). The previous "
                "checkpoints are intact: free disk space (or lower --save_total_limit) and resume with "
                "--resume_from_checkpoint latest."
            )
        if accelerator.is_main_process and rotate and self.save_total_limit:
            done = sorted(
                (p for p in root.glob("step_*") if (p / TRAINER_STATE_NAME).exists()), key=checkpoint_step
            )
            for old in done[: -self.save_total_limit]:
                remove_checkpoint(old)
        self.last_saved = final
        return final

    def save_or_stop(self, model, state: dict, fault: str | None = None, diverged: bool = False) -> Path:
        """Checkpoint the current step; on a numerical `fault`, or when the last update made the weights
        non-finite, end the run instead, naming the step, the likely causes and the checkpoint to resume
        from (`diverged`: the fault is known not to come from a few batches). Non-finite weights are never
        saved, and a fault's checkpoint rotates no older one out."""
        finite = weights_are_finite(model)
        if fault is None and finite:
            return self.save(dict(state))
        step = state["global_step"]
        if finite:
            path = self.save(dict(state), rotate=False)
            earlier = self.latest(before=step)
            advice = f"The state after step {step}, the last completed one, is saved in {path}. " + (
                "The weights have diverged:"
                if diverged
                else "If a few batches cause this, resume from it with --on_nan skip; if the fault comes back at "
                "once, the weights have diverged:"
            )
            advice += (
                f" resume from {earlier} with {FAULT_REMEDY}."
                if earlier
                else f" start again with {FAULT_REMEDY}."
            )
        else:
            fault = fault or f"step {step}: the update made the weights non-finite"
            newest = self.latest()
            advice = "The weights were not saved. " + (
                f"Resume from the newest checkpoint, {newest}, with {FAULT_REMEDY}."
                if newest
                else f"No checkpoint exists (see --checkpointing_steps): start again with {FAULT_REMEDY}."
            )
        raise TrainingFault(f"numerical fault at {fault}\n{advice}")

    def save_model(self, model, best: dict | None = None) -> None:
        """`save_pretrained` into a staging folder, then rename each file into place, so a kill or a full
        disk never leaves a half-written model.safetensors (nor destroys the previous one).

        With `best` (the step and score of `--save_best_by`), the model and `best` (as best_model.json) go
        to <output_dir>/best instead, swapped in whole as checkpoints are: the folder always holds one
        step's weights with that step's json (`remove_unfinished_writes` completes an interrupted swap)."""
        accelerator, project = self.accelerator, self.output_dir
        staging = project / (f".tmp-{BEST_MODEL}" if best else MODEL_STAGING)
        # Only the main process touches the folder (the weights are the same on every process): another
        # process's `save_pretrained` would create or remove the staging folder under its feet.
        error = None
        if accelerator.is_main_process:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                model.save_pretrained(str(staging))
                if best is not None:
                    (staging / BEST_STATE).write_text(json.dumps(best))
                    if (project / BEST_MODEL).exists():
                        os.replace(project / BEST_MODEL, project / f".old-{BEST_MODEL}")
                    os.replace(staging, project / BEST_MODEL)
                    shutil.rmtree(project / f".old-{BEST_MODEL}", ignore_errors=True)
                else:
                    for path in staging.iterdir():
                        os.replace(path, project / path.name)
                    staging.rmdir()
            except Exception as caught:  # noqa: BLE001  (a full disk raises OSError, RuntimeError or SafetensorError)
                error = caught
                shutil.rmtree(staging, ignore_errors=True)
        if _on_any_process(self.accelerator, error is not None):
            what = (
                f"{type(error).__name__}: {error}"
                if error is not None
                else "the main process failed to write it"
            )
            raise CheckpointError(
                f"could not write the model to {project} ({what}). Free disk space and run again with "
                "--resume_from_checkpoint latest (training resumes from the newest checkpoint)."
            )


class RunLock:
    """One run per output folder: the run's main process holds `<output_dir>/.run.lock`, a JSON file with
    its host, pid and process start time, and touches it every `HEARTBEAT_SECONDS` from a daemon thread.

    A second run finds the lock and is refused, unless the lock is stale, which is taken over (one log
    line): on the same host, when its process is gone (pid absent, or reused by a process started later:
    a `kill -9`, a crash); from another host, when it was last touched over `STALE_SECONDS` ago (a lost
    node). A run that ends in any other way removes its lock (`release`, also at interpreter exit).
    """

    NAME, HEARTBEAT_SECONDS, STALE_SECONDS = ".run.lock", 30.0, 180.0

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / self.NAME
        self.stop = threading.Event()
        me = psutil.Process()
        self.me = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}

    @staticmethod
    def describe(holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"

    def holder(self) -> dict | None:
        """The lock's content, None when there is no lock ({} when it cannot be parsed)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale(self, holder: dict) -> bool:
        """Whether the run that wrote `holder` is gone (class docstring)."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            try:
                process = psutil.Process(holder["pid"])
                return abs(process.create_time() - float(holder.get("started", 0))) > 1.0  # a reused pid
            except psutil.NoSuchProcess:
                return True
        try:
            return time.time() - self.path.stat().st_mtime > self.STALE_SECONDS
        except FileNotFoundError:
            return True

    def acquire(self) -> str | None:
        """Take the lock: None, or the one-line reason it is held by a running run."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock removed or taken over between our reads: look again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if holder == self.me:
                    break
                if not self.stale(holder):
                    return (
                        f"--output_dir {self.path.parent} is in use by a running run ({self.describe(holder)}); "
                        "wait for it to end, or choose another --output_dir."
                    )
                logger.info("--output_dir %s: took over the lock of a run that is gone (%s)", self.path.parent,
                            self.describe(holder) if holder else "unreadable lock")  # fmt: skip
                write_atomically(self.path, json.dumps(self.me))
                if self.holder() != self.me:  # another run took it over at the same moment
                    continue
                break
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.me))
                break
        else:
            return f"--output_dir {self.path.parent}: could not take its run lock {self.path}; try again."
        threading.Thread(target=self._heartbeat, daemon=True, name="run-lock").start()
        atexit.register(self.release)
        return None

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        self.stop.set()
        if self.holder() == self.me:
            self.path.unlink(missing_ok=True)
