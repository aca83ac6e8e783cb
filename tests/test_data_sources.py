"""Data sources (modeling_corinfomax.data.sources): the bundled demo split is package data."""

from __future__ import annotations

from pathlib import Path

import modeling_corinfomax
from modeling_corinfomax.data import BUNDLED_DATA_DIR, load_image_dataset, resolve_columns


def test_the_bundled_split_is_found_next_to_the_package_and_loads_without_arguments(tmp_path):
    package = Path(modeling_corinfomax.__file__).resolve().parent
    assert BUNDLED_DATA_DIR == package / "demo_data" / "fashion_mnist"
    assert (BUNDLED_DATA_DIR / "train.parquet").is_file() and (BUNDLED_DATA_DIR / "test.parquet").is_file()
    test = load_image_dataset(split="test", cache_dir=str(tmp_path))
    assert resolve_columns(test) == ("image", "label") and len(test) > 0
