"""The training resolution from the images' sizes (data/resolution.py) and train.py's use of it."""

from __future__ import annotations

import json
import logging
import time
import types

import datasets
import numpy as np
import pytest
import torch
from helpers import run_train
from PIL import Image

from modeling_corinfomax.cli import train
from modeling_corinfomax.cli.train_args import set_image_size
from modeling_corinfomax.data import DataError, choose_resolution, load_image_dataset, resolution_for


def write_folder(root, sizes, fmt="jpg", classes=2):
    """An image folder (class sub-folders) of noise images of the given (width, height) sizes."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.{fmt}")
    return root


def test_the_rule_on_sizes():
    photos = [(300 + 7 * i, 150 + 5 * i) for i in range(40)]  # short sides 150-345, median 247
    assert resolution_for(photos) == 224  # photos: the photo resolution, whatever their spread
    assert resolution_for([(640, 480)] * 3 + [(100, 90)]) == 224  # the median, not the smallest
    assert resolution_for([(28, 28)]) == 40  # tiny: upsampled until the last stage keeps a 2x2 map
    assert resolution_for([(32, 32)]) == 40
    assert resolution_for([(32, 32)], cifar_stem=True) == 32  # the CIFAR stem keeps a 4x4 map at 32 px
    assert resolution_for([(64, 64)]) == 64 and resolution_for([(96, 128)]) == 96  # in between: as they are
    assert resolution_for([(64, 64), (128, 128)]) == 96  # mixed: the median short side


def test_sizes_come_from_headers_of_a_folder_and_a_stream(tmp_path):
    sizes = [(260 + 13 * i, 230 + 11 * i) for i in range(12)]
    write_folder(tmp_path / "photos", sizes)
    for streaming in (False, True):
        split = load_image_dataset(train_dir=str(tmp_path / "photos"), streaming=streaming)
        choice = choose_resolution(split, "image", n=64)
        assert sorted(choice.sizes) == sorted(sizes) and choice.image_size == 224, streaming
        assert "12 sampled images" in choice.describe() and "-> image_size 224" in choice.describe()
    bundled = choose_resolution(load_image_dataset(split="train"), "image")
    assert bundled.image_size == 40 and len(bundled.sizes) == 64
    assert "all 28x28 px -> image_size 40" in bundled.describe()


def test_a_sample_is_spread_over_the_split_and_unreadable_images_are_counted(tmp_path):
    rows = [{"image": {"bytes": b"not an image", "path": None}}] * 3
    buf = tmp_path / "a.png"
    Image.new("RGB", (50, 70)).save(buf)
    rows += [{"image": {"bytes": buf.read_bytes(), "path": None}}] * 5
    split = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    choice = choose_resolution(split, "image", n=4)  # rows 0, 2 (unreadable), 5, 7
    assert choice.unreadable == 2 and choice.sizes == ((50, 70),) * 2 and choice.image_size == 50
    broken = datasets.Dataset.from_list(rows[:3]).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match="set --image_size"):
        choose_resolution(broken, "image")


def test_a_flag_a_config_and_a_preset_win_over_the_rule(tmp_path):
    folder = ["--train_dir", str(tmp_path)]
    assert train.parse_args(folder).image_size is None  # decided once the images are read
    assert train.parse_args([*folder, "--image_size", "96"]).image_size == 96
    config = tmp_path / "c.yaml"
    config.write_text("image_size: 48\n")
    assert train.parse_args([*folder, "--config", str(config)]).image_size == 48
    assert train.parse_args(["--preset", "cifar10", *folder]).image_size == 32
    assert train.parse_args(["--preset", "tiny-imagenet", *folder]).image_size == 64


@pytest.mark.parametrize("streaming", [False, True])
def test_train_py_on_photos_trains_and_saves_at_the_photo_resolution(tmp_path, streaming):
    photos = write_folder(tmp_path / "photos", [(220 + 9 * i, 180 + 17 * i) for i in range(8)])
    out = tmp_path / "out"
    flags = ["--train_dir", str(photos), "--output_dir", str(out), "--max_train_steps", "1"]
    flags += ["--total_batch_size", "4", "--projector_dims", "32", "32", "8", "--rankme_samples", "0"]
    flags += ["--dataloader_num_workers", "0", "--no-do_eval", "--report_to", "none"]
    result = run_train([*flags, *(["--streaming"] if streaming else [])])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert (
        "image size from the data: 8 sampled images: 220-283 x 180-299 px (median short side 239.5) -> "
        "image_size 224" in log
    )
    config = json.loads((out / "config.json").read_text())
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert config["image_size"] == 224 and processor["crop_size"] == {"height": 224, "width": 224}
    assert json.loads((out / "training_args.json").read_text())["image_size"] == 224


def budget_args(image_size, minutes, batch=64, flags=()):
    args = train.parse_args(["--train_dir", "unused", "--image_size", str(image_size), *flags])
    args.time_budget_minutes, args.per_device_train_batch_size = minutes, batch
    return args


def test_a_time_budget_lowers_a_photo_resolution_to_buy_enough_steps(monkeypatch, caplog):
    from accelerate import Accelerator

    from modeling_corinfomax.cli import train_data

    timed = []

    def seconds_per_step(model, batch_size, accelerator, channels_last=False):  # 1 us per image-pixel
        timed.append((model.config.image_size, batch_size))
        return 2 * batch_size * model.config.image_size**2 * 1e-6

    monkeypatch.setattr(train_data, "seconds_per_step", seconds_per_step)
    accelerator, started = Accelerator(cpu=True), time.time()
    args = budget_args(224, minutes=9)  # 459 s for training: 224 px at 6.4 s/step buys 71 steps
    with caplog.at_level(logging.INFO, logger="corinfomax.train"):
        train_data.fit_resolution_to_budget(args, accelerator, started)
    size = args.image_size
    steps = int(459 // (128 * size**2 * 1e-6))
    assert timed[0] == (224, train_data.PROBE_BATCH)  # timed on 16 images, scaled to the batch of 64
    assert steps >= train_data.BUDGET_MIN_STEPS > int(459 // (128 * (size + 8) ** 2 * 1e-6))  # the largest 8k
    assert size == 80 and args.model_config.image_size == 80 and timed[-1][0] == 80
    assert "a step at 224 px takes ~6.42 s here, ~71 steps" in caplog.text
    assert "trains at 80 px" in caplog.text and "--image_size N to choose" in caplog.text

    timed.clear()
    args = budget_args(224, minutes=600)  # a long budget: 224 px keeps its steps, nothing changes
    train_data.fit_resolution_to_budget(args, accelerator, started)
    assert args.image_size == 224 and [size for size, _ in timed] == [224]
    timed.clear()
    train_data.fit_resolution_to_budget(budget_args(224, None), accelerator, started)  # no budget
    assert timed == []
    args = budget_args(224, minutes=0.01)  # no time left at all: the floor
    train_data.fit_resolution_to_budget(args, accelerator, started)
    assert args.image_size == 40 and args.backbone == "resnet18"  # (this stub's steps cost the same in any)


def test_a_budget_too_short_even_at_the_floor_trains_the_smaller_backbone(monkeypatch, caplog):
    from accelerate import Accelerator

    from modeling_corinfomax.cli import train_data

    timed = []

    def seconds_per_step(model, batch_size, accelerator, channels_last=False):  # ResNet-10-T: half the cost
        timed.append((model.config.backbone, model.config.image_size))
        cost = 0.5 if model.config.backbone == "resnet10t" else 1.0
        return cost * 2 * batch_size * model.config.image_size**2 * 1e-6

    monkeypatch.setattr(train_data, "seconds_per_step", seconds_per_step)
    accelerator, started = Accelerator(cpu=True), time.time()
    args = budget_args(
        40, minutes=1
    )  # ~51 s for training: ~249 steps of ResNet-18 at 40 px, ~498 of ResNet-10-T
    with caplog.at_level(logging.INFO, logger="corinfomax.train"):
        train_data.fit_resolution_to_budget(args, accelerator, started)
    assert timed == [("resnet18", 40), ("resnet10t", 40)]
    assert args.backbone == args.model_config.backbone == "resnet10t" and args.image_size == 40
    assert "resnet18 at 40 px takes ~0.20 s/step here" in caplog.text
    assert (
        "trains resnet10t instead (~0.10 s/step" in caplog.text and "--backbone NAME to choose" in caplog.text
    )

    timed.clear()  # a photo resolution lowered to the floor is timed there once, not twice
    args = budget_args(224, minutes=1)
    train_data.fit_resolution_to_budget(args, accelerator, started)
    assert timed[-2:] == [("resnet18", 40), ("resnet10t", 40)] and args.backbone == "resnet10t"
    assert [t for t in timed if t == ("resnet18", 40)] == [("resnet18", 40)]

    timed.clear()  # a backbone someone chose stays, and a budget that buys enough steps changes nothing
    for args in (
        budget_args(40, 1, flags=["--backbone", "resnet18"]),
        budget_args(40, 1, flags=["--preset", "cifar10"]),
    ):
        train_data.fit_resolution_to_budget(args, accelerator, started)
        assert args.backbone == "resnet18"
    assert all(backbone == "resnet18" for backbone, _ in timed)  # (the preset's CIFAR stem lowers its size)
    timed.clear()
    args = budget_args(40, minutes=600)
    train_data.fit_resolution_to_budget(args, accelerator, started)
    assert timed == [("resnet18", 40)] and args.backbone == "resnet18"


def test_train_py_with_a_budget_on_photos_lowers_the_resolution_and_a_resumed_run_keeps_it(tmp_path):
    photos = write_folder(tmp_path / "photos", [(220 + 9 * i, 180 + 17 * i) for i in range(8)])
    out = tmp_path / "out"
    flags = ["--train_dir", str(photos), "--output_dir", str(out), "--total_batch_size", "4"]
    flags += ["--projector_dims", "32", "32", "8", "--rankme_samples", "0", "--checkpointing_steps", "1"]
    flags += ["--dataloader_num_workers", "0", "--no-do_eval", "--report_to", "none"]
    # A 12-second budget, most of it spent starting up: 224 px buys far fewer than 500 steps here.
    result = run_train([*flags, "--time_budget_minutes", "0.2", "--max_train_steps", "1"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "-> image_size 224" in log and "time budget 0.2 min: a step at 224 px takes" in log
    chosen = json.loads((out / "config.json").read_text())["image_size"]
    assert 40 <= chosen < 224 and f"trains at {chosen} px" in log
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"]["height"] == chosen
    # Even the floor buys far fewer than 500 steps in 12 s: the default ResNet-18 gives way to ResNet-10-T.
    assert "the budget's rule (at least 500 steps) trains resnet10t instead" in log
    assert json.loads((out / "config.json").read_text())["backbone"] == "resnet10t"
    resumed = run_train([*flags, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"image size {chosen} px, as the interrupted run chose" in resumed.stdout + resumed.stderr
    assert "backbone resnet10t, as the interrupted run chose" in resumed.stdout + resumed.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["backbone"]) == (chosen, "resnet10t")


def test_a_first_run_on_a_cpu_lowers_a_photo_resolution_until_its_planned_steps_fit(monkeypatch, caplog):
    from accelerate import Accelerator

    from modeling_corinfomax.cli import train_data

    timed = []

    def seconds_per_step(model, batch_size, accelerator, channels_last=False):  # 1 us per image-pixel
        timed.append(model.config.image_size)
        return 2 * batch_size * model.config.image_size**2 * 1e-6

    monkeypatch.setattr(train_data, "seconds_per_step", seconds_per_step)
    accelerator = Accelerator(cpu=True)

    def first_run(*flags):
        args = train.parse_args(["--train_dir", "unused", *flags])
        set_image_size(args, 224)  # as the data rule sets it
        args.per_device_train_batch_size = args.total_batch_size = 64
        return args

    args = first_run()  # 4,000 images: 62 steps an epoch x 8 epochs, at least 700 (min_train_steps)
    with caplog.at_level(logging.INFO, logger="corinfomax.train"):
        train_data.fit_resolution_to_cpu(args, accelerator, 4000)
    limit = train_data.CPU_FIRST_RUN_MINUTES * 60
    size = args.image_size
    assert (
        700 * 128 * size**2 * 1e-6 <= limit < 700 * 128 * (size + 8) ** 2 * 1e-6
    )  # the largest 8k that fits
    assert size == 96 and args.model_config.image_size == 96 and timed[0] == 224
    assert "a step at 224 px takes ~6.42 s: the planned 700 steps would take ~75 min" in caplog.text
    assert "this first run trains at 96 px" in caplog.text and "--image_size 224 keeps" in caplog.text

    timed.clear()
    for args in (first_run("--max_train_steps", "50"), first_run("--num_train_epochs", "2"),
                 first_run("--time_budget_minutes", "9")):  # fmt: skip
        train_data.fit_resolution_to_cpu(args, accelerator, 4000)  # a length or budget given: not a first run
        assert args.image_size == 224
    train_data.fit_resolution_to_cpu(first_run(), accelerator, None)  # a stream
    gpu = types.SimpleNamespace(device=torch.device("cuda"))
    train_data.fit_resolution_to_cpu(first_run(), gpu, 4000)  # a GPU keeps the photo resolution
    assert timed == []

    # A step that does not shrink with the pixels (a fixed cost per image, as on a slow CPU at small sizes):
    # the estimate from the pixel count overshoots, and the rule keeps timing until the steps fit or the
    # floor is reached (three timings once stopped at ~20 min of a 15-minute rule).
    def with_overhead(model, batch_size, accelerator, channels_last=False):
        timed.append(model.config.image_size)
        return batch_size * (2 * model.config.image_size**2 * 1e-6 + 0.012)

    monkeypatch.setattr(train_data, "seconds_per_step", with_overhead)
    args = first_run()
    train_data.fit_resolution_to_cpu(args, accelerator, 4000)
    seconds = 700 * 64 * (2 * args.image_size**2 * 1e-6 + 0.012)
    assert (
        timed == [224, 88, 72, 64, 56] and seconds <= limit and args.image_size == 56
    )  # 3 timings: 72 px, 17 min
    assert args.backbone == "resnet18"  # it fits: the default backbone stays

    # Photos on a slow CPU: even the floor (40 px) is over the 15 minutes, so the default ResNet-18 gives way
    # to ResNet-10-T (half the cost here); a backbone the user chose stays.
    def by_backbone(model, batch_size, accelerator, channels_last=False):
        timed.append((model.config.backbone, model.config.image_size))
        cost = 0.5 if model.config.backbone == "resnet10t" else 1.0
        return cost * batch_size * (2 * model.config.image_size**2 * 1e-6 + 0.03)

    monkeypatch.setattr(train_data, "seconds_per_step", by_backbone)
    timed.clear()
    args = first_run()
    with caplog.at_level(logging.INFO, logger="corinfomax.train"):
        train_data.fit_resolution_to_cpu(args, accelerator, 4000)
    assert args.image_size == 40 and args.backbone == args.model_config.backbone == "resnet10t"
    assert timed[-2:] == [("resnet18", 40), ("resnet10t", 40)]
    assert "so this first run trains resnet10t instead" in caplog.text
    args = first_run("--backbone", "resnet18")
    train_data.fit_resolution_to_cpu(args, accelerator, 4000)
    assert args.image_size == 40 and args.backbone == "resnet18"
