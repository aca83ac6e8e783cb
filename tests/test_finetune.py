"""finetune.py end to end: the semi-supervised subset, Trainer without the remove_unused_columns trap,
results merged into eval_results.json, the pipeline's label names, and the frozen-backbone probe."""

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
from modeling_corinfomax.data import BUNDLED_DATA_DIR  # noqa: E402

FASHION_MNIST = BUNDLED_DATA_DIR

from modeling_corinfomax.cli import finetune  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small CPU ops run best on one intra-op thread (two threads on two busy cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["finetune.py", *args])
    finetune.main()


def trainer_flags(output_dir: Path, steps: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--max_steps", str(steps),
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "50", "--learning_rate", "0.01",
        "--max_eval_samples", "100", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--seed", "0",
    ]  # fmt: skip


def test_semi_supervised_finetune_then_pipeline_names_the_classes(pretrained, tmp_path, monkeypatch):
    _, checkpoint = pretrained
    out = tmp_path / "finetuned"
    out.mkdir()
    dataset = {"name": "bundled fashion-mnist subset", "config": None, "split": "test"}
    (out / "eval_results.json").write_text(json.dumps({"knn_top1": 50.0, "dataset": dataset}))
    # Trainer's default remove_unused_columns=True would drop the image column before the transforms.
    run(
        monkeypatch,
        "--model_name_or_path",
        str(checkpoint),
        "--train_fraction",
        "0.01",
        *trainer_flags(out, 4),
    )

    results = json.loads((out / "eval_results.json").read_text())
    assert results["knn_top1"] == 50.0  # merged, not overwritten
    # The reported accuracies are the saved model's on the 100 evaluation images (the test split shuffled
    # with --seed 0), in finetune.py's evaluation view, counted here.
    test_split = load_dataset("parquet", data_files={"test": str(FASHION_MNIST / "test.parquet")})["test"]
    rows = test_split.shuffle(seed=0).select(range(100))
    _, view = finetune.build_transforms(AutoImageProcessor.from_pretrained(out))
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(
            pixel_values=torch.stack([view(image.convert("RGB")) for image in rows["image"]])
        ).logits
    ranked, labels = logits.topk(5).indices, torch.tensor(rows["label"])
    assert results["finetune_top1"] == pytest.approx(100.0 * (ranked[:, 0] == labels).float().mean().item())
    assert results["finetune_top5"] == pytest.approx(
        100.0 * (ranked == labels[:, None]).any(dim=1).float().mean().item()
    )
    protocol = results["protocols"]["finetune"]
    assert (
        protocol["train_fraction"] == 0.01 and protocol["num_train_samples"] == 240
    )  # 1% of 2,400 per class
    assert protocol["steps"] == 4 and protocol["freeze_backbone"] is False
    all_results = json.loads((out / "all_results.json").read_text())
    assert all_results["eval_accuracy"] * 100 == pytest.approx(results["finetune_top1"])
    assert {"train_loss", "eval_accuracy_top5"} <= set(all_results)

    names = load_dataset("parquet", data_files={"test": str(FASHION_MNIST / "test.parquet")})["test"]
    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(names[0]["image"], top_k=10)
    assert {p["label"] for p in predictions} == set(names.features["label"].names)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_freeze_backbone_trains_only_the_head(pretrained, tmp_path, monkeypatch):
    _, checkpoint = pretrained
    out = tmp_path / "probe"
    run(monkeypatch, "--model_name_or_path", str(checkpoint), "--freeze_backbone", *trainer_flags(out, 3))
    before, after = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    backbone = [k for k in after if k.startswith("corinfomax.backbone.")]
    assert backbone and all(torch.equal(after[k], before[k]) for k in backbone)  # incl. BN running stats
    assert (
        json.loads((out / "eval_results.json").read_text())["protocols"]["finetune"]["freeze_backbone"]
        is True
    )


def test_train_fraction_must_be_a_fraction(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="--train_fraction 2.0 must be in"):
        run(monkeypatch, "--model_name_or_path", "x", "--output_dir", str(tmp_path), "--train_fraction", "2")


@pytest.mark.parametrize("flag", ["--image_column", "--image_column_name"])
def test_column_flags_are_the_same_as_train_and_eval(flag, tmp_path):
    """One vocabulary: `--image_column`/`--label_column` as in train.py and eval.py, and the HF example's
    `--image_column_name`/`--label_column_name` as aliases."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((finetune.ModelArguments, finetune.DataTrainingArguments, TrainingArguments))
    label_flag = flag.replace("image", "label")
    _, data_args, _ = parser.parse_args_into_dataclasses(
        ["--model_name_or_path", "x", "--output_dir", str(tmp_path), flag, "picture", label_flag, "kind"]
    )
    assert (data_args.image_column, data_args.label_column) == ("picture", "kind")
