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


def test_read_idx_reads_the_mnist_family_format(tmp_path):
    import gzip  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from modeling_corinfomax.data import read_idx  # noqa: PLC0415

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # The IDX header: two zero bytes, the type (0x08: unsigned byte), the number of dimensions, then each
    # dimension as a big-endian 32-bit integer (yann.lecun.com/exdb/mnist).
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
