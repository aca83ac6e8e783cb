"""The training resolution from the images' sizes (data/resolution.py) and train.py's use of it."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from helpers import run_train
from PIL import Image

from modeling_corinfomax.cli import train
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
