"""`--model_name_or_path` (continued pretraining): each kind of source is recognised from what it holds, its
architecture wins over the defaults and presets, and the model starts from exactly its weights."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import tiny_config_kwargs
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from transformers import TimmWrapperConfig, TimmWrapperModel

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxForPreTraining, CorInfoMaxModel
from modeling_corinfomax.cli.train_args import parse_args
from modeling_corinfomax.errors import ConfigurationError
from modeling_corinfomax.export import export_timm_backbone
from modeling_corinfomax.starting_point import load_starting_weights, resolve_starting_point


def model_of(start, **overrides) -> CorInfoMaxForPreTraining:
    """A fresh pretraining model with `start`'s architecture and a recipe of its own (as train.py builds it)."""
    kwargs = {**tiny_config_kwargs(), **start.architecture, "alpha": 500.0, **overrides}
    torch.manual_seed(123)
    return CorInfoMaxForPreTraining(CorInfoMaxConfig(**kwargs))


def assert_equal_tensors(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_a_corinfomax_folder_gives_backbone_projector_and_on_request_the_loss_state(pretrained):
    source, path = pretrained
    start = resolve_starting_point(str(path))
    assert start.kind == "corinfomax"
    assert start.architecture == {
        "backbone": "resnet10t", "backbone_kwargs": {}, "cifar_stem": True, "projector_dims": [64, 64, 16],
        "projector_batchnorm": True,
    }  # fmt: skip
    model = model_of(start)
    line = load_starting_weights(model, start, resume_loss_state=True)
    assert "loss state" in line
    assert_equal_tensors(model.corinfomax, source.corinfomax.state_dict())
    assert_equal_tensors(model.loss_fn, source.loss_fn.state_dict())
    assert model.config.alpha == 500.0  # the recipe stays the run's

    fresh = model_of(start)
    load_starting_weights(fresh, start)
    assert_equal_tensors(fresh.corinfomax, source.corinfomax.state_dict())
    assert int(fresh.loss_fn.num_updates) == 0 and int(source.loss_fn.num_updates) == 3
    assert torch.equal(fresh.loss_fn.R1, torch.eye(16, dtype=torch.float64))


def test_a_model_saved_without_its_loss_refuses_resume_loss_state(pretrained, tmp_path):
    source, _ = pretrained
    encoder = CorInfoMaxModel(source.config)
    encoder.load_state_dict(source.corinfomax.state_dict())
    encoder.save_pretrained(tmp_path / "encoder")
    start = resolve_starting_point(str(tmp_path / "encoder"))
    load_starting_weights(model_of(start), start)  # backbone and projector are there
    with pytest.raises(ConfigurationError, match="no loss state.*drop --resume_loss_state"):
        load_starting_weights(model_of(start), start, resume_loss_state=True)


def test_timm_format_and_timm_wrapper_folders_start_the_backbone_only(pretrained, tmp_path):
    source, _ = pretrained
    export_timm_backbone(source, tmp_path / "timm")
    start = resolve_starting_point(str(tmp_path / "timm"))
    assert (
        start.kind == "timm"
        and start.architecture["cifar_stem"]
        and start.architecture["backbone"] == "resnet10t"
    )
    assert "projector_dims" not in start.architecture  # the run's own projector
    model = model_of(start, projector_dims=[32, 8])
    projector = {k: v.clone() for k, v in model.corinfomax.projector.state_dict().items()}
    load_starting_weights(model, start)
    assert_equal_tensors(model.corinfomax.backbone, source.corinfomax.backbone.state_dict())
    assert_equal_tensors(model.corinfomax.projector, projector)  # fresh, as built
    with pytest.raises(ConfigurationError, match="timm model, it has no CorInfoMax loss state"):
        load_starting_weights(model, start, resume_loss_state=True)

    # A TimmWrapper built by transformers saves `timm_model.`-prefixed keys, which timm itself cannot read.
    wrapper = TimmWrapperModel(TimmWrapperConfig(architecture="resnet10t"))
    wrapper.save_pretrained(tmp_path / "wrapper")
    assert all(k.startswith("timm_model.") for k in load_file(tmp_path / "wrapper" / "model.safetensors"))
    start = resolve_starting_point(str(tmp_path / "wrapper"))
    assert start.architecture == {"backbone": "resnet10t", "backbone_kwargs": {}, "cifar_stem": False}
    model = model_of(start)
    load_starting_weights(model, start)
    assert_equal_tensors(model.corinfomax.backbone, wrapper.timm_model.state_dict())


def prefill_hub_cache(cache, repo_id: str, weights: dict) -> None:
    """What `hf download` leaves in the cache: refs/main and a snapshot with config.json and the weights."""
    commit = "a" * 40
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    save_file(weights, snapshot / "model.safetensors")
    config = {
        "architecture": "resnet10t",
        "num_classes": 1000,
        "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    (snapshot / "config.json").write_text(json.dumps(config))


def test_timm_names_and_hub_ids_load_from_the_offline_cache(tmp_path, monkeypatch):
    torch.manual_seed(7)
    weights = timm.create_model(
        "resnet10t"
    ).state_dict()  # an ImageNet-shaped checkpoint, classifier included
    prefill_hub_cache(tmp_path, "timm/resnet10t.c3_in1k", weights)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    without_classifier = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    for name in ("resnet10t.c3_in1k", "hf-hub:timm/resnet10t.c3_in1k"):
        start = resolve_starting_point(name)
        model = model_of(start)
        load_starting_weights(model, start)
        assert_equal_tensors(model.corinfomax.backbone, without_classifier)
    assert start.preprocessing == {"image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    with pytest.raises(ConfigurationError, match="cannot get it from the Hub or its local cache"):
        resolve_starting_point("someone/not-in-the-cache")


def test_a_bare_weights_file_needs_its_architecture_and_must_fit_it(tmp_path):
    torch.manual_seed(3)
    weights = timm.create_model("resnet10t").state_dict()
    torch.save({"state_dict": weights}, tmp_path / "ckpt.pth")  # the usual training-script layout
    with pytest.raises(ConfigurationError, match="pass --backbone"):
        resolve_starting_point(str(tmp_path / "ckpt.pth"))
    start = resolve_starting_point(str(tmp_path / "ckpt.pth"), backbone="resnet10t")
    model = model_of(start)
    load_starting_weights(model, start)
    assert_equal_tensors(
        model.corinfomax.backbone, {k: v for k, v in weights.items() if not k.startswith("fc.")}
    )

    start = resolve_starting_point(str(tmp_path / "ckpt.pth"), backbone="resnet14t")
    with pytest.raises(ConfigurationError, match="could not load its weights"):
        load_starting_weights(model_of(start), start)


def test_train_flags_take_the_checkpoint_architecture_and_refuse_a_conflicting_one(pretrained):
    _, path = pretrained
    # The preset's ResNet-18 and CIFAR recipe: the checkpoint's ResNet-10-T wins, the recipe stays.
    args = parse_args(["--preset", "cifar10", "--train_dir", str(path), "--model_name_or_path", str(path)])
    assert (args.backbone, args.cifar_stem, args.projector_dims) == ("resnet10t", True, [64, 64, 16])
    assert (
        args.model_config.backbone == "resnet10t" and args.alpha == 250.0
    )  # the preset's, not the source's 2000
    with pytest.raises(SystemExit, match="--backbone resnet18 conflicts with --model_name_or_path"):
        parse_args(["--model_name_or_path", str(path), "--backbone", "resnet18"])
    with pytest.raises(SystemExit, match="--resume_loss_state needs --model_name_or_path"):
        parse_args(["--resume_loss_state"])
