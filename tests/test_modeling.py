"""CorInfoMax models: forward contract, checkpoints through the Auto classes and remote code, timm init,
CIFAR stem, checkpointing, linear probing, Trainer and pipelines."""

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BitImageProcessor,
    ImageFeatureExtractionPipeline,
    Trainer,
    TrainingArguments,
    pipeline,
)
from transformers.utils import ModelOutput

from modeling_corinfomax import (
    CorInfoMaxConfig,
    CorInfoMaxForImageClassification,
    CorInfoMaxForPreTraining,
    CorInfoMaxLoss,
    CorInfoMaxModel,
)

LOSS_STATE = ("R1", "R2", "mu1", "mu2")
README = Path(__file__).resolve().parents[1] / "README.md"


def two_views(pixels: torch.Tensor, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic "views" of real images: the images and their horizontally flipped, shifted copies."""
    x = pixels[:n]
    return x, torch.roll(x.flip(-1), 2, dims=-1)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, fashion_mnist):
    section = README.read_text().partition("## Use it from Python")[2]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example, "README.md has no python example under '## Use it from Python'"
    monkeypatch.chdir(tmp_path)  # the example saves to a relative "ckpt"
    torch.manual_seed(0)
    namespace = {}
    exec(compile(example.group(1), str(README), "exec"), namespace)
    outputs = [v for v in namespace.values() if isinstance(v, ModelOutput) and "loss" in v]
    assert outputs and all(o.loss.dtype == torch.float64 and torch.isfinite(o.loss) for o in outputs)
    saved = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_corinfomax.py",
        "loss.py",
        "preprocessor_config.json",
    } <= saved
    extractors = [v for v in namespace.values() if isinstance(v, ImageFeatureExtractionPipeline)]
    for extract in extractors:
        assert np.asarray(extract(fashion_mnist["test"]["image"][0], pool=True)).shape == (1, 512)


def test_pretraining_forward_and_backward(tiny_config, fashion_pixels):
    torch.manual_seed(0)
    x1, x2 = two_views(fashion_pixels[0])
    model = CorInfoMaxForPreTraining(tiny_config)
    loss = model(pixel_values=x1, pixel_values_2=x2).loss
    assert loss.ndim == 0 and loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert int(model.loss_fn.num_updates) == 1


def test_pretraining_output_is_the_loss_of_its_projections(tiny_config, fashion_pixels):
    torch.manual_seed(0)
    x1, x2 = two_views(fashion_pixels[0])
    model = CorInfoMaxForPreTraining(tiny_config)
    out = model(pixel_values=x1, pixel_values_2=x2)
    assert out.projections.shape == out.projections_2.shape == (4, tiny_config.embedding_dim)
    assert out.pooler_output.shape == (4, model.corinfomax.num_features)
    # The config's hyperparameters reach the loss: a fresh loss built from them gives the same value.
    fresh = CorInfoMaxLoss(
        dim=tiny_config.embedding_dim,
        alpha=tiny_config.alpha,
        lambda_R=tiny_config.lambda_R,
        lambda_mu=tiny_config.lambda_mu,
        R_init=tiny_config.R_init,
        eps=tiny_config.eps,
        normalize=tiny_config.normalize,
    )(out.projections, out.projections_2)
    assert torch.equal(out.loss, fresh.loss)
    assert torch.allclose(out.loss, tiny_config.alpha * out.invariance_loss + out.covariance_loss, rtol=1e-12)
    as_tuple = model.eval()(pixel_values=x1, pixel_values_2=x2, return_dict=False)
    assert as_tuple[0].ndim == 0 and as_tuple[0].dtype == torch.float64


def test_pretraining_needs_two_views(tiny_config):
    with pytest.raises(ValueError, match="pixel_values_2"):
        CorInfoMaxForPreTraining(tiny_config)(pixel_values=torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "backbone_params", "projector_params", "projector_keys"),
    [
        # corinfomax-method.md section 2, parameter counts of the official models.
        (
            {},
            23_508_032,
            88_129_536,
            {"0", "1", "3", "4", "6"},
        ),  # the defaults: ImageNet-1K R50, BN projector
        (
            dict(
                backbone="resnet18",
                cifar_stem=True,
                projector_dims=[2048, 2048, 64],
                projector_batchnorm=False,
            ),
            11_168_832,
            5_378_048,
            {"0", "2", "4"},
        ),  # CIFAR-10
        (
            dict(backbone="resnet18", projector_dims=[4096, 4096, 128], projector_batchnorm=False),
            11_176_512,
            19_406_848,
            {"0", "2", "4"},
        ),  # ImageNet-100 R18
    ],
    ids=["imagenet1k-r50", "cifar10-r18", "imagenet100-r18"],
)
def test_architecture_matches_the_official_parameter_counts(
    kwargs, backbone_params, projector_params, projector_keys
):
    with torch.device("meta"):  # no memory, no init
        model = CorInfoMaxModel(CorInfoMaxConfig(**kwargs))
    assert sum(p.numel() for p in model.backbone.parameters()) == backbone_params
    assert sum(p.numel() for p in model.projector.parameters()) == projector_params
    assert {name.split(".")[0] for name, _ in model.projector.named_parameters()} == projector_keys
    last = model.projector[-1]
    assert isinstance(last, nn.Linear) and last.bias is None


# ---------------------------------------------------------------------------------------------------
# Checkpoints


@torch.no_grad()
def test_auto_classes_load_the_pretraining_checkpoint(pretrained, fashion_pixels):
    model, path = pretrained
    x = fashion_pixels[0][:8]
    expected = model.corinfomax(x)

    base = AutoModel.from_pretrained(path).eval()
    assert type(base) is CorInfoMaxModel
    out = base(x)
    for field in ("last_hidden_state", "pooler_output", "projections"):
        assert torch.equal(getattr(out, field), getattr(expected, field)), field

    again = AutoModelForPreTraining.from_pretrained(path)
    assert type(again) is CorInfoMaxForPreTraining
    reference = model.state_dict()
    loaded = again.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key

    classifier, info = AutoModelForImageClassification.from_pretrained(
        path, num_labels=10, output_loading_info=True
    )
    assert type(classifier) is CorInfoMaxForImageClassification
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert all(k.startswith(("corinfomax.projector.", "loss_fn.")) for k in info["unexpected_keys"])
    classifier.eval()
    assert torch.equal(classifier.corinfomax(x).pooler_output, expected.pooler_output)
    assert classifier(x).logits.shape == (8, 10)
    # The new head gets the documented init: N(0, initializer_range), zero bias.
    assert classifier.classifier.weight.std().item() == pytest.approx(
        classifier.config.initializer_range, rel=0.1
    )
    assert torch.equal(classifier.classifier.bias, torch.zeros(10))


@torch.no_grad()
def test_base_model_checkpoint_loads_into_the_classifier(pretrained, fashion_pixels, tmp_path):
    model, path = pretrained
    x = fashion_pixels[0][:4]
    AutoModel.from_pretrained(path).save_pretrained(tmp_path / "base")
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path / "base", num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert all(k.startswith("projector.") for k in info["unexpected_keys"])
    assert torch.equal(classifier.eval().corinfomax(x).pooler_output, model.corinfomax(x).pooler_output)
    # A fine-tuned classifier reloads with its head and labels.
    classifier.config.id2label = {0: "a", 1: "b", 2: "c"}
    classifier.config.label2id = {"a": 0, "b": 1, "c": 2}
    classifier.save_pretrained(tmp_path / "classifier")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier").eval()
    assert again.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(again(x).logits, classifier(x).logits)


def test_loss_state_stays_float64_through_checkpoints_and_casts(pretrained, fashion_pixels, tmp_path):
    model, path = pretrained
    state = {k: getattr(model.loss_fn, k) for k in LOSS_STATE}
    assert int(model.loss_fn.num_updates) == 3
    assert not torch.equal(state["R1"], torch.eye(16, dtype=torch.float64))  # a real, trained state

    with safe_open(path / "model.safetensors", framework="pt") as f:
        for name in LOSS_STATE:
            assert f.get_slice(f"loss_fn.{name}").get_dtype() == "F64"

    def assert_state(m):
        for name, value in state.items():
            assert getattr(m.loss_fn, name).dtype == torch.float64, name
            assert torch.equal(getattr(m.loss_fn, name), value), name
        assert int(m.loss_fn.num_updates) == 3

    assert_state(AutoModelForPreTraining.from_pretrained(path))
    low = AutoModelForPreTraining.from_pretrained(path, dtype=torch.bfloat16)
    assert next(low.parameters()).dtype == torch.bfloat16
    assert_state(low)

    half = copy.deepcopy(model).half()
    assert next(half.parameters()).dtype == torch.float16
    assert_state(half)
    half.save_pretrained(tmp_path / "half")
    assert_state(AutoModelForPreTraining.from_pretrained(tmp_path / "half"))

    bf16 = copy.deepcopy(model).to(torch.bfloat16).train()
    assert_state(bf16)
    x1, x2 = two_views(fashion_pixels[0], 4)
    out = bf16(pixel_values=x1.bfloat16(), pixel_values_2=x2.bfloat16())
    assert out.loss.dtype == torch.float64 and torch.isfinite(out.loss)
    assert bf16.loss_fn.R1.dtype == torch.float64 and int(bf16.loss_fn.num_updates) == 4


# ---------------------------------------------------------------------------------------------------
# Initialisation and backbone variants


def bn_gamma_sum_of_last_norms(model: nn.Module) -> float:
    """Sum of the gammas of the last BN in each residual block (timm zero-initialises them)."""
    return sum(
        block.bn2.weight.sum().item()
        for name in ("layer1", "layer2", "layer3", "layer4")
        for block in getattr(model, name)
    )


@pytest.mark.parametrize(
    ("backbone", "backbone_kwargs"),
    [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})],
)
def test_timm_init_survives_post_init(make_config, backbone, backbone_kwargs):
    torch.manual_seed(0)
    model = CorInfoMaxForPreTraining(
        make_config(backbone=backbone, backbone_kwargs=backbone_kwargs, cifar_stem=False)
    )
    torch.manual_seed(0)
    reference = timm.create_model(backbone, pretrained=False, num_classes=0, **backbone_kwargs)
    ours = model.corinfomax.backbone

    if backbone.startswith("resnet"):
        # transformers 5's generic init would set these gammas to 1 (sum 960 here) and conv std to 0.02.
        assert bn_gamma_sum_of_last_norms(reference) == 0
        assert bn_gamma_sum_of_last_norms(ours) == 0
        assert ours.conv1.weight.std().item() == pytest.approx(reference.conv1.weight.std().item(), rel=1e-6)
        assert ours.layer3[0].conv1.weight.std().item() == pytest.approx(
            reference.layer3[0].conv1.weight.std().item(), rel=1e-6
        )
    else:
        # timm: trunc-normal(0.02) Linear weights, zero biases, cls token ~N(0, 1e-6).
        for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "pos_embed", "cls_token"):
            mine, theirs = ours.get_parameter(name), reference.get_parameter(name)
            assert mine.std().item() == pytest.approx(theirs.std().item(), rel=1e-6), name
        assert ours.cls_token.abs().max().item() < 1e-4
        assert ours.blocks[0].attn.qkv.bias.abs().sum().item() == 0
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(ours_state[key], value), key

    # Our heads: PyTorch's default Linear init for the projector, ones/zeros for its BatchNorm.
    first = model.corinfomax.projector[0]
    bound = 1 / first.in_features**0.5
    assert first.weight.abs().max().item() <= bound
    assert first.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert torch.equal(model.corinfomax.projector[1].weight, torch.ones(64))


def test_cifar_stem(make_config):
    torch.manual_seed(0)
    model = CorInfoMaxModel(make_config(backbone="resnet18"))
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    conv1 = model.backbone.conv1
    assert isinstance(conv1, nn.Conv2d) and conv1.bias is None
    assert (conv1.in_channels, conv1.out_channels) == (3, 64)
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.backbone.maxpool, nn.Identity)
    # Only the stem changes; the rest keeps timm's init exactly.
    for key, value in reference.state_dict().items():
        if not key.startswith("conv1."):
            assert torch.equal(model.backbone.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    assert model(x).last_hidden_state.shape == (2, 512, 4, 4)
    assert CorInfoMaxModel(make_config(backbone="resnet18", cifar_stem=False))(x).last_hidden_state.shape == (
        2,
        512,
        1,
        1,
    )
    # A deep-stem ResNet gets the same single 3x3 convolution, as wide as its stem output.
    deep = CorInfoMaxModel(make_config(backbone="resnet10t")).backbone
    assert isinstance(deep.conv1, nn.Conv2d) and deep.conv1.out_channels == deep.bn1.num_features
    # The timm registration used by timm-format exports builds the same stem.
    registered = timm.create_model("resnet18_cifar_stem", num_classes=0)
    assert registered.conv1.kernel_size == (3, 3) and isinstance(registered.maxpool, nn.Identity)


def test_cifar_stem_keeps_pytorch_default_conv_init(make_config):
    # The official stem is a plain nn.Conv2d: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), ...),
    # and the model's `post_init` must not re-initialise it.
    torch.manual_seed(0)
    weight = CorInfoMaxModel(make_config(backbone="resnet18")).backbone.conv1.weight.detach()
    bound = 1 / (3 * 3 * 3) ** 0.5  # fan_in = in_channels * kernel height * kernel width
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.98 * bound  # 1,728 uniform draws reach the edge
    assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    # kaiming_normal(fan_out) would give std sqrt(2 / (64 * 9)) = 0.059, not 0.111.
    assert abs(weight.std().item() - (2 / (64 * 9)) ** 0.5) > 0.04


def test_cifar_stem_on_a_non_resnet_raises(make_config):
    config = make_config(
        backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 8}, cifar_stem=True
    )
    with pytest.raises(ValueError, match=r"cifar_stem=True needs a ResNet") as excinfo:
        CorInfoMaxModel(config)
    assert "VisionTransformer" in str(excinfo.value) and "cifar_stem=False" in str(excinfo.value)


def test_gradient_checkpointing_uses_timm_and_keeps_gradients(tiny_config, fashion_pixels):
    torch.manual_seed(0)
    model = CorInfoMaxForPreTraining(tiny_config)
    checkpointed = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in 5.x, still what most code calls
        checkpointed.gradient_checkpointing_enable()
    assert checkpointed.corinfomax.backbone.grad_checkpointing is True
    assert model.corinfomax.backbone.grad_checkpointing is False
    # Recomputation in backward runs the checkpointed blocks again.
    calls = []
    checkpointed.corinfomax.backbone.layer2[0].bn1.register_forward_hook(lambda *_: calls.append(1))
    x1, x2 = two_views(fashion_pixels[0])
    losses = []
    for m in (model, checkpointed):
        out = m(pixel_values=x1, pixel_values_2=x2)
        out.loss.backward()
        losses.append(out.loss)
    assert len(calls) == 4  # 2 views forward + 2 recomputations
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("backbone_kwargs", [{}, {"img_size": 32, "patch_size": 8}], ids=["resnet", "vit"])
def test_activation_checkpointing_toggles_timm(make_config, backbone_kwargs):
    backbone = "vit_tiny_patch16_224" if backbone_kwargs else "resnet18"
    model = CorInfoMaxForImageClassification(
        make_config(backbone=backbone, backbone_kwargs=backbone_kwargs, cifar_stem=not backbone_kwargs)
    )
    model.activation_checkpointing_enable()
    assert model.corinfomax.backbone.grad_checkpointing is True
    model.activation_checkpointing_disable()
    assert model.corinfomax.backbone.grad_checkpointing is False


def test_channels_last(pretrained, fashion_pixels):
    model = copy.deepcopy(pretrained[0])
    x1, x2 = two_views(fashion_pixels[0], 4)
    with torch.no_grad():
        expected = model.corinfomax(x1).pooler_output
    model = model.to(memory_format=torch.channels_last)
    assert model.corinfomax.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = model.corinfomax(x1.contiguous(memory_format=torch.channels_last)).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    model.train()
    out = model(
        pixel_values=x1.contiguous(memory_format=torch.channels_last),
        pixel_values_2=x2.contiguous(memory_format=torch.channels_last),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.loss_fn.R1.dtype == torch.float64


def test_frozen_backbone_for_linear_probing(pretrained, fashion_pixels):
    _, path = pretrained
    x, labels = fashion_pixels[0][:8], fashion_pixels[1][:8]
    model = AutoModelForImageClassification.from_pretrained(path, num_labels=10, freeze_backbone=True)
    model.train()
    assert model.training and model.classifier.training
    assert not any(m.training for m in model.corinfomax.modules())  # BatchNorm stays in eval mode
    assert not any(p.requires_grad for p in model.corinfomax.parameters())
    running = {k: v.clone() for k, v in model.corinfomax.state_dict().items() if "running" in k}
    out = model(pixel_values=x, labels=labels)
    out.loss.backward()
    assert all(p.grad is None for p in model.corinfomax.parameters())
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    for key, value in running.items():
        assert torch.equal(model.corinfomax.state_dict()[key], value), key
    # Unfreezing gives a fine-tuning model again.
    model.set_freeze_backbone(False)
    model.train()
    assert model.corinfomax.backbone.bn1.training
    model(pixel_values=x, labels=labels).loss.backward()
    assert model.corinfomax.backbone.conv1.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# Trainer, processors and pipelines


def test_trainer_finetunes_on_fashion_mnist_and_the_pipeline_serves_it(
    make_config, fashion_mnist, fashion_transform, tmp_path
):
    # A standard-stem checkpoint: at 32 px it is several times cheaper per step than the CIFAR stem.
    torch.manual_seed(0)
    CorInfoMaxModel(make_config(cifar_stem=False)).save_pretrained(tmp_path / "ssl")
    train = fashion_mnist["train"]
    names = train.features["label"].names
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / "ssl",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    transform = fashion_transform(model.config)

    def preprocess(batch):
        batch["pixel_values"] = [transform(image) for image in batch["image"]]
        return batch

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        max_steps=20,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,  # the transform needs the `image` column
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train.with_transform(preprocess), data_collator=collate
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"\nTrainer losses: {np.round(losses, 3).tolist()}")
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(10), rel=0.15)  # starts at chance
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])

    finetuned = tmp_path / "finetuned"
    trainer.save_model(str(finetuned))
    classify = pipeline("image-classification", model=str(finetuned))
    images = fashion_mnist["test"]["image"][:4]  # L-mode 28x28: the processor converts and resizes
    predictions = classify(images, top_k=3)
    assert len(predictions) == 4
    processor = AutoImageProcessor.from_pretrained(finetuned)
    with torch.no_grad():
        probabilities = trainer.model.eval()(
            processor(images, return_tensors="pt")["pixel_values"]
        ).logits.softmax(-1)
    for prediction, p in zip(predictions, probabilities):
        assert [entry["label"] for entry in prediction] == [names[i] for i in p.topk(3).indices]
        assert prediction[0]["score"] == pytest.approx(p.max().item(), rel=1e-4)


def test_feature_extraction_pipeline(pretrained, fashion_mnist):
    model, path = pretrained
    image = fashion_mnist["test"]["image"][0]
    extract = pipeline("image-feature-extraction", model=str(path))
    features = np.asarray(extract(image, pool=True))
    assert features.shape == (1, model.corinfomax.num_features)
    processor = AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        expected = model.corinfomax(processor(image, return_tensors="pt")["pixel_values"]).pooler_output
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.asarray(extract(image)).shape == (1, model.corinfomax.num_features, 4, 4)  # the feature map


def test_auto_image_processor_is_a_built_in_processor(pretrained, fashion_mnist):
    model, path = pretrained
    saved = json.loads((path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"].startswith("BitImageProcessor") and "auto_map" not in saved
    processor = AutoImageProcessor.from_pretrained(path)
    assert isinstance(processor, BitImageProcessor)
    assert type(processor).__module__.startswith("transformers.models.bit.")
    assert processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx(model.config.image_mean)
    assert processor.image_std == pytest.approx(model.config.image_std)
    pixels = processor(fashion_mnist["test"]["image"][:2], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)


def test_checkpoint_loads_as_remote_code_without_the_package(pretrained, fashion_pixels, tmp_path):
    model, path = pretrained
    worker = Path(__file__).with_name("remote_code_worker.py")
    x1, x2 = two_views(fashion_pixels[0], 4)
    torch.save({"x1": x1, "x2": x2}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-I", str(worker), str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=False)
    assert remote["refused_without_flag"]
    assert not remote["package_imported"]
    for name, module in remote["modules"].items():
        assert module.startswith("transformers_modules."), (name, module)
    copied = list((tmp_path / "hf_home").rglob("loss.py"))
    assert copied, "the relative import loss.py was not copied with the remote code"

    with torch.no_grad():
        expected = model.corinfomax(x1)
        expected_loss = copy.deepcopy(model).eval()(pixel_values=x1, pixel_values_2=x2).loss
    for field in ("pooler_output", "last_hidden_state", "projections"):
        torch.testing.assert_close(remote[field], getattr(expected, field), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        remote["pretraining_pooler_output"], expected.pooler_output, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        remote["classifier_pooler_output"], expected.pooler_output, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(remote["pretraining_loss"], expected_loss, rtol=1e-6, atol=0)
    assert remote["logits_shape"] == (4, 10)
    for name in LOSS_STATE:
        assert remote["loss_state"][name].dtype == torch.float64
        assert torch.equal(remote["loss_state"][name], getattr(model.loss_fn, name))


def test_the_remote_code_files_import_nothing_of_the_package_beyond_each_other():
    # They travel to the Hub as remote code; the package reaches them (push_to_hub's card through
    # `hub_pusher`), never the other way round.
    import ast
    from pathlib import Path

    import modeling_corinfomax
    from modeling_corinfomax.export import push_model

    package = Path(modeling_corinfomax.__file__).parent
    allowed = {"__future__", "math", "os", "dataclasses", "typing", "torch", "transformers", "timm"}
    siblings = {"configuration_corinfomax", "loss", "modeling_corinfomax"}
    for name in ("modeling_corinfomax.py", "configuration_corinfomax.py", "loss.py"):
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
                assert roots <= allowed, (name, roots)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in siblings, (name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed, (name, node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                raise AssertionError(f"{name} imports a module by name")
    pusher = modeling_corinfomax.CorInfoMaxPreTrainedModel.hub_pusher
    assert (
        pusher is not None and "push_model" in pusher.__doc__ and push_model.__module__.endswith("publishing")
    )
