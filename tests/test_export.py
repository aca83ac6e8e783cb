"""modeling_corinfomax.export: the timm-format backbone loads through timm and transformers with our
features; publish's dry run writes both repo folders with complete, secret-free model cards."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

from modeling_corinfomax import (
    CorInfoMaxConfig,
    CorInfoMaxForPreTraining,
    CorInfoMaxModel,
    make_image_processor,
)
from modeling_corinfomax.export import (
    eval_results_to_model_index,
    export_timm_backbone,
    parse_eval_results,
    publish,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_RESULTS = {
    "knn_top1": 71.25,
    "linear_top1": 75.5,
    "linear_top5": 98.0,
    "knn_top1_random_init": 25.0,
    "linear_top1_random_init": 30.0,
    "linear_top1_raw_pixels": 40.0,
    "train_runtime_seconds": 12.5,
    "dataset": {"name": "uoft-cs/cifar10", "config": "plain_text", "split": "test"},
    "protocols": {"knn": {"k": 20, "temperature": 0.07}, "linear": {"epochs": 100}},
}


def square_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(48, 48, 3) * 255).astype("uint8"))


@pytest.fixture(params=["cifar_stem", "standard_stem"])
def trained(request, pretrained):
    """`(CorInfoMaxModel in eval mode, its checkpoint folder or None)`: the conftest checkpoint
    (resnet10t, CIFAR stem, a few real steps) or a standard-stem test_resnet."""
    if request.param == "cifar_stem":
        model, path = pretrained
        return model.corinfomax, path
    torch.manual_seed(0)
    model = CorInfoMaxModel(CorInfoMaxConfig(backbone="test_resnet", projector_dims=[16, 8], image_size=32))
    model(torch.randn(8, 3, 32, 32))  # non-trivial BN statistics
    return model.eval(), None


def test_timm_export_loads_everywhere_with_our_features(trained, tmp_path):
    model, _ = trained
    config = model.config
    out = export_timm_backbone(model, tmp_path / "timm")
    timm_config = json.loads((out / "config.json").read_text())
    arch = config.backbone + ("_cifar_stem" if config.cifar_stem else "")
    assert timm_config["architecture"] == arch and timm_config["num_classes"] == 0
    assert "num_classes" not in timm_config.get("model_args", {})  # the timm 1.0.31 / TimmWrapper trap
    cfg = timm_config["pretrained_cfg"]
    assert (
        cfg["input_size"] == [3, 32, 32]
        and cfg["mean"] == config.image_mean
        and cfg["std"] == config.image_std
    )
    assert cfg["interpolation"] == "bicubic" and "hf_hub_id" not in cfg and "tag" not in cfg
    assert set(load_file(out / "model.safetensors")) == set(model.backbone.state_dict())  # plain timm keys

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).pooler_output
        backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(backbone(x), expected)

        wrapper = AutoModel.from_pretrained(out).eval()
        assert type(wrapper).__name__ == "TimmWrapperModel"
        torch.testing.assert_close(wrapper(x).pooler_output, expected)

        classifier = AutoModelForImageClassification.from_pretrained(out, num_labels=5).eval()
        assert type(classifier).__name__ == "TimmWrapperForImageClassification"
        assert classifier(x).logits.shape == (3, 5)
        torch.testing.assert_close(
            classifier.timm_model.forward_head(classifier.timm_model.forward_features(x), pre_logits=True),
            expected,
        )

        # The timm processor does our evaluation preprocessing (resize to 8/7, centre crop, our mean/std).
        processor = AutoImageProcessor.from_pretrained(out)
        image = square_image()
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        ours = make_image_processor(config)(image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == ours.shape == (1, 3, 32, 32)
        assert (pixels - ours).abs().mean() < 0.05  # PIL vs torchvision bicubic, same geometry

        extractor = pipeline("image-feature-extraction", model=str(out))
        features = torch.tensor(extractor(image, pool=True))
        torch.testing.assert_close(features, model(pixels).pooler_output)


def test_cifar_stem_architecture_is_a_regular_timm_model(tmp_path):
    import modeling_corinfomax  # noqa: F401  (registers the *_cifar_stem architectures)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No pretrained configuration" warning
        model = timm.create_model("resnet18_cifar_stem").eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity) and model.num_classes == 1000
    with pytest.raises(RuntimeError, match="No pretrained weights exist for resnet18_cifar_stem"):
        timm.create_model("resnet18_cifar_stem", pretrained=True)

    # The weights of a CIFAR-stem CorInfoMax backbone load through timm's usual overlay too.
    source = CorInfoMaxModel(
        CorInfoMaxConfig(backbone="resnet18", cifar_stem=True, projector_dims=[8], image_size=32)
    ).eval()
    export_timm_backbone(source, tmp_path)
    loaded = timm.create_model(
        "resnet18_cifar_stem",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors")},
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x).pooler_output)


def test_eval_results_split_ours_from_baselines():
    ours, baselines = parse_eval_results(EVAL_RESULTS)
    assert ours == {("knn", "top1"): 71.25, ("linear", "top1"): 75.5, ("linear", "top5"): 98.0}
    assert baselines == {
        "random_init": {("knn", "top1"): 25.0, ("linear", "top1"): 30.0},
        "raw_pixels": {("linear", "top1"): 40.0},
    }
    index = eval_results_to_model_index(EVAL_RESULTS)
    assert sorted(r.metric_value for r in index) == [71.25, 75.5, 98.0]
    knn = next(r for r in index if r.metric_value == 71.25)
    assert knn.dataset_type == "uoft-cs/cifar10" and knn.dataset_split == "test"
    assert knn.dataset_config == "plain_text" and knn.metric_args == {"k": 20, "temperature": 0.07}


def test_publish_dry_run_writes_both_repos_with_cards(pretrained, tmp_path):
    model, path = pretrained
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    (checkpoint / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    token = "hf_notarealtokenbutsecret0123456789"
    args = {"dataset_name": "uoft-cs/cifar10", "learning_rate": 0.5, "hub_token": token, "report_to": "none"}
    (checkpoint / "training_args.json").write_text(json.dumps(args))
    for name in ("training.png", "embeddings.png", "neighbours.png"):
        Image.new("RGB", (20, 10)).save(checkpoint / name)

    # Through the command line, as a user runs it.
    spec = importlib.util.spec_from_file_location("hub_push", REPO_ROOT / "hub" / "push.py")
    push = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(push)
    assert push.main([str(checkpoint), "--repo_id", "org/tiny", "--dry_run", str(tmp_path / "out")]) == 0
    full, backbone = tmp_path / "out" / "org--tiny", tmp_path / "out" / "org--tiny-timm"

    assert {
        "config.json",
        "model.safetensors",
        "configuration_corinfomax.py",
        "modeling_corinfomax.py",
        "loss.py",
        "preprocessor_config.json",
        "README.md",
        "training.png",
        "embeddings.png",
        "neighbours.png",
        "training_args.json",
        "eval_results.json",
    } <= {p.name for p in full.iterdir()}
    assert {p.name for p in backbone.iterdir()} == {
        "config.json",
        "model.safetensors",
        "README.md",
        "training.png",
        "embeddings.png",
        "neighbours.png",
    }
    assert len(json.loads((full / "config.json").read_text())["auto_map"]) == 4
    for file in [*full.iterdir(), *backbone.iterdir()]:
        assert token.encode() not in file.read_bytes(), file

    reloaded = CorInfoMaxForPreTraining.from_pretrained(full)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, msg=key)

    card, timm_card = ModelCard.load(full / "README.md"), ModelCard.load(backbone / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert {"corinfomax", "self-supervised", "custom_code"} <= set(card.data.tags)
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.license == "apache-2.0"
    assert sorted(r.metric_value for r in card.data.eval_results) == [71.25, 75.5, 98.0]
    for text in (
        "code_revision=",
        "trust_remote_code=True",
        "@inproceedings{ozsoy2022corinfomax",
        "(training.png)",
        "(embeddings.png)",
        "(neighbours.png)",
    ):
        assert text in card.text
        assert text in timm_card.text or text in ("code_revision=", "trust_remote_code=True")
    assert "| 25.00 |" in card.text and "| 40.00 |" in card.text  # baselines: in the table only
    assert '"learning_rate": 0.5' in card.text and "hub_token" not in card.text

    assert timm_card.data.library_name == "timm" and timm_card.data.base_model == "org/tiny"
    assert "import modeling_corinfomax" in timm_card.text and "hf-hub:org/tiny-timm" in timm_card.text


def test_publish_without_run_files_and_its_errors(tmp_path):
    torch.manual_seed(0)
    config = CorInfoMaxConfig(backbone="test_resnet", projector_dims=[16, 8], image_size=32)
    CorInfoMaxForPreTraining(config).save_pretrained(tmp_path / "ckpt")
    result = publish(
        tmp_path / "ckpt", "org/plain", backbone_repo_id="org/plain-backbone", dry_run_dir=tmp_path / "out"
    )
    card = ModelCard.load(Path(result["model_dir"]) / "README.md")
    assert card.data.eval_results is None and "`sim_loss_weight`" in card.text
    assert "import modeling_corinfomax" not in ModelCard.load(Path(result["backbone_dir"]) / "README.md").text

    with pytest.raises(FileExistsError, match="not empty"):
        publish(
            tmp_path / "ckpt",
            "org/plain",
            backbone_repo_id="org/plain-backbone",
            dry_run_dir=tmp_path / "out",
        )
    with pytest.raises(ValueError, match="not a Hub repo id"):
        publish(tmp_path / "ckpt", "no-namespace", dry_run_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="must differ"):
        publish(tmp_path / "ckpt", "org/a", backbone_repo_id="org/a", dry_run_dir=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        publish(tmp_path, "org/a", dry_run_dir=tmp_path / "x")

    # A token hidden under an innocent key is caught before anything is uploaded, and not echoed.
    token = "hf_leakcheck0123456789abcdef"
    (tmp_path / "ckpt" / "training_args.json").write_text(json.dumps({"notes": f"pushed with {token}"}))
    with pytest.raises(RuntimeError, match="contains the Hub token") as error:
        publish(tmp_path / "ckpt", "org/leak", token=token, dry_run_dir=tmp_path / "leak")
    assert token not in str(error.value)
