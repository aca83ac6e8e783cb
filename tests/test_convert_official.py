"""hub/convert_official.py: checkpoints in the original code's layouts (method notes, section 7), built here
with torchvision ResNets and the official projector, convert into our format with identical outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from modeling_corinfomax import CorInfoMaxForPreTraining

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_PARAMETERS = {
    "dataset": "cifar10",
    "model_name": "resnet18",
    "projector": "64-64-16",
    "sim_loss_weight": 250.0,
    "cov_loss_weight": 1.0,
    "R_ini": 1.0,
    "la_R": 0.01,
    "la_mu": 0.01,
    "R_eps_weight": 1e-8,
    "normalize_on": True,
    "batch_size": 512,
    "epochs": 1000,
}


@pytest.fixture(scope="module")
def converter():
    from modeling_corinfomax.cli import convert_official  # noqa: PLC0415

    return convert_official


def official_model(arch: str, cifar_stem: bool, dims: list[int] | None, batchnorm: bool) -> nn.Module:
    """The network as the official code builds it (`model_base_resnet*.py`): torchvision ResNet with
    zero_init_residual and fc=Identity, optionally the CIFAR stem, and the Sequential projector; with
    random BatchNorm statistics, so that eval mode is not the identity."""
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
    net.backbone.fc = nn.Identity()
    if cifar_stem:
        net.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.backbone.maxpool = nn.Identity()
    if dims is not None:
        sizes = [net.backbone.inplanes, *dims]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 2):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if batchnorm:
                layers.append(nn.BatchNorm1d(sizes[i + 1]))
            layers.append(nn.ReLU(True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        net.projector = nn.Sequential(*layers)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)  # zero_init_residual left some at 0
    return net.eval()


def assert_same_outputs(net: nn.Module, out_dir: Path, size: int) -> CorInfoMaxForPreTraining:
    ours = CorInfoMaxForPreTraining.from_pretrained(out_dir).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        out = ours.corinfomax(x)
        features = net.backbone(x)
        torch.testing.assert_close(out.pooler_output, features, atol=1e-5, rtol=1e-4)
        if hasattr(net, "projector"):
            torch.testing.assert_close(out.projections, net.projector(features), atol=1e-5, rtol=1e-4)
    return ours


def test_cifar10_resnet18_full_checkpoint(converter, tmp_path):
    net = official_model("resnet18", cifar_stem=True, dims=[64, 64, 16], batchnorm=False)
    state = net.state_dict()
    assert state["backbone.conv1.weight"].shape == (64, 3, 3, 3) and "projector.4.bias" not in state
    path = tmp_path / "t_1653402026_cov_cifar10_best_rerun_model1000.pth"
    torch.save(
        {
            "epoch": 1000,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.5, "momentum": 0.9}]},
            "parameters_dict": CIFAR10_PARAMETERS,
            "loss": -8.1,
        },
        path,
    )
    # Through the command line, as a user runs it.
    assert converter.main([str(path), str(tmp_path / "out")]) == 0
    ours = assert_same_outputs(net, tmp_path / "out", 32)
    config = ours.config
    assert (config.backbone, config.cifar_stem, config.projector_dims) == ("resnet18", True, [64, 64, 16])
    assert not config.projector_batchnorm and config.normalize
    assert (config.alpha, config.lambda_R, config.lambda_mu, config.R_init, config.eps) == (
        250,
        0.01,
        0.01,
        1,
        1e-8,
    )
    assert config.image_size == 32 and config.image_mean == [0.4914, 0.4822, 0.4465]
    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["sources"]["alpha"] == "parameters_dict['sim_loss_weight']" and report["layout"] == "full"
    training_args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert training_args["sim_loss_weight"] == 250.0


def test_imagenet1k_resnet50_with_batchnorm_projector(converter, tmp_path):
    net = official_model("resnet50", cifar_stem=False, dims=[64, 64, 32], batchnorm=True)
    state = net.state_dict()
    assert "projector.1.running_mean" in state and "projector.6.weight" in state
    path = tmp_path / "t_1659716263_imagenet_mgpu_amp_4gpu_a100_bn_model100.pth"
    parameters = {"dataset": "imagenet", "sim_loss_weight": 2000.0, "la_R": 0.1, "la_mu": 0.1, "R_ini": 1.0}
    torch.save({"epoch": 100, "model_state_dict": state, "parameters_dict": parameters}, path)
    report = converter.convert(path, tmp_path / "out", {"eps": 1e-7})  # a flag overrides
    assert report["max_abs_difference"]["projections"] < 1e-4
    ours = assert_same_outputs(net, tmp_path / "out", 64)
    config = ours.config
    assert (config.backbone, config.cifar_stem, config.projector_batchnorm) == ("resnet50", False, True)
    assert config.projector_dims == [64, 64, 32] and config.alpha == 2000 and config.lambda_R == 0.1
    assert config.eps == 1e-7 and report["sources"]["eps"] == "flag" and config.image_size == 224


def test_backbone_only_file(converter, tmp_path):
    # `t_<time>_<name>_resnet50.pth` holds plain keys, whatever the depth (here the ImageNet-100 R18 run).
    net = official_model("resnet18", cifar_stem=False, dims=None, batchnorm=False)
    path = tmp_path / "t_1652904346_cov_imagenet100_ep400_norm_resnet18_resnet50.pth"
    torch.save(net.backbone.state_dict(), path)
    report = converter.convert(
        path, tmp_path / "out", {"preset": "imagenet100-r18", "projector_dims": [32, 8]}
    )
    assert report["layout"] == "backbone-only" and "projections" not in report["max_abs_difference"]
    assert any("freshly initialised" in note for note in report["notes"])
    ours = assert_same_outputs(net, tmp_path / "out", 64)
    assert ours.config.alpha == 500 and ours.config.projector_dims == [32, 8]


def test_refuses_pickles_and_unknown_layouts(converter, tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=0.5)}, pickled)
    with pytest.raises(converter.ConversionError, match=r"weights_only=True"):
        converter.load_official(pickled)

    unknown = tmp_path / "unknown.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(SystemExit, match="^error: .* is not an official CorInfoMax checkpoint"):
        converter.main([str(unknown), str(tmp_path / "out")])

    net = official_model("resnet18", cifar_stem=True, dims=[16, 8], batchnorm=False)
    full = tmp_path / "full.pth"
    torch.save({"model_state_dict": net.state_dict()}, full)
    with pytest.raises(converter.ConversionError, match="contradict the weights"):
        converter.convert(full, tmp_path / "out", {"cifar_stem": False})
    with pytest.raises(converter.ConversionError, match="cov_loss_weight"):
        torch.save({"model_state_dict": net.state_dict(), "parameters_dict": {"cov_loss_weight": 2.0}}, full)
        converter.convert(full, tmp_path / "out")
