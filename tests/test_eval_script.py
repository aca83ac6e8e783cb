"""eval.py end to end: both protocols on the bundled data, result merging, presets and the global batch,
the embeddings export, image folders, Hub-cache checkpoints and their commit hash."""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from torchvision.transforms import v2
from transformers import AutoModel

from modeling_corinfomax.errors import ConfigurationError
from modeling_corinfomax.evaluation import knn_accuracy, linear_probe

REPO_ROOT = Path(__file__).resolve().parents[1]
from modeling_corinfomax.data import BUNDLED_DATA_DIR  # noqa: E402

FASHION_MNIST = BUNDLED_DATA_DIR
COMMIT = "0123456789abcdef0123456789abcdef01234567"

from modeling_corinfomax.cli import eval as eval_script  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU ops run best on one intra-op thread (two threads on two busy cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = ["--max_train_samples", "300", "--max_eval_samples", "100", "--total_batch_size", "64"]


def test_knn_and_precomputed_linear_on_bundled_data_then_merge_augmented_linear(pretrained, tmp_path, capsys):
    _, checkpoint = pretrained
    out = tmp_path / "results"
    args = ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), *SMALL]
    embeddings = tmp_path / "embeddings"
    first = eval_script.main(
        [
            *args,
            "--protocol",
            "all",
            "--precompute_features",
            "--knn_k",
            "10",
            "50",
            "--save_embeddings",
            str(embeddings),
        ]
    )
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

    # The results are those of the features eval.py computed (saved with --save_embeddings), recomputed here.
    def saved_features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = {split: str(embeddings / f"{split}.parquet")}
        rows = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))[split]
        return torch.tensor(rows["embedding"]), torch.tensor(rows["label"])

    (x_train, y_train), (x_test, y_test) = saved_features("train"), saved_features("test")
    for k in (10, 50):
        expected = knn_accuracy(x_train, y_train, x_test, y_test, 10, k=k, temperature=0.07)
        assert knn["by_k"][str(k)] == expected, k
    expected = linear_probe(x_train, y_train, x_test, y_test, 10)
    assert (saved["linear_top1"], saved["linear_top5"]) == (expected["top1"], expected["top5"])
    assert saved["knn_top1"] > 20.0 and saved["linear_top1"] > 20.0  # 10 classes: chance is 10%
    probe = saved["protocols"]["linear"]
    assert "precomputed" in probe["method"] and "L-BFGS" in probe["method"]
    assert probe["weight_decay"] == 1e-3 and 0 < probe["iterations"] < probe["max_iter"]

    # The paper's augmented protocol (one epoch here) replaces the linear results and keeps the kNN ones.
    second = eval_script.main([*args, "--protocol", "linear", "--linear_epochs", "1"])
    merged = json.loads((out / "eval_results.json").read_text())
    assert merged["knn_top1"] == saved["knn_top1"] and merged["protocols"]["knn"] == knn
    assert merged["linear_top1"] == second["linear_top1"]
    linear = merged["protocols"]["linear"]
    assert (
        linear["epochs"] == 1
        and linear["lr"] == 0.2
        and linear["lr_schedule"] == "cosine"
        and linear["min_lr"] == 2e-3
        and linear["momentum"] == 0.9
        and linear["batch_size"] == 64
    )
    assert "RandomResizedCrop" in linear["train_transform"] and "lr_step_size" not in linear

    # Results of another split must not be merged into this file.
    with pytest.raises(SystemExit, match="^error: .*merging them would mislabel.*another --output_dir"):
        eval_script.main([*args, "--validation_split", "train"])


def test_preset_selects_the_official_linear_protocol_and_flags_override_it():
    parse = eval_script.parse_args
    imagenet = parse(["--model_name_or_path", "m", "--preset", "imagenet1k-r50"])
    assert (imagenet.linear_lr_schedule, imagenet.linear_lr, imagenet.linear_lr_step_size) == (
        "step",
        25.0,
        20,
    )
    assert (imagenet.linear_lr_gamma, imagenet.linear_epochs, imagenet.total_batch_size) == (0.1, 100, 256)
    assert (imagenet.dataset_name, imagenet.validation_split) == ("ILSVRC/imagenet-1k", "validation")
    cifar = parse(["--model_name_or_path", "m", "--preset", "cifar10"])
    assert (cifar.linear_lr_schedule, cifar.linear_lr, cifar.linear_min_lr) == ("cosine", 0.2, 2e-3)
    assert (cifar.dataset_name, cifar.image_column, cifar.validation_split) == (
        "uoft-cs/cifar10",
        "img",
        "test",
    )
    # Explicit flags win over the preset; a named data source replaces the preset's.
    override = parse(
        [
            "--model_name_or_path",
            "m",
            "--preset",
            "imagenet1k-r50",
            "--linear_lr",
            "10",
            "--total_batch_size",
            "512",
        ]
    )
    assert (override.linear_lr, override.linear_lr_schedule, override.total_batch_size) == (10.0, "step", 512)
    folder = parse(["--model_name_or_path", "m", "--preset", "imagenet1k-r50", "--train_dir", "imgs"])
    assert folder.dataset_name is None and folder.validation_split is None and folder.linear_lr == 25.0
    plain = parse(["--model_name_or_path", "m"])
    assert (plain.linear_lr_schedule, plain.linear_lr, plain.total_batch_size) == ("cosine", 0.2, 256)
    assert plain.dataset_name is None  # the bundled data
    with pytest.raises(SystemExit):
        parse(["--model_name_or_path", "m", "--precompute_features", "--linear_lr", "1"])


def test_the_step_protocol_and_the_global_batch_reach_linear_eval(pretrained, tmp_path, monkeypatch):
    calls = []

    @functools.wraps(eval_script.linear_eval)  # keeps the signature eval.py reads the defaults from
    def fake_linear_eval(model, train_loader, eval_loader, num_classes, **kwargs):
        calls.append({"batch_size": train_loader.batches.batch_sampler.batch_size, **kwargs})
        return {"top1": 50.0, "top5": 90.0}

    monkeypatch.setattr(eval_script, "linear_eval", fake_linear_eval)
    _, checkpoint = pretrained
    args = ["--model_name_or_path", str(checkpoint), "--preset", "imagenet1k-r50", "--protocol", "linear"]
    args += ["--dataset_name", str(FASHION_MNIST), "--cache_dir", str(tmp_path), "--max_train_samples", "64"]
    result = eval_script.main([*args, "--max_eval_samples", "32", "--linear_epochs", "3"])
    (call,) = calls
    assert (call["lr_schedule"], call["lr"], call["lr_step_size"], call["lr_gamma"]) == (
        "step",
        25.0,
        20,
        0.1,
    )
    assert call["epochs"] == 3 and call["batch_size"] == 256  # one process: the whole global batch
    linear = result["protocols"]["linear"]
    assert linear["lr_schedule"] == "step" and linear["batch_size"] == 256 and "min_lr" not in linear
    assert "lr_gamma ** (epoch // lr_step_size)" in linear["optimizer"]


def test_the_global_batch_is_split_over_processes():
    assert eval_script.per_process_batch_size(256, 1) == 256
    assert eval_script.per_process_batch_size(256, 8) == 32  # the official ImageNet-100 split
    with pytest.raises(ConfigurationError, match="does not split over 3 processes: pass a multiple of 3"):
        eval_script.per_process_batch_size(256, 3)


def test_save_embeddings_writes_loadable_features_of_each_split(pretrained, tmp_path):
    model, checkpoint = pretrained
    out = tmp_path / "embeddings"
    eval_script.main(
        ["--model_name_or_path", str(checkpoint), *SMALL, "--knn_k", "5", "--save_embeddings", str(out)]
    )
    source = load_dataset(
        "parquet",
        data_files={split: str(FASHION_MNIST / f"{split}.parquet") for split in ("train", "test")},
        cache_dir=str(tmp_path / "cache"),
    )
    saved = load_dataset(
        "parquet",
        data_files={split: str(out / f"{split}.parquet") for split in ("train", "test")},
        cache_dir=str(tmp_path / "cache"),
    )
    encoder = AutoModel.from_pretrained(checkpoint).eval()
    config = encoder.config
    # The evaluation view, written out here: resize the short side to 8/7 (bicubic), centre crop, normalise.
    view = v2.Compose(
        [
            v2.Lambda(lambda image: image.convert("RGB")),
            v2.PILToTensor(),
            v2.Resize(
                int(config.image_size * 8 / 7), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(config.image_mean, config.image_std),
        ]
    )
    for split, n in (("train", 300), ("test", 100)):
        rows = saved[split]
        assert rows.num_rows == n and set(rows.column_names) == {"id", "split", "label", "embedding"}
        assert set(rows["split"]) == {split} and len(set(rows["id"])) == n
        assert rows.features["label"].names == source[split].features["label"].names
        assert rows["label"] == source[split].select(rows["id"])["label"]
        embeddings = torch.tensor(rows["embedding"])
        assert embeddings.shape == (n, model.corinfomax.num_features)
        for position in (0, n - 1):
            image = source[split][rows[position]["id"]]["image"]
            with torch.no_grad():
                expected = encoder(pixel_values=view(image)[None]).pooler_output[0]
            torch.testing.assert_close(embeddings[position], expected, rtol=1e-4, atol=1e-5)


def test_projector_features_and_bad_flags(pretrained, tmp_path):
    model, checkpoint = pretrained
    out = tmp_path / "embeddings"
    result = eval_script.main(
        ["--model_name_or_path", str(checkpoint), *SMALL, "--use_projector", "--knn_k", "5"]
        + ["--save_embeddings", str(out)]
    )
    assert "projector" in result["protocols"]["knn"]["features"]
    # What was evaluated is the projector's output, not the backbone's embedding.
    rows = load_dataset("parquet", data_files={"test": str(out / "test.parquet")}, cache_dir=str(tmp_path))
    assert (
        len(rows["test"][0]["embedding"]) == model.config.projector_dims[-1] != model.corinfomax.num_features
    )
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
