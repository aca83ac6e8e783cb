"""The README's first commands, run as users run them: `accelerate launch train.py ...` in a subprocess,
with no thread or precision flag, on a generated image folder and another `datasets` source.

What is asserted comes from the run's own outputs (log lines, training_args.json, training_log.json,
eval_results.json) and is checked against independent facts (the cores this process may use, the CPU's
flags in /proc/cpuinfo), not against train.py's helpers.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# Tiny versions of a user's run: the preset's recipe is kept, only the size of the network and batch shrink.
TINY = ["--backbone", "resnet10t", "--projector_dims", "64", "64", "16", "--total_batch_size", "16",
        "--logging_steps", "1"]  # fmt: skip


def bundled_rows(count: int, offset: int = 0) -> list[dict]:
    table = pq.read_table(REPO_ROOT / "modeling_corinfomax" / "demo_data" / "fashion_mnist" / "train.parquet")
    return table.slice(offset, count).to_pylist()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """`my_images/{train,test}/<class>/*.png`: 160 + 48 RGB 32x32 images, as a user's folder would be."""
    root = tmp_path_factory.mktemp("my_images")
    for split, rows in (("train", bundled_rows(160)), ("test", bundled_rows(48, 160))):
        for i, row in enumerate(rows):
            folder = root / split / f"class_{row['label']}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((32, 32))
            image.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def parquet_source(tmp_path_factory) -> Path:
    """A local `datasets` source (`--dataset_name <folder>`): train in two parquet files (two shards),
    test in one; columns `image` and `label`, unlike the cifar10 preset's `img`."""
    root = tmp_path_factory.mktemp("parquet_source")
    rows = bundled_rows(160)
    import pyarrow as pa

    for k, part in enumerate((rows[:80], rows[80:])):
        pq.write_table(pa.Table.from_pylist(part), root / f"train-0000{k}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(bundled_rows(48, 160)), root / "test-00000-of-00001.parquet")
    return root


def user_env() -> dict[str, str]:
    """A user's shell: offline, and no thread setting of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def launch(launcher_flags: list[str], flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch [launcher_flags] train.py [flags]`, from `cwd`."""
    return subprocess.run(
        [*ACCELERATE, *launcher_flags, str(REPO_ROOT / "train.py"), *flags],
        env=user_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def cpu_has_native_bf16() -> bool:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def test_preset_on_own_folder_keeps_the_recipe_and_uses_all_cores_at_the_fast_precision(
    image_folder, tmp_path
):
    out = tmp_path / "run"
    result = launch([], ["--preset", "cifar10", "--train_dir", str(image_folder), *TINY, "--max_train_steps", "2",
                         "--no-do_eval", "--output_dir", str(out)], tmp_path)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    args = json.loads((out / "training_args.json").read_text())
    # The folder replaces the preset's Hub dataset and its `img` column; the recipe stays.
    assert args["train_dir"] == str(image_folder) and args["dataset_name"] is None
    assert args["image_column"] is None and args["label_column"] is None  # resolved from the folder
    assert (args["alpha"], args["cifar_stem"], args["image_size"], args["lr_reference_batch_size"]) == (
        250.0, True, 32, 512,
    )  # fmt: skip
    assert args["image_mean"] == [0.4914, 0.4822, 0.4465] and args["warmup_epochs"] == 10
    cores = len(os.sched_getaffinity(0))
    assert f"CPU threads: {cores} per process ({cores} cores / 1 process(es) on this machine" in log
    assert "host memory: each batch reuses the memory the previous one freed" in log
    precision = "bf16 autocast (auto" if cpu_has_native_bf16() else "fp32 (auto"
    assert f"precision: {precision}" in log
    assert args["mixed_precision"] == ("bf16" if cpu_has_native_bf16() else "no")


def test_preset_on_another_datasets_source_and_explicit_launcher_settings_win(parquet_source, tmp_path):
    out = tmp_path / "run"
    result = launch(
        ["--num_cpu_threads_per_process", "1", "--mixed_precision", "bf16"],
        ["--preset", "cifar10", "--dataset_name", str(parquet_source), *TINY, "--max_train_steps", "1",
         "--do_eval", "--no-eval_baselines", "--no-reuse_host_memory", "--output_dir", str(out)],
        tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "CPU threads: 1 per process (the launcher's --num_cpu_threads_per_process" in log
    assert "host memory:" not in log  # the system's allocator, as asked
    assert "precision: bf16 autocast (accelerate launch/config mixed_precision=bf16" in log
    results = json.loads((out / "eval_results.json").read_text())
    assert results["dataset"]["name"] == str(parquet_source) and results["dataset"]["split"] == "test"
    assert "knn_top1" in results  # the labels of the new source were found (`label`, not the preset's)


def test_continued_pretraining_starts_from_exactly_the_checkpoint(pretrained, image_folder, tmp_path):
    # A preset's recipe on the user's folder, from a CorInfoMax model and its loss state. At a learning rate
    # of ~0 the one step leaves every parameter where it started, so the saved ones are the checkpoint's.
    source, path = pretrained
    out = tmp_path / "run"
    result = launch([], ["--preset", "cifar10", "--train_dir", str(image_folder), "--model_name_or_path", str(path),
                         "--resume_loss_state", "--total_batch_size", "16", "--max_train_steps", "1",
                         "--learning_rate", "1e-30", "--warmup_start_lr", "0", "--min_lr", "0", "--no-do_eval",
                         "--output_dir", str(out)], tmp_path)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert (
        f"starting from {path} (a CorInfoMax model, resnet10t with the CIFAR stem): backbone, projector"
        in log
    )
    saved = load_file(out / "model.safetensors")
    expected = {f"corinfomax.{name}": p for name, p in source.corinfomax.named_parameters()}
    assert all(torch.equal(saved[name], p) for name, p in expected.items())
    assert int(saved["loss_fn.num_updates"]) == int(source.loss_fn.num_updates) + 1  # went on from its state
    args = json.loads((out / "training_args.json").read_text())
    assert (args["backbone"], args["alpha"], args["model_name_or_path"]) == ("resnet10t", 250.0, str(path))


def test_a_time_budget_sizes_the_run_and_ends_at_the_minimum_lr(image_folder, tmp_path):
    # With the final evaluation on, as the demo runs: the budget reserves its time (this once crashed).
    out, minutes, started = tmp_path / "run", 0.6, time.time()
    result = launch([], ["--train_dir", str(image_folder), *TINY, "--time_budget_minutes", str(minutes),
                         "--no-eval_baselines", "--output_dir", str(out)], tmp_path)  # fmt: skip
    wall = time.time() - started
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    fits = re.findall(
        r"time budget 0\.6 min: [\d.]+ s/step measured over (\d+) steps, .* -> (\d+) steps", log
    )
    assert fits and fits[0][0] == "20", log[-3000:]  # first fitted on 20 timed steps, then refitted
    steps = int(fits[-1][1])
    history = json.loads((out / "training_log.json").read_text())
    results = json.loads((out / "eval_results.json").read_text())
    assert results["global_step"] == steps == history[-1]["step"] > 23  # fitted after 23 timed steps
    assert history[-1]["lr"] == pytest.approx(1e-6)  # the cosine reaches --min_lr on the last step
    assert max(h["lr"] for h in history) > 0.01  # and the run did warm up first
    assert (
        0.4 * minutes * 60 < results["train_runtime_seconds"] < minutes * 60
    )  # less the evaluation's reserve
    assert wall < minutes * 60 + 15, wall  # training, evaluation and saving fit (+ the launcher's start-up)


def test_decode_on_device_trains_from_jpeg_bytes_with_workers(tmp_path):
    # JPEGs of mixed sizes (no image cache) and one PNG that the workers crop themselves, two workers.
    folder = tmp_path / "jpegs" / "train" / "things"
    folder.mkdir(parents=True)
    for i, row in enumerate(bundled_rows(40)):
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((40 + i, 48))
        image.save(folder / (f"{i}.png" if i == 3 else f"{i}.jpg"))
    out = tmp_path / "run"
    result = launch([], ["--train_dir", str(tmp_path / "jpegs"), "--decode_on_device", "--dataloader_num_workers",
                         "2", *TINY, "--image_size", "32", "--max_train_steps", "3", "--no-do_eval", "--output_dir",
                         str(out)], tmp_path)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "--decode_on_device: workers read JPEG bytes; the CPU decodes and crops each batch" in log
    assert "decoding and cropping per image in 2 worker(s)" in log
    assert json.loads((out / "eval_results.json").read_text())["global_step"] == 3


def test_streaming_with_two_workers_reads_the_whole_stream(parquet_source, tmp_path):
    out = tmp_path / "run"
    result = launch([], ["--dataset_name", str(parquet_source), "--streaming", "--dataloader_num_workers", "2",
                         *TINY, "--max_train_steps", "12", "--no-do_eval", "--output_dir", str(out)],
                    tmp_path)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    # 160 rows in two shards, one per worker, 80 = 5 batches of 16 each: the pass has all 10 batches.
    assert "pass 1 over the stream: 10 batches" in log


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--preset", "cifar10", "--train_dir", "/no/such/folder"],
            "error: --train_dir '/no/such/folder' is not",
        ),
        (["--learning_rat", "0.1"], "error: unrecognized arguments: --learning_rat 0.1"),  # no abbreviations
    ],
)
def test_refusals_are_one_line_without_a_traceback(flags, message, tmp_path):
    result = launch(["-q"], flags, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), log[-2000:]
    assert "Traceback" not in log


def test_accelerate_launch_eval_uses_every_core_and_keeps_host_memory(pretrained, tmp_path):
    # The README's `accelerate launch eval.py --model_name_or_path ...`: the launcher's OMP_NUM_THREADS=1 is its
    # default, not the user's request, so eval.py (like train.py) replaces it with the cores here.
    _, checkpoint = pretrained
    result = subprocess.run(
        [*ACCELERATE, str(REPO_ROOT / "eval.py"), "--model_name_or_path", str(checkpoint), "--max_train_samples",
         "100", "--max_eval_samples", "50", "--output_dir", str(tmp_path / "eval")],
        env=user_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f"CPU threads: {cores} per process ({cores} cores / 1 process(es) on this machine" in log
    assert "host memory: each batch reuses the memory the previous one freed" in log
    assert "knn_top1" in json.loads((tmp_path / "eval" / "eval_results.json").read_text())
