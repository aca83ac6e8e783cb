"""Several processes on a CPU machine, launched the way users launch them (`accelerate launch --multi_gpu`,
`torchrun`): the processes form one group or the run is refused; a rank killed with `kill -9` ends the
whole job, and `--resume_from_checkpoint latest` finishes it exactly as a run never interrupted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import REPO_ROOT, SMALL, TrainInBackground, assert_same_weights, train_env, weights

from modeling_corinfomax.checkpointing import latest_checkpoint

BIN = Path(sys.executable).parent
# The README's command for several processes on a CPU, and torchrun's.
LAUNCHERS = {
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"],
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
}
# A flat learning rate (warm-up from and to the same value, min_lr equal to it), so that a run planned for
# 10,000 steps makes the same first steps as one planned for 8.
RUN = [*SMALL, "--backbone", "test_resnet", "--max_train_samples", "64", "--total_batch_size", "16",
       "--mixed_precision", "no", "--checkpointing_steps", "1", "--warmup_epochs", "1", "--learning_rate",
       "0.03125", "--warmup_start_lr", "0.03125", "--lr_reference_batch_size", "16", "--min_lr", "0.03125",
       "--report_to", "none"]  # fmt: skip
DEAD_RANK_BOUND_SECONDS = 60  # from the kill of one rank to the end of the launcher


def failure(result: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (the launcher's summary hides its ranks' errors)."""
    log = (result.stdout + result.stderr).splitlines()
    return "\n".join(line for line in log if "rror" in line or "Traceback" in line)[-4000:] or "\n".join(
        log[-40:]
    )


def launch(launcher: str, args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCHERS[launcher], str(REPO_ROOT / "train.py"), *args],
        env=train_env(env_extra), capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_launched_processes_on_cpu_are_one_group(launcher, tmp_path):
    out = tmp_path / "run"
    result = launch(launcher, [*RUN, "--max_train_steps", "2", "--output_dir", str(out)])
    log = result.stdout + result.stderr
    assert result.returncode == 0, failure(result)
    [line] = [line for line in log.splitlines() if "processes on" in line]  # the main process's line only
    assert "2 processes on cpu" in line and "global batch 16" in line
    assert [r["step"] for r in json.loads((out / "training_log.json").read_text())] == [1, 2]
    from transformers import AutoModelForPreTraining  # noqa: PLC0415

    assert int(AutoModelForPreTraining.from_pretrained(out).loss_fn.num_updates) == 2  # one update per step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]


def test_processes_that_cannot_form_a_group_are_refused_with_one_line(tmp_path):
    # A launcher's variables without a rendezvous address: the group cannot form.
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *RUN, "--max_train_steps", "1", "--output_dir",
         str(tmp_path)], env={**train_env(), **env}, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the launcher started 2 processes but they could not form one group" in line
    assert "accelerate launch --multi_gpu --num_processes N" in line


def newest_step(out: Path) -> int:
    newest = latest_checkpoint(out)
    return int(newest.name[5:]) if newest else 0


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no train.py process of rank {rank} under the launcher")


def test_a_killed_rank_ends_the_job_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    result = launch("accelerate", [*RUN, "--max_train_steps", "8", "--output_dir", str(straight)])
    assert result.returncode == 0, failure(result)

    with TrainInBackground([*RUN, "--max_train_steps", "10000", "--output_dir", str(out)],
                           launcher=LAUNCHERS["accelerate"]) as run:  # fmt: skip
        run.wait_until(lambda: newest_step(out) >= 3, "the checkpoint of step 3")
        ranks = [rank_process(psutil.Process(run.proc.pid), rank) for rank in (0, 1)]
        for rank in ranks:  # held still, so that the kill lands before step 8
            rank.suspend()
        ranks[1].kill()
        killed = time.monotonic()
        ranks[0].resume()
        returncode, output = run.finish(timeout=300)
        ended = time.monotonic() - killed
    print(f"a killed rank ended the job in {ended:.1f} s")
    assert returncode != 0 and ended < DEAD_RANK_BOUND_SECONDS, output[-3000:]
    latest = latest_checkpoint(out)
    assert latest is not None and 3 <= int(latest.name[5:]) < 8
    assert all(torch.isfinite(t).all() for t in weights(latest).values() if t.is_floating_point())

    resumed = launch("accelerate", [*RUN, "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
                                    "--output_dir", str(out)])  # fmt: skip
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, failure(resumed)
    assert f"resumed from {latest}" in log
    assert_same_weights(straight, out)
    assert [r["step"] for r in json.loads((out / "training_log.json").read_text())] == list(range(1, 9))
