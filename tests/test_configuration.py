"""CorInfoMaxConfig: the paper's defaults, validation with useful messages, and JSON round trips."""

import json

import pytest
from transformers import AutoConfig

from modeling_corinfomax import CorInfoMaxConfig


def test_defaults_are_the_imagenet1k_resnet50_run():
    # Reference: corinfomax-method.md sections 1.2 and 2 (ImageNet-1K R50, `_bn` projector).
    cfg = CorInfoMaxConfig()
    assert cfg.model_type == "corinfomax"
    assert cfg.backbone == "resnet50"
    assert cfg.cifar_stem is False
    assert cfg.projector_dims == [8192, 8192, 512]
    assert cfg.projector_batchnorm is True
    assert cfg.embedding_dim == 512
    assert cfg.normalize is True
    assert cfg.alpha == 2000.0
    assert cfg.lambda_R == 0.1
    assert cfg.lambda_mu == 0.1
    assert cfg.eps == 1e-8
    assert cfg.R_init == 1.0
    assert cfg.image_size == 224
    assert cfg.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert cfg.image_std == pytest.approx([0.229, 0.224, 0.225])


INVALID = [
    ("backbone", "resnet_does_not_exist", "resnet_does_not_exist"),
    ("backbone", "not-a-model", "not-a-model"),
    ("lambda_R", -0.1, "lambda_R=-0.1"),
    ("lambda_R", 1.0, "lambda_R=1.0"),
    ("lambda_R", 1.5, "lambda_R=1.5"),
    ("lambda_mu", -0.01, "lambda_mu=-0.01"),
    ("lambda_mu", 1.0, "lambda_mu=1.0"),
    ("eps", 0.0, "eps=0.0"),
    ("eps", -1e-8, "eps=-1e-08"),
    ("eps", float("nan"), "eps=nan"),
    ("alpha", -1.0, "alpha=-1.0"),
    ("alpha", float("nan"), "alpha=nan"),
    ("R_init", 0.0, "R_init=0.0"),
    ("R_init", -1.0, "R_init=-1.0"),
    ("projector_dims", [], "projector_dims=[]"),
    ("projector_dims", [64, 0, 16], "projector_dims=[64, 0, 16]"),
    ("projector_dims", [64, -16], "projector_dims=[64, -16]"),
    ("backbone_kwargs", {"num_classes": 10}, "'num_classes'"),
    ("backbone_kwargs", {"pretrained": True}, "'pretrained'"),
    ("image_size", 4, "image_size=4"),
    ("image_mean", [0.5, 0.5], "image_mean=[0.5, 0.5]"),
    ("image_std", [0.2, 0.0, 0.2], "image_std=[0.2, 0.0, 0.2]"),
]


@pytest.mark.parametrize(("name", "value", "named"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_value_raises_value_error_naming_it(name, value, named):
    with pytest.raises(ValueError) as excinfo:
        CorInfoMaxConfig(**{name: value})
    assert named in str(excinfo.value)


def test_unknown_backbone_message_says_how_to_fix():
    with pytest.raises(ValueError, match=r"timm\.list_models") as excinfo:
        CorInfoMaxConfig(backbone="resnet_does_not_exist")
    # Close matches come from timm's registry, so they are real names.
    assert "resnet50" in str(excinfo.value)


def test_boundary_values_are_accepted():
    cfg = CorInfoMaxConfig(lambda_R=0.0, lambda_mu=0.999, alpha=0.0, eps=1e-30, projector_dims=[16])
    assert (cfg.lambda_R, cfg.lambda_mu, cfg.alpha, cfg.eps, cfg.embedding_dim) == (
        0.0,
        0.999,
        0.0,
        1e-30,
        16,
    )


def custom_config() -> CorInfoMaxConfig:
    return CorInfoMaxConfig(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 32, "patch_size": 8},
        projector_dims=(128, 32),  # a tuple must be stored as a JSON list
        projector_batchnorm=False,
        alpha=250.0,
        lambda_R=0.01,
        lambda_mu=0.01,
        eps=1e-6,
        image_size=32,
        image_mean=(0.4914, 0.4822, 0.4465),
        image_std=(0.247, 0.243, 0.261),
        num_labels=10,
    )


def test_json_string_round_trip():
    cfg = custom_config()
    payload = json.loads(cfg.to_json_string())
    assert payload["projector_dims"] == [128, 32]
    assert payload["backbone_kwargs"] == {"img_size": 32, "patch_size": 8}
    assert payload["model_type"] == "corinfomax"
    again = CorInfoMaxConfig.from_dict(payload)
    assert again.to_dict() == cfg.to_dict()
    assert again.num_labels == 10


def test_save_pretrained_round_trip_through_auto_config(tmp_path):
    cfg = custom_config()
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, CorInfoMaxConfig)
    # `_name_or_path` records where it was loaded from; everything else must come back unchanged.
    assert {**again.to_dict(), "_name_or_path": ""} == {**cfg.to_dict(), "_name_or_path": ""}
    assert again.embedding_dim == 32


def test_invalid_saved_config_is_rejected_on_load(tmp_path):
    CorInfoMaxConfig().save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["lambda_R"] = 1.5
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"lambda_R=1\.5"):
        AutoConfig.from_pretrained(tmp_path)
