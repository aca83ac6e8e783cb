"""ONNX export of the encoder (modeling_corinfomax/export/onnx.py, hub/export_onnx.py, `corinfomax-push --onnx`):
onnxruntime on real Fashion-MNIST images at two batch sizes agrees with PyTorch's `pooler_output`."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image

ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed: pip install 'corinfomax[onnx]'"
)

from modeling_corinfomax import (  # noqa: E402
    CorInfoMaxConfig,
    CorInfoMaxForImageClassification,
    CorInfoMaxForPreTraining,
)
from modeling_corinfomax.cli import export_onnx as export_onnx_cli  # noqa: E402
from modeling_corinfomax.cli import push  # noqa: E402
from modeling_corinfomax.errors import ConfigurationError  # noqa: E402
from modeling_corinfomax.export import export_timm_backbone, publishing  # noqa: E402
from modeling_corinfomax.export.onnx import export_onnx, verify_onnx  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max over rows of ||ours - reference|| / ||reference||."""
    return ((ours - reference).norm(dim=1) / reference.norm(dim=1)).max().item()


@functools.cache
def onnx_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata_map(path: Path) -> dict[str, str]:
    return onnx_session(path).get_modelmeta().custom_metadata_map


def run_onnx(path: Path, pixels: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(onnx_session(path).run(["embedding"], {"pixel_values": pixels.numpy()})[0])


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    """The command as a user runs it, on a copy of the tiny saved model: `(folder, completed process)`."""
    folder = tmp_path_factory.mktemp("onnx") / "corinfomax-tiny"
    shutil.copytree(pretrained[1], folder)
    result = subprocess.run(
        [sys.executable, "hub/export_onnx.py", str(folder), "--verify"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return folder, result


def test_onnx_embedding_matches_pytorch_on_real_images_at_any_batch(exported, pretrained, fashion_pixels):
    folder, result = exported
    assert result.returncode == 0, result.stderr[-4000:]
    model = pretrained[0]
    path = folder / "onnx" / "model.onnx"
    assert path.is_file(), "the default output is <folder>/onnx/model.onnx"
    pixels = fashion_pixels[0]

    session = onnx_session(path)
    (batch_axis, *_), (out_batch_axis, dim) = session.get_inputs()[0].shape, session.get_outputs()[0].shape
    assert isinstance(batch_axis, str) and isinstance(out_batch_axis, str), "the batch axis must be dynamic"
    assert dim == model.corinfomax.num_features == 512, "the embedding is the pre-projector pooler_output"

    for batch in (pixels[:3], pixels[10:17]):
        ours = run_onnx(path, batch)
        with torch.no_grad():
            out = model.corinfomax(pixel_values=batch)
        assert ours.shape == out.pooler_output.shape == (len(batch), 512)
        assert out.projections.shape[1] == 16  # so the projector's output could not have passed either
        assert relative_error(ours, out.pooler_output) <= TOLERANCE

    # The bound is tight enough to catch a wrong export: the same network three SGD steps earlier, or its
    # BatchNorm in training mode (batch statistics), are both far outside it.
    torch.manual_seed(0)
    untrained = CorInfoMaxForPreTraining(CorInfoMaxConfig(**tiny_config_kwargs())).eval()  # as `pretrained`
    training_mode = copy.deepcopy(model.corinfomax).train()
    batch = pixels[10:17]
    with torch.no_grad():
        for wrong in (untrained.corinfomax(pixel_values=batch), training_mode(pixel_values=batch)):
            assert relative_error(run_onnx(path, batch), wrong.pooler_output) > 10 * TOLERANCE
    check = verify_onnx(untrained, path, batch[:3], batch_size=3, seconds=0)
    assert check["max_relative_error"] > 10 * TOLERANCE

    # What a consumer needs to preprocess is in the file, as onnxruntime reads it.
    metadata = {
        k: json.loads(metadata_map(path)[k])
        for k in ("image_size", "embedding_dim", "image_mean", "image_std")
    }
    assert metadata["image_size"] == 32 and metadata["embedding_dim"] == 512
    assert (
        metadata["image_mean"] == model.config.image_mean and metadata["image_std"] == model.config.image_std
    )


def test_export_command_verifies_and_reports_errors_in_one_line(exported):
    folder, result = exported
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["onnx"] == str(folder / "onnx" / "model.onnx")
    assert report["num_images"] == 32 and report["max_relative_error"] <= TOLERANCE
    assert report["opset"] == 18 and report["image_size"] == 32 and report["embedding_dim"] == 512
    assert report["onnxruntime_images_per_s"] > 0 and report["torch_images_per_s"] > 0

    # The same main() in-process (a second interpreter would only repeat the imports).
    with pytest.raises(SystemExit) as exit_info:
        export_onnx_cli.main([str(folder / "no-such-model")])
    message = str(exit_info.value.code)
    assert message.startswith("error: cannot load") and "\n" not in message


def test_export_errors_say_what_to_do(pretrained, monkeypatch, tmp_path):
    # torch.export's exporter writes opset 18+ (asked for 17 it would write 18): refused before exporting.
    with pytest.raises(ConfigurationError, match="--no_dynamo"):
        export_onnx(pretrained[0], tmp_path / "model.onnx", opset=17)
    assert not (tmp_path / "model.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` does when absent
    with pytest.raises(ConfigurationError, match=r"pip install 'corinfomax\[onnx\]'"):
        verify_onnx(tmp_path, tmp_path / "model.onnx", torch.zeros(1, 3, 32, 32))


def test_classifier_and_timm_format_folders_export_the_same_embedding(pretrained, fashion_pixels, tmp_path):
    """Other folders: a classifier fine-tuned from the checkpoint, and the timm-format backbone, which loads as
    transformers' TimmWrapperModel; both embed as the checkpoint's pooler_output (exported with the
    TorchScript exporter, `dynamo=False`, the faster one)."""
    model, checkpoint = pretrained
    classifier = CorInfoMaxForImageClassification.from_pretrained(checkpoint, num_labels=3)
    classifier.save_pretrained(tmp_path / "classifier")
    folders = {
        "corinfomax": tmp_path / "classifier",
        "timm_wrapper": export_timm_backbone(model, tmp_path / "timm"),
    }
    batch = fashion_pixels[0][:5]
    with torch.no_grad():
        reference = model.corinfomax(pixel_values=batch).pooler_output
    for model_type, folder in folders.items():
        path = export_onnx(folder, dynamo=False)
        assert path == folder / "onnx" / "model.onnx"
        assert metadata_map(path)["model_type"] == model_type
        assert relative_error(run_onnx(path, batch), reference) <= TOLERANCE


def test_push_dry_run_with_onnx_adds_the_encoder_to_the_model_repo(
    pretrained, fashion_mnist, fashion_pixels, tmp_path, monkeypatch
):
    model, checkpoint = pretrained
    # The default exporter is tested above; here the file's place matters, and TorchScript's export is ~10x
    # cheaper.
    monkeypatch.setattr(publishing, "export_onnx", functools.partial(export_onnx, dynamo=False))
    out = tmp_path / "out"
    assert push.main([str(checkpoint), "--repo_id", "org/tiny", "--onnx", "--dry_run", str(out)]) == 0
    path = out / "org--tiny" / "onnx" / "model.onnx"
    assert path.is_file()
    assert not (out / "org--tiny-timm" / "onnx").exists(), "the timm repo stays timm's format"
    batch = fashion_pixels[0][:4]
    with torch.no_grad():
        reference = model.corinfomax(pixel_values=batch).pooler_output
    assert relative_error(run_onnx(path, batch), reference) <= TOLERANCE

    # The card's onnxruntime snippet, run as written on a real image, with the Hub download pointed at the folder.
    folder = out / "org--tiny"
    card = (folder / "README.md").read_text()
    assert "onnx" in card.split("---")[1]  # a tag in the front matter
    snippet = card.split("```python\nimport onnxruntime as ort\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"org/tiny", "<commit sha>"', f"{str(folder)!r}, None")
    monkeypatch.setattr(
        "huggingface_hub.hf_hub_download", lambda repo, name, revision: str(Path(repo) / name)
    )
    monkeypatch.chdir(tmp_path)
    image = fashion_mnist["train"][0]["image"]
    image.save("image.jpg")
    namespace = {"ort": ort}
    exec(snippet, namespace)  # noqa: S102
    pixels = namespace["processor"](Image.open("image.jpg"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.corinfomax(pixel_values=pixels).pooler_output
    assert namespace["embedding"].shape == (1, model.corinfomax.num_features)
    assert relative_error(torch.from_numpy(namespace["embedding"]), expected) <= TOLERANCE
