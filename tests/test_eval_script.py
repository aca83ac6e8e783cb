"""eval.py end to end: both protocols on the bundled data, result merging, image folders, Hub-cache
checkpoints and their commit hash."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = REPO_ROOT / "data" / "fashion_mnist"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

spec = importlib.util.spec_from_file_location("eval_script", REPO_ROOT / "eval.py")
eval_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_script)


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU ops run best on one intra-op thread (two threads on two busy cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["--max_train_samples", "300", "--max_eval_samples", "100", "--per_device_batch_size", "64"]


def test_knn_and_precomputed_linear_on_bundled_data_then_merge_augmented_linear(pretrained, tmp_path, capsys):
    _, checkpoint = pretrained
    out = tmp_path / "results"
    args = ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), *SMALL]
    first = eval_script.main([*args, "--protocol", "all", "--precompute_features", "--knn_k", "10", "50"])
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved == first
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == first
    assert saved["model_name_or_path"] == str(checkpoint) and saved["revision"] is None
    assert saved["dataset"] == {
        "name": "bundled fashion-mnist subset",
        "config": None,
        "split": "test",
        "train_split": "train",
        "num_train_samples": 300,
        "num_eval_samples": 100,
    }
    knn = saved["protocols"]["knn"]
    assert knn["k"] == 10 and knn["temperature"] == 0.07 and knn["similarity"] == "cosine"
    assert set(knn["by_k"]) == {"10", "50"}
    assert (saved["knn_top1"], saved["knn_top5"]) == (knn["by_k"]["10"]["top1"], knn["by_k"]["10"]["top5"])
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        assert 0.0 <= saved[key] <= 100.0
    assert saved["knn_top1"] > 20.0 and saved["linear_top1"] > 20.0  # 10 classes: chance is 10%
    assert (
        saved["protocols"]["linear"]["epochs"] == 50
        and "precomputed" in saved["protocols"]["linear"]["method"]
    )

    # The paper's augmented protocol (one epoch here) replaces the linear results and keeps the kNN ones.
    second = eval_script.main([*args, "--protocol", "linear", "--linear_epochs", "1"])
    merged = json.loads((out / "eval_results.json").read_text())
    assert merged["knn_top1"] == saved["knn_top1"] and merged["protocols"]["knn"] == knn
    assert merged["linear_top1"] == second["linear_top1"]
    linear = merged["protocols"]["linear"]
    assert (
        linear["epochs"] == 1
        and linear["lr"] == 0.2
        and linear["min_lr"] == 2e-3
        and linear["momentum"] == 0.9
    )
    assert "RandomResizedCrop" in linear["train_transform"]

    # Results of another split must not be merged into this file.
    with pytest.raises(ValueError, match="another --output_dir"):
        eval_script.main([*args, "--validation_split", "train"])


def test_projector_features_and_bad_flags(pretrained, tmp_path):
    _, checkpoint = pretrained
    result = eval_script.main(
        ["--model_name_or_path", str(checkpoint), *SMALL, "--use_projector", "--knn_k", "5"]
    )
    assert "projector" in result["protocols"]["knn"]["features"]
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--model_name_or_path", "x", "--dataset_name", "d", "--train_dir", "t"])
    with pytest.raises(SystemExit, match="--image_column 'pixels' is not a column"):
        eval_script.main(["--model_name_or_path", str(checkpoint), *SMALL, "--image_column", "pixels"])


def write_image_folder(root: Path, rows, classes: list[str]) -> None:
    for i, row in enumerate(rows):
        folder = root / classes[row["label"]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].save(folder / f"{i}.png")


def test_train_and_validation_image_folders_with_a_missing_class(pretrained, tmp_path):
    """The validation folder lacks the first class, so its own ClassLabel ids are shifted: labels must be
    mapped by class name. Validation images are copies of training images, so 1-NN is exact."""
    data = load_dataset(
        "parquet", data_files={"train": str(FASHION_MNIST / "train.parquet")}, cache_dir=str(tmp_path)
    )
    classes = data["train"].features["label"].names
    rows = data["train"].filter(lambda label: label < 3, input_columns="label").select(range(30))
    write_image_folder(tmp_path / "train", rows, classes)
    write_image_folder(tmp_path / "val", [r for r in rows if r["label"] > 0], classes)
    _, checkpoint = pretrained
    out = tmp_path / "out"
    result = eval_script.main(
        [
            "--model_name_or_path", str(checkpoint), "--train_dir", str(tmp_path / "train"),
            "--validation_dir", str(tmp_path / "val"), "--knn_k", "1", "--output_dir", str(out),
        ]
    )  # fmt: skip
    n_val = sum(1 for r in rows if r["label"] > 0)
    assert result["dataset"]["name"] == str(tmp_path / "val")
    assert result["dataset"]["num_train_samples"] == 30 and result["dataset"]["num_eval_samples"] == n_val
    assert result["knn_top1"] == 100.0


def hub_cache_checkpoint(checkpoint: Path, cache: Path, repo_id: str) -> None:
    """Lay out `checkpoint` as a Hub download of `repo_id` at commit COMMIT in the cache folder `cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_checkpoint_from_the_hub_cache_records_its_commit(pretrained, tmp_path, monkeypatch):
    import huggingface_hub.constants

    _, checkpoint = pretrained
    hub_cache_checkpoint(checkpoint, tmp_path / "hub", "corinfomax-test/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert eval_script.resolve_commit("corinfomax-test/tiny", None) == COMMIT
    assert eval_script.resolve_commit(str(checkpoint), None) is None
    result = eval_script.main(["--model_name_or_path", "corinfomax-test/tiny", *SMALL, "--knn_k", "5"])
    assert result["revision"] == COMMIT and result["model_name_or_path"] == "corinfomax-test/tiny"
    local = eval_script.main(["--model_name_or_path", str(checkpoint), *SMALL, "--knn_k", "5"])
    assert np.isclose(result["knn_top1"], local["knn_top1"])
