"""checkpointing: which checkpoint is picked, and what a resume sets aside or completes."""

from __future__ import annotations

import json

import pytest

from modeling_corinfomax.checkpointing import (
    latest_checkpoint,
    remove_unfinished_writes,
    set_aside_newer_best_model,
)


def test_partial_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_4").mkdir(parents=True)
    (root / "step_4" / "trainer_state.json").write_text("{}")
    (root / "step_9").mkdir()  # a crash mid-write: no trainer_state.json
    (root / ".tmp-step_12").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_4"


def test_a_best_model_newer_than_the_resumed_checkpoint_is_set_aside_and_a_killed_swap_completed(tmp_path):
    def best_folder(name: str, step: int) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "best_model.json").write_text(json.dumps({"step": step, "rankme": 9.0}))

    best_folder("best", 6)
    set_aside_newer_best_model(tmp_path, {"step": 6, "rankme": 9.0})  # the checkpoint's own best
    assert (tmp_path / "best").is_dir()
    set_aside_newer_best_model(tmp_path, {"step": 4, "rankme": 8.0})  # saved after the checkpoint
    assert not (tmp_path / "best").exists()
    assert json.loads((tmp_path / "abandoned-best" / "best_model.json").read_text())["step"] == 6
    # A kill between the two renames of a swap: the complete staged folder becomes best/.
    best_folder(".tmp-best", 8)
    best_folder(".old-best", 6)
    remove_unfinished_writes(tmp_path)
    assert json.loads((tmp_path / "best" / "best_model.json").read_text())["step"] == 8
    assert not (tmp_path / ".tmp-best").exists() and not (tmp_path / ".old-best").exists()


def test_library_errors_are_exceptions_that_name_the_fix_and_the_cli_turns_them_into_one_line(
    tmp_path, monkeypatch
):
    from accelerate import Accelerator

    from modeling_corinfomax.checkpointing import CheckpointSaver
    from modeling_corinfomax.cli import train
    from modeling_corinfomax.errors import CheckpointError, ConfigurationError, CorInfoMaxError

    damaged = tmp_path / "checkpoints" / "step_3"
    damaged.mkdir(parents=True)
    saver = CheckpointSaver(Accelerator(cpu=True), tmp_path)
    with pytest.raises(CheckpointError, match="resume from an older checkpoints/step_N or start afresh"):
        saver.resume(damaged)  # an exception for a library caller, not an exit
    assert issubclass(CheckpointError, CorInfoMaxError) and not issubclass(CheckpointError, SystemExit)

    def fails(argv):
        raise ConfigurationError("the batch does not divide: pass --total_batch_size 64")

    monkeypatch.setattr(train, "pretrain", fails)
    with pytest.raises(SystemExit) as raised:
        train.main([])
    assert str(raised.value) == "error: the batch does not divide: pass --total_batch_size 64"
