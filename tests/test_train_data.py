"""The data train.py builds: when it decodes the training split once (`--image_cache`) and when it
falls back or refuses, its evaluation splits cached on first use, and the CPU threads it runs with."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers import SMALL
from PIL import Image

from modeling_corinfomax.cli import train
from modeling_corinfomax.data import ExampleCollator, ImageViewDataset, InMemoryEvalDataset
from modeling_corinfomax.run_evaluation import EvalData, eval_split


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        side = 32 if i % 4 else 40
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_train_uses_the_cache_when_it_can_and_falls_back_or_refuses_when_not(mixed_sizes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="corinfomax.train")
    # (one AcceleratorState per process: the same precision as the other in-process runs of the suite)
    flags = [*SMALL, "--max_train_steps", "1", "--image_size", "32", "--mixed_precision", "no"]
    flags = [f for f in flags if f not in ("--max_train_samples", "256")]
    results = train.main([*flags, "--train_dir", str(mixed_sizes), "--output_dir", str(tmp_path / "a")])
    assert results["global_step"] == 1
    assert any("images differ in size" in r.getMessage() for r in caplog.records)  # fell back, and said so
    with pytest.raises(SystemExit, match="--image_cache on: images differ in size.*--image_cache auto"):
        train.main(
            [
                *flags,
                "--train_dir",
                str(mixed_sizes),
                "--image_cache",
                "on",
                "--output_dir",
                str(tmp_path / "b"),
            ]
        )
    caplog.clear()
    results = train.main(
        [*flags, "--max_train_samples", "256", "--output_dir", str(tmp_path / "c")]
    )  # bundled
    assert results["global_step"] == 1
    assert any("crops are made a batch at a time" in r.getMessage() for r in caplog.records)


def test_bad_image_cache_flags_are_refused():
    with pytest.raises(SystemExit, match="--image_cache_max_gb must be > 0"):
        train.parse_args(["--image_cache_max_gb", "0"])
    with pytest.raises(SystemExit, match="cannot be used with --streaming"):
        train.parse_args(["--image_cache", "on", "--streaming", "--max_train_steps", "2"])


def test_evaluation_splits_are_cached_on_first_use_unless_the_cache_is_off(fashion_uint8):
    dataset = Dataset.from_dict({"image": [Image.fromarray(x[0].numpy()) for x in fashion_uint8[:8]]})
    dataset = dataset.cast_column("image", ImageFeature())
    loader_kwargs = {"num_workers": 0, "collate_fn": ExampleCollator(), "pin_memory": False}
    for cache, kind in (("auto", InMemoryEvalDataset), ("off", ImageViewDataset)):
        args = train.parse_args(["--image_cache", cache])
        eval_data = EvalData(
            {"test": ImageViewDataset(dataset, "image", None, 28, mode="eval", labels=[0] * 8)}, loader_kwargs
        )
        assert isinstance(eval_split(eval_data, "test", args), kind)
        assert isinstance(eval_data.rows["test"], kind)


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        ({}, [], "4 per process (4 cores / 1 process(es) on this machine"),  # nothing asked: every core
        ({"OMP_NUM_THREADS": "1"}, [], "1 per process (OMP_NUM_THREADS"),  # the user's own setting
        ({"OMP_NUM_THREADS": "3"}, ["--num_threads", "2"], "2 per process (--num_threads"),  # the flag wins
    ],
)
def test_a_cpu_run_uses_every_core_unless_asked_otherwise(
    env, flags, expected, tmp_path, caplog, monkeypatch
):
    # `accelerate launch` sets OMP_NUM_THREADS=1 by default: the demo then ran at half speed, silently.
    caplog.set_level(logging.INFO, logger="corinfomax.train")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = [*SMALL, "--max_train_steps", "1", "--mixed_precision", "no", "--output_dir", str(tmp_path / "run")]
    threads = torch.get_num_threads()
    try:
        train.main([*run, *flags])
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU threads:")]
    assert message.startswith(f"CPU threads: {expected}") and chosen == int(expected.split()[0])
