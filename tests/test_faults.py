"""Reliability of train.py: bad data, bad configuration, numerical faults, interruptions, full disks and
untrusted files. Every failure is refused before training or ends the run with one clear line, and the
output folder always holds complete, loadable checkpoints.

Most runs call `train.main` in this process (no interpreter start-up); the kills use real subprocesses.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import is_wandb_available
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from helpers import SMALL, TrainInBackground, assert_same_weights, run_train, weights
from PIL import Image

from modeling_corinfomax.checkpointing import MODEL_STAGING, latest_checkpoint
from modeling_corinfomax.cli import train
from modeling_corinfomax.data import BatchViewAugment, DataError, class_indices, class_names, decode_image
from modeling_corinfomax.errors import Interrupted
from modeling_corinfomax.training import StopSignal

# SMALL with a 0.4M-parameter backbone and 64 images in batches of 16 (4 steps per epoch): seconds a run.
# fp32 everywhere: the runs in this process share one AcceleratorState (the bundled demo defaults to bf16).
FAST = [*SMALL, "--backbone", "test_resnet", "--max_train_samples", "64", "--total_batch_size", "16",
        "--mixed_precision", "no"]  # fmt: skip
FAKE_TOKEN = "hf_" + "FakeTokenForTheLeakTest" * 2


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """`train.main` installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def refusal(argv: list[str]) -> str:
    """The message of the SystemExit that `train.main(argv)` ends with."""
    with pytest.raises(SystemExit) as raised:
        train.main(argv)
    return str(raised.value)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- bad data

# Files that decode_image converts to RGB (each a 32x32 image), and files nobody can train on.
CONVERTIBLE = {
    "sixteen_bit.png": lambda: Image.fromarray((np.arange(1024, dtype=np.uint16) * 50).reshape(32, 32)),
    "cmyk.jpg": lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)),
    "palette_transparent.png": lambda: Image.new("P", (32, 32), 0),  # saved with index 0 transparent
    "gray_alpha.png": lambda: Image.new("LA", (32, 32), (90, 128)),
}
UNREADABLE = {
    "empty.png": b"",
    "garbage.png": b"this is not an image\n" * 20,
    "truncated.png": png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:2000],
}
# Readable images of 1 pixel on a side: a random resized crop of them is still an image, so they are used.
TINY = {
    "one_pixel.png": png_bytes(np.full((1, 1, 3), (200, 30, 30), np.uint8)),
    "wide_line.png": png_bytes(np.full((1, 300, 3), (200, 30, 30), np.uint8)),
    "tall_line.png": png_bytes(np.full((300, 1, 3), (200, 30, 30), np.uint8)),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder of 31 files in classes a/ and b/: 24 good PNGs, the 4 convertible and the 3 unreadable."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for klass in "ab":
        (root / klass).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / klass / f"{i}.png")
    for i, (name, make) in enumerate(CONVERTIBLE.items()):
        make().save(root / "ab"[i % 2] / name, **({"transparency": 0} if name.startswith("palette") else {}))
    for i, (name, data) in enumerate(UNREADABLE.items()):
        (root / "ab"[i % 2] / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """An imagefolder of 12 good 32x32 PNGs and the 3 images of one pixel a side."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    for i in range(12):
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            root / "ab"[i % 2] / f"{i}.png"
        )
    for i, (name, data) in enumerate(TINY.items()):
        (root / "ab"[i % 2] / name).write_bytes(data)
    return root


def test_train_py_uses_images_of_one_pixel_a_side(tiny_images, tmp_path):
    out = tmp_path / "run"
    flags = [*FAST, "--train_dir", str(tiny_images), "--max_train_steps", "2", "--total_batch_size", "15"]
    result = run_train([*flags, "--dataloader_num_workers", "1", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "cropping per image" in result.stdout
    )  # the sizes differ: crops per image, every one of the 15 used
    assert json.loads((out / "eval_results.json").read_text())["bad_images"] == 0


def test_images_of_one_pixel_a_side_give_views_of_their_colour(tiny_images):
    from modeling_corinfomax.data import crop_view, decode_image_tensor, eval_view  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    for name in TINY:
        image = decode_image_tensor(str(next(tiny_images.rglob(name))))
        for view in (crop_view(image, 24, (0.08, 1.0), 0.5, generator), eval_view(image, 24)):
            assert view.shape == (3, 24, 24)  # a flat colour resamples to itself
            assert view.reshape(3, -1).unique(dim=1).tolist() == [[200], [30], [30]], name


def test_unusual_image_modes_are_converted_to_rgb(image_folder):
    images = {name: decode_image(str(next(image_folder.rglob(name)))) for name in CONVERTIBLE}
    assert {(im.mode, im.size) for im in images.values()} == {("RGB", (32, 32))}
    sixteen = np.asarray(images["sixteen_bit.png"])
    assert sixteen.min() == 0 and sixteen.max() == 255  # rescaled from its own 16-bit range
    assert (np.asarray(images["palette_transparent.png"]) == 255).all()  # transparency composited on white
    assert np.asarray(images["cmyk.jpg"])[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("image_cache", ["on", "off"])
def test_unreadable_images_end_the_run_with_one_line_that_names_a_file(image_cache, image_folder, tmp_path):
    # The error is raised in a DataLoader worker process (while decoding the split for the image cache,
    # or mid-epoch without it); it must reach the user as one clean line, and the program must exit (the
    # worker ignores SIGTERM, which multiprocessing uses to end it at exit).
    flags = ["--train_dir", str(image_folder), "--dataloader_num_workers", "1", "--max_train_steps", "2"]
    flags += ["--image_cache", image_cache]
    result = run_train([*FAST, *flags, "--output_dir", str(tmp_path / "run")])
    [message] = [line.split("error: ", 1)[1] for line in result.stderr.splitlines() if "error: " in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message.startswith("could not read") and "--skip_bad_images" in message
    assert any(name in message for name in UNREADABLE)


@pytest.mark.parametrize("image_cache", ["on", "off"])
def test_skip_bad_images_skips_counts_and_logs_them(image_cache, image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    flags = [*FAST, "--train_dir", str(image_folder), "--max_train_steps", "2", "--skip_bad_images"]
    flags += ["--image_cache", image_cache]
    results = train.main([*flags, "--output_dir", str(out)])
    # One epoch reads each file once: exactly the 3 unreadable ones are skipped, the 4 convertible are used.
    assert results["global_step"] == 2 and results["bad_images"] == 3
    assert json.loads((out / "eval_results.json").read_text())["bad_images"] == 3
    logged = "\n".join(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert any(name in logged for name in UNREADABLE)


@pytest.fixture(scope="module")
def no_image_dataset(tmp_path_factory) -> Path:
    """A parquet dataset folder whose columns are `pixels` (lists of ints) and `label`."""
    root = tmp_path_factory.mktemp("no_images")
    Dataset.from_dict({"pixels": [[0] * 16] * 40, "label": [0, 1] * 20}).to_parquet(
        str(root / "train.parquet")
    )
    return root


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_dir", "{empty}"], "cannot load --train_dir"),
        (
            ["--train_dir", "{images}", "--image_column", "picture"],
            "--image_column 'picture' is not a column",
        ),
        (["--train_dir", "{images}", "--label_column", "klass"], "--label_column 'klass' is not a column"),
        (["--train_dir", "{images}", "--total_batch_size", "64"], "fewer than one global batch of 64"),
        (["--dataset_name", "{no_images}"], "cannot tell which column holds the images"),
    ],
)
def test_unusable_datasets_are_refused_before_training(
    flags, message, image_folder, no_image_dataset, tmp_path
):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "images": image_folder, "no_images": no_image_dataset}
    flags = [flag.format(**paths) for flag in flags]
    text = refusal([*FAST, *flags, "--output_dir", str(tmp_path / "run")])
    assert message in text and "\n" not in text
    assert not (tmp_path / "run" / "training_args.json").exists()  # refused before the model was built


@pytest.mark.parametrize(
    ("skip", "message"),
    [(False, "unsupported image value of type int"), (True, "no image of the training split could be read")],
)
def test_a_column_without_images_fails_instead_of_looping(skip, message, image_folder, tmp_path):
    flags = [*FAST, "--train_dir", str(image_folder), "--image_column", "label", "--max_train_steps", "2"]
    text = refusal([*flags, *(["--skip_bad_images"] if skip else []), "--output_dir", str(tmp_path / "run")])
    assert message in text and "\n" not in text


# ------------------------------------------------------------------------------------------------- labels


def test_labels_are_matched_by_class_name_and_missing_ones_marked():
    train_split = Dataset.from_dict(
        {"label": [0, 1, 2]}, features=Features({"label": ClassLabel(names=["cat", "dog", "fox"])})
    )
    names = class_names(train_split, "label")
    reordered = Dataset.from_dict(
        {"label": [0, 1, -1, None]}, features=Features({"label": ClassLabel(names=["dog", "cat"])})
    )
    assert class_indices(reordered, "label", names, "test") == [1, 0, -1, -1]
    strings = Dataset.from_dict({"label": ["b", "a", None]})
    assert class_names(strings, "label") == ["a", "b"]
    assert class_indices(strings, "label", ["a", "b"], "train") == [1, 0, -1]


@pytest.mark.parametrize(
    ("column", "feature", "message"),
    [
        ([0, 1], ClassLabel(names=["dog", "bird"]), "classes ['bird'] that the training split does not have"),
        ([0, 5], Value("int64"), "labels [5] outside the 3 classes"),
        (["cat", "emu"], Value("string"), "classes ['emu']"),
    ],
)
def test_labels_the_training_split_lacks_are_refused(column, feature, message):
    held_out = Dataset.from_dict({"label": column}, features=Features({"label": feature}))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        class_indices(held_out, "label", ["cat", "dog", "fox"], "test")


def write_labelled_parquet(folder: Path, labels: dict[str, list]) -> Path:
    """A dataset folder with one parquet file per split and string labels; every image of a class (and
    every unlabelled one) is the same random 32x32 PNG, in every split."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    features = Features({"image": ImageFeature(), "label": Value("string")})
    classes = sorted({label for column in labels.values() for label in column}, key=str)
    image = {label: png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for label in classes}
    for split, column in labels.items():
        images = [{"bytes": image[label], "path": None} for label in column]
        Dataset.from_dict({"image": images, "label": column}, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )
    return folder


def test_evaluation_leaves_out_unlabelled_images_and_converts_string_labels(tmp_path, caplog):
    data = write_labelled_parquet(
        tmp_path / "data", {"train": ["cat", "dog"] * 16, "test": ["dog", None] * 8}
    )
    flags = [*FAST, "--dataset_name", str(data), "--max_train_steps", "1", "--do_eval", "--no-eval_baselines"]
    results = train.main([*flags, "--output_dir", str(tmp_path / "run")])
    # Each test 'dog' is a copy of the training dogs, so both protocols call it a dog: 100%, where counting
    # the 8 unlabelled images would give 50% and a label mix-up between the splits 0%.
    assert results["knn_top1"] == 100.0 and results["linear_top1"] == 100.0
    assert "8 images of the 'test' split have no label" in caplog.text


def test_a_validation_split_with_foreign_classes_turns_the_evaluation_off(tmp_path, caplog):
    data = write_labelled_parquet(
        tmp_path / "data", {"train": ["cat", "dog"] * 16, "test": ["cat", "emu"] * 4}
    )
    args = train.parse_args([*FAST, "--dataset_name", str(data), "--per_device_train_batch_size", "16"])
    *_, eval_rows, _ = train.build_dataloaders(args, Accelerator(cpu=True))
    assert eval_rows is None
    assert "classes ['emu'] that the training split does not have" in caplog.text


# ---------------------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--momentum", "-0.9"], "--momentum, --warmup_start_lr and --seed must be >= 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--time_budget_minutes", "0"], "--time_budget_minutes must be > 0"),
        (["--total_batch_size", "1"], "a batch needs at least 2 images"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be a positive integer"),
        (["--backbone_kwargs", "[1]"], "--backbone_kwargs must be a JSON object"),
        (["--backbone_kwargs", '{"no_such_argument": 1}'], "are not accepted by 'resnet10t'"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "is not a complete checkpoint"),
        (["--push_to_hub", "--hub_model_id", "not a repo id"], "is not a repository id"),
        (["--push_to_hub", "--hub_model_id", "org/name"], "HF_HUB_OFFLINE is set"),
        pytest.param(
            ["--report_to", "wandb"],
            "needs `pip install wandb`",
            marks=pytest.mark.skipif(is_wandb_available(), reason="wandb is installed"),
        ),
    ],
)
def test_more_bad_flags_are_refused_before_loading_data(flags, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        train.parse_args(flags)


def test_push_without_a_token_is_refused_before_training(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit, match="needs a Hub token with write access"):
        train.parse_args(["--push_to_hub", "--hub_model_id", "org/name"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha: [1,\n", "is not valid YAML"),
        ("total_batch_size: many\n", "argument --total_batch_size: invalid int value: 'many'"),
        ("optimizer: adam\n", "argument --optimizer: invalid choice: 'adam'"),
        ("image_mean: [0.5, 0.5]\n", "argument --image_mean: expected 3 arguments"),
    ],
)
def test_config_file_values_are_checked_like_flags(text, message, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as raised:
        train.parse_args(["--config", str(config)])
    assert str(raised.value).startswith(f"error: --config {config}") and message in str(raised.value)


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_3" / "trainer_state.json").write_text("{}")
    assert "--resume_from_checkpoint latest" in refusal([*FAST, "--output_dir", str(tmp_path)])


def test_a_batch_of_one_image_per_process_is_refused(tmp_path):
    flags = ["--total_batch_size", "4", "--gradient_accumulation_steps", "4", "--output_dir", str(tmp_path)]
    assert "each process's batch is 1 image(s)" in refusal([*FAST, *flags])


# ------------------------------------------------------------------------------------- numerical faults


def finite(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in weights(checkpoint).values() if t.is_floating_point())


def test_divergence_stops_at_the_last_good_step_and_a_lower_lr_resumes(tmp_path):
    # A real divergence: the warmup reaches lr ~1e28 at step 2, and step 3's projections overflow.
    out = tmp_path / "run"
    flags = [*FAST, "--max_train_steps", "6", "--checkpointing_steps", "1", "--output_dir", str(out)]
    message = refusal([*flags, "--learning_rate", "1e30", "--warmup_epochs", "1"])
    assert message.startswith("error: numerical fault at step 3: CorInfoMax loss at update 3: non-finite")
    assert f"saved in {out / 'checkpoints' / 'step_2'}" in message
    assert f"resume from {out / 'checkpoints' / 'step_1'} with a lower --learning_rate" in message
    assert finite(out / "checkpoints" / "step_1") and finite(out / "checkpoints" / "step_2")

    resume = ["--resume_from_checkpoint", str(out / "checkpoints" / "step_1")]
    results = train.main([*flags, *resume, "--learning_rate", "0.05", "--warmup_epochs", "0"])
    assert results["global_step"] == 6 and finite(out)
    assert (out / "checkpoints" / "abandoned-step_2").is_dir()  # never resumed from by 'latest'
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["lr"] < 0.01 for r in log[1:])


def test_an_update_to_non_finite_weights_is_never_saved(tmp_path):
    out = tmp_path / "run"
    flags = [*FAST, "--max_train_steps", "6", "--checkpointing_steps", "1", "--output_dir", str(out)]
    # One warmup step at a small lr, then lr = 3e38 (float32's largest is 3.4e38): lr * grad overflows.
    lr = ["--learning_rate", "3e38", "--lr_reference_batch_size", "16", "--warmup_epochs", "0.25"]
    message = refusal([*flags, *lr])
    assert message.startswith("error: numerical fault at step 2: the update made the weights non-finite")
    assert f"Resume from the newest checkpoint, {out / 'checkpoints' / 'step_1'}" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]


@pytest.fixture
def one_nan_batch(monkeypatch):
    """Step 2's first view reaches the backbone as NaN, once (as an fp16 overflow would): its BatchNorm
    statistics and projections turn NaN."""
    real, calls = BatchViewAugment.forward, []

    def forward(self, images, *args, **kwargs):
        calls.append(len(images))
        views = real(self, images, *args, **kwargs)
        return torch.full_like(views, float("nan")) if len(calls) == 3 else views

    monkeypatch.setattr(BatchViewAugment, "forward", forward)


def test_a_fault_checkpoints_the_last_completed_step_and_the_run_resumes(
    tmp_path, one_nan_batch, monkeypatch
):
    out = tmp_path / "run"
    flags = [*FAST, "--max_train_steps", "4", "--output_dir", str(out)]
    message = refusal(flags)
    assert message.startswith(
        "error: numerical fault at step 2: CorInfoMax loss at update 2: non-finite projections"
    )
    assert "resume from it with --on_nan skip" in message
    assert latest_checkpoint(out) == out / "checkpoints" / "step_1" and finite(out / "checkpoints" / "step_1")

    monkeypatch.undo()  # the fault is gone: the resumed run continues from step 1
    results = train.main([*flags, "--resume_from_checkpoint", "latest", "--on_nan", "skip"])
    assert results["global_step"] == 4 and results["skipped_steps"] == 0


def test_on_nan_skip_skips_and_counts_faulty_steps(tmp_path, one_nan_batch, caplog):
    out = tmp_path / "run"
    results = train.main([*FAST, "--max_train_steps", "4", "--on_nan", "skip", "--output_dir", str(out)])
    assert results["global_step"] == 4 and results["skipped_steps"] == 1
    assert json.loads((out / "eval_results.json").read_text())["skipped_steps"] == 1
    assert "step 2:" in caplog.text and "skipped (1 so far)" in caplog.text
    assert "step 2: CorInfoMax loss at update 2: non-finite projections" in caplog.text  # the loss's message
    assert finite(out)  # the skipped step's NaN BatchNorm statistics were undone


def test_on_nan_skip_gives_up_on_a_diverged_run(tmp_path):
    flags = ["--learning_rate", "1e30", "--warmup_epochs", "1", "--on_nan", "skip", "--max_train_steps", "20"]
    message = refusal([*FAST, *flags, "--output_dir", str(tmp_path / "run")])
    assert "after 10 skipped steps in a row" in message and "The weights have diverged" in message


# ----------------------------------------------------------------------------------------------- the disk


def check_the_previous_checkpoint_survived_a_full_disk(out: Path, message: str) -> None:
    assert message.startswith(f"error: could not write checkpoint {out / 'checkpoints' / 'step_2'}")
    assert "No space left on device" in message and "The previous checkpoints are intact" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]  # no half-written step_2
    assert latest_checkpoint(out) == out / "checkpoints" / "step_1" and finite(out / "checkpoints" / "step_1")


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: a partial file, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    out = tmp_path / "run"
    message = refusal(
        [*FAST, "--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(out)]
    )
    check_the_previous_checkpoint_survived_a_full_disk(out, message)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs: room for one checkpoint of FAST's model (3 MB), not two. Needs root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tiny_disk):
    # torch.save and safetensors report ENOSPC as RuntimeError and SafetensorError, not OSError.
    out = tiny_disk / "run"
    message = refusal(
        [*FAST, "--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(out)]
    )
    check_the_previous_checkpoint_survived_a_full_disk(out, message)


# ---------------------------------------------------------------------------------------- interruptions

# After a 4-step warm-up the rate stays at its peak (--min_lr = the peak rate): the schedule of a step does
# not depend on --max_train_steps, so the runs that get killed can be given UNFINISHABLE steps (no machine
# ends them before the signal) and still follow the 12-step run step for step.
KILLED = [*FAST, "--max_train_steps", "12", "--checkpointing_steps", "1", "--save_total_limit", "2",
          "--dataloader_num_workers", "1", "--warmup_epochs", "1", "--learning_rate", "0.03125",
          "--lr_reference_batch_size", "16", "--min_lr", "0.03125"]  # fmt: skip
UNFINISHABLE = ["--max_train_steps", "10000"]


def writing(out: Path) -> int:
    """The step of the checkpoint being written (a .tmp-step_N folder), or -1."""
    return max((int(p.name.split("_")[1]) for p in (out / "checkpoints").glob(".tmp-step_*")), default=-1)


def newest_step(out: Path) -> int:
    newest = latest_checkpoint(out)
    return int(newest.name[5:]) if newest else 0


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """An uninterrupted 12-step run, and the same run killed three times and resumed each time: kill -9
    once a checkpoint of a random step is complete, kill -9 during a checkpoint write, SIGTERM to the whole
    process group (DataLoader worker included, as a cluster scheduler or a terminal's Ctrl-C sends it);
    then resumed to step 12 with a fake Hub token and TensorBoard. Each signal is sent when the run has
    written the checkpoint it waits for, and the killed runs are too long to end first."""
    root, rng = tmp_path_factory.mktemp("interrupted"), random.Random(0)
    straight, out, report = root / "straight", root / "resumed", {}
    train.main([*KILLED, "--output_dir", str(straight)])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def start(resume: bool) -> TrainInBackground:
        flags = ["--resume_from_checkpoint", "latest"] if resume else []
        return TrainInBackground([*KILLED, *UNFINISHABLE, *flags, "--output_dir", str(out)])

    with start(resume=False) as run:  # 1: kill -9 once the checkpoint of step 2, 3 or 4 is complete
        step = rng.choice([2, 3, 4])
        run.wait_until(lambda: newest_step(out) >= step, f"checkpoint of step {step}")
        run.send(signal.SIGKILL)
        assert run.finish()[0] == -signal.SIGKILL

    with start(resume=True) as run:  # 2: kill -9 while a checkpoint is being written
        first = newest_step(out)  # (kill 1 may have left .tmp-step_<first + 1>: wait for a later write)
        while True:
            run.wait_until(lambda: writing(out) > first + 1, f"a checkpoint write after step {first + 1}")
            run.send(signal.SIGSTOP)
            if writing(out) > first + 1:
                break
            run.send(signal.SIGCONT)  # the write ended meanwhile: catch the next one
        run.send(signal.SIGKILL)
        assert run.finish()[0] == -signal.SIGKILL
        report["second_output"] = run.output()
    latest = latest_checkpoint(out)
    report["left_after_kill"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    report["latest_after_kill"] = {"files": {p.name for p in latest.iterdir()}, "finite": finite(latest)}

    with start(resume=True) as run:  # 3: SIGTERM to the process group: the worker must not die first
        first = newest_step(out)
        run.wait_until(lambda: newest_step(out) > first, f"a checkpoint after step {first}")
        # Meanwhile a second run on the same folder is refused at once, naming the running one. The running
        # one is held still (SIGSTOP: alive, holding its lock) while the second starts, which takes seconds
        # on a loaded machine: running on, it could pass step 12 before the SIGTERM below.
        run.send(signal.SIGSTOP)
        second = run_train([*KILLED, "--resume_from_checkpoint", "latest", "--output_dir", str(out)])
        report["second_run"], report["running_pid"] = (second.returncode, second.stderr), run.proc.pid
        run.send(signal.SIGCONT)
        run.send(signal.SIGTERM)
        report["sigterm_returncode"], report["sigterm_output"] = run.finish()
    report["stopped_at"] = newest_step(out)

    final = run_train([*KILLED, "--resume_from_checkpoint", "latest", "--output_dir", str(out),
                       "--hub_token", FAKE_TOKEN, "--report_to", "tensorboard"])  # fmt: skip
    assert final.returncode == 0, final.stderr[-3000:]
    report.update(straight=straight, out=out, final_output=final.stdout + final.stderr)
    return report


def test_one_run_per_output_dir_and_a_killed_runs_lock_is_taken_over(interrupted):
    returncode, stderr = interrupted["second_run"]
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert returncode == 1 and "is in use by a running run" in line
    assert f"pid {interrupted['running_pid']} on host {socket.gethostname()}" in line
    # Each resume after a kill -9 took the dead run's lock over by itself; the finished run removed its own.
    for output in (interrupted["second_output"], interrupted["sigterm_output"]):
        assert "took over the lock of a run that is gone" in output
    assert (
        not (interrupted["out"] / ".run.lock").exists()
        and not (interrupted["straight"] / ".run.lock").exists()
    )


def test_killed_and_resumed_run_ends_with_the_same_weights(interrupted):
    assert_same_weights(interrupted["straight"], interrupted["out"])
    log = json.loads((interrupted["out"] / "training_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 13))


def test_a_kill_during_a_checkpoint_write_leaves_complete_checkpoints(interrupted):
    assert any(name.startswith(".tmp-step_") for name in interrupted["left_after_kill"])
    latest = interrupted["latest_after_kill"]  # what --resume_from_checkpoint latest then picked
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= latest["files"] and latest[
        "finite"
    ]
    left = sorted(p.name for p in (interrupted["out"] / "checkpoints").iterdir())
    assert left == ["step_11", "step_12"]  # the resumed run removed what the kill left half-written
    assert not (interrupted["out"] / MODEL_STAGING).exists()


def test_sigterm_to_the_process_group_checkpoints_and_exits_cleanly(interrupted):
    output = interrupted["sigterm_output"]
    assert interrupted["sigterm_returncode"] == 0, output[-3000:]
    saved = interrupted["out"] / "checkpoints" / f"step_{interrupted['stopped_at']}"
    assert f"received SIGTERM: saved {saved}" in output and "Traceback" not in output
    assert interrupted["stopped_at"] < 12  # long before the end of the run


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
    stop = StopSignal()
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == signal.SIGINT  # the loop saves a checkpoint after this step, then exits
    with pytest.raises(Interrupted, match="SIGINT again: stopped at once"):
        os.kill(os.getpid(), signal.SIGINT)


def test_save_total_limit_keeps_the_newest_checkpoints(interrupted):
    assert sorted(p.name for p in (interrupted["straight"] / "checkpoints").iterdir()) == [
        "step_11",
        "step_12",
    ]


# ------------------------------------------------------------------------------------------------ security


def test_the_hub_token_never_reaches_files_or_logs(interrupted):
    assert FAKE_TOKEN not in interrupted["final_output"]
    for path in interrupted["out"].rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert any(interrupted["out"].rglob("events.out.tfevents.*"))  # the tracker's files were checked too


class WritesAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, about our planted pickle
@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("random_states_0.pkl", None),  # loaded with weights_only=True, and optional: ignored
        ("optimizer.bin", "UnpicklingError"),  # loaded with weights_only=True
        ("custom_checkpoint_0.pkl", "RuntimeError: Number of custom checkpoints"),  # never loaded
    ],
)
def test_resuming_never_runs_code_from_checkpoint_files(name, refused, interrupted, tmp_path):
    # Accelerate unpickles registered objects (custom_checkpoint_N.pkl) with weights_only=False; train.py
    # registers none, so a planted one is refused before anything is loaded.
    checkpoint = tmp_path / "checkpoints" / "step_12"
    shutil.copytree(interrupted["straight"] / "checkpoints" / "step_12", checkpoint)
    marker = tmp_path / "code-ran"
    (checkpoint / name).write_bytes(pickle.dumps(WritesAFileWhenUnpickled(marker)))
    flags = [*KILLED, "--dataloader_num_workers", "0", "--resume_from_checkpoint", str(checkpoint)]
    if refused is None:
        assert train.main([*flags, "--output_dir", str(tmp_path / "run")])["global_step"] == 12
    else:
        message = refusal([*flags, "--output_dir", str(tmp_path / "run")])
        assert message.startswith(f"error: cannot resume from {checkpoint} ({refused}")
    assert not marker.exists()


def test_a_run_lock_is_stale_when_its_process_is_gone_or_its_host_stopped_touching_it(tmp_path):
    import psutil  # noqa: PLC0415

    from modeling_corinfomax.checkpointing import RunLock  # noqa: PLC0415

    path, host = tmp_path / RunLock.NAME, socket.gethostname()

    def held_by(**holder) -> str | None:
        path.write_text(json.dumps(holder))
        lock = RunLock(tmp_path)
        refusal = lock.acquire()
        lock.release()
        return refusal

    sleeper = subprocess.Popen(["sleep", "60"])
    alive = {"host": host, "pid": sleeper.pid, "started": psutil.Process(sleeper.pid).create_time()}
    assert f"in use by a running run (pid {sleeper.pid} on host {host}" in held_by(**alive)
    assert held_by(**{**alive, "started": alive["started"] - 3600}) is None  # the pid was reused since
    sleeper.kill()
    sleeper.wait()
    assert held_by(**alive) is None and not path.exists()  # gone: taken over, then released
    assert "in use" in held_by(host="another-node", pid=1, started=0.0)  # touched just now
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "started": 0.0}))
    old = time.time() - RunLock.STALE_SECONDS - 5
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and lock.holder() == lock.me  # a lost node's lock
    lock.release()
