"""Client side of tests/test_hub.py, each run in a fresh interpreter:

    python tests/hub_clients.py '<json arguments>'

It loads everything by repo id (or, with `"push"` in the arguments, pushes with `push_to_hub`), first
with `import modeling_corinfomax` blocked (a machine without our package), then with the package
imported. The test sets HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE...
in the environment before the interpreter starts, since huggingface_hub reads them at import. Every check prints one `OK <what>` line; any failure
raises (non-zero exit).
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class BlockPackage(importlib.abc.MetaPathFinder):
    """Makes `import modeling_corinfomax` fail, as on a machine without our package (which is
    editable-installed in the test venv)."""

    def find_spec(self, name, path=None, target=None):
        if name == "modeling_corinfomax" or name.startswith("modeling_corinfomax."):
            raise ImportError(f"{name} is blocked: this process simulates a machine without the package")
        return None


def block_package() -> BlockPackage:
    """Install the blocker first in `sys.meta_path` and check that the package cannot be imported."""
    blocker = BlockPackage()
    sys.meta_path.insert(0, blocker)
    try:
        import modeling_corinfomax  # noqa: F401, PLC0415
    except ImportError:
        print("OK package import blocked")
    else:
        raise AssertionError("modeling_corinfomax is still importable: the blocker does not work")
    return blocker


def close(actual, expected, what: str) -> None:
    import torch  # noqa: PLC0415

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    print(f"OK {what}")


def test_image():
    """A fixed square RGB image (square, so that every processor crops the same pixels)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    return Image.fromarray((np.random.RandomState(0).rand(40, 40, 3) * 255).astype("uint8"))


def check_feature_pipeline(repo: str, **kwargs) -> None:
    """`pipeline("image-feature-extraction", pool=True)` equals the model's pooler_output on the
    repo's own image processor."""
    import torch  # noqa: PLC0415
    from transformers import pipeline  # noqa: PLC0415

    extractor = pipeline("image-feature-extraction", model=repo, **kwargs)
    image = test_image()
    features = torch.tensor(extractor(image, pool=True))
    inputs = extractor.image_processor(image, return_tensors="pt")
    with torch.no_grad():
        expected = extractor.model(**inputs).pooler_output
    close(features, expected, f"pipeline image-feature-extraction {repo}")


def load_full_model_remote(a: dict, ref: dict, **kwargs) -> None:
    """The full model through remote code only."""
    import torch  # noqa: PLC0415
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining  # noqa: PLC0415

    model = AutoModel.from_pretrained(a["repo"], trust_remote_code=True, **kwargs).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        out = model(ref["x"])
    close(out.pooler_output, ref["a_features"], "remote-code AutoModel pooler_output")
    close(out.projections, ref["a_projections"], "remote-code AutoModel projections")
    pretraining = AutoModelForPreTraining.from_pretrained(a["repo"], trust_remote_code=True, **kwargs)
    close(pretraining.loss_fn.R1, ref["a_R1"], "remote-code AutoModelForPreTraining loss state")
    classifier = AutoModelForImageClassification.from_pretrained(
        a["repo"], trust_remote_code=True, num_labels=3, **kwargs
    ).eval()
    with torch.no_grad():
        assert classifier(ref["x"]).logits.shape == (2, 3)
        close(
            classifier.corinfomax(ref["x"]).pooler_output,
            ref["a_features"],
            "remote-code classifier backbone",
        )


def without_package(args: dict) -> None:
    """No package: the full model loads with trust_remote_code only; the standard-stem timm backbone
    (private, on a branch) loads in timm and transformers with no custom code at all."""
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import AutoModel  # noqa: PLC0415

    ref = torch.load(args["reference"])
    a, b = args["a"], args["b"]
    try:
        AutoModel.from_pretrained(a["repo"])
    except ValueError as error:
        assert "trust_remote_code" in str(error), error
        print("OK without trust_remote_code: refused")
    else:
        raise AssertionError("custom code loaded without trust_remote_code=True")
    load_full_model_remote(a, ref)
    check_feature_pipeline(a["repo"], trust_remote_code=True)

    backbone = timm.create_model(f"hf-hub:{b['backbone_repo']}@{b['revision']}", pretrained=True).eval()
    with torch.no_grad():
        close(backbone(ref["x"]), ref["b_features"], "timm hf-hub standard stem, no package")
        wrapper = AutoModel.from_pretrained(b["backbone_repo"], revision=b["revision"]).eval()
        assert type(wrapper).__name__ == "TimmWrapperModel", type(wrapper)
        close(wrapper(ref["x"]).pooler_output, ref["b_features"], "TimmWrapper standard stem, no package")


def with_package(args: dict) -> None:
    """With the package imported: no remote code; the CIFAR-stem timm backbone loads everywhere."""
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import AutoModel, AutoModelForImageClassification  # noqa: PLC0415

    import modeling_corinfomax  # noqa: F401, PLC0415

    ref = torch.load(args["reference"])
    a, b = args["a"], args["b"]
    with torch.no_grad():
        model = AutoModel.from_pretrained(a["repo"]).eval()
        assert type(model).__module__ == "modeling_corinfomax.modeling_corinfomax", type(model).__module__
        close(model(ref["x"]).pooler_output, ref["a_features"], "package AutoModel without trust_remote_code")

        backbone = timm.create_model(f"hf-hub:{a['backbone_repo']}", pretrained=True).eval()
        assert backbone.pretrained_cfg["architecture"].endswith("_cifar_stem")
        close(backbone(ref["x"]), ref["a_features"], "timm hf-hub CIFAR stem")
        wrapper = AutoModel.from_pretrained(a["backbone_repo"]).eval()
        assert type(wrapper).__name__ == "TimmWrapperModel", type(wrapper)
        close(wrapper(ref["x"]).pooler_output, ref["a_features"], "TimmWrapper AutoModel CIFAR stem")
        classifier = AutoModelForImageClassification.from_pretrained(a["backbone_repo"], num_labels=4).eval()
        assert type(classifier).__name__ == "TimmWrapperForImageClassification", type(classifier)
        assert classifier(ref["x"]).logits.shape == (2, 4)
        print("OK TimmWrapper AutoModelForImageClassification")
        check_feature_pipeline(a["backbone_repo"])

        private = AutoModel.from_pretrained(b["repo"], revision=b["revision"]).eval()
        close(private(ref["x"]).pooler_output, ref["b_features"], "private repo on a branch")


def load_everything(args: dict) -> None:
    """First as a machine without our package (remote code, plain timm), then with it imported."""
    blocker = block_package()
    without_package(args)
    sys.meta_path.remove(blocker)
    with_package(args)


def push_everything(args: dict) -> None:
    """`push_to_hub` on our models: as remote code without the package (transformers' generic card), then
    with the package (our card and files) for a pretraining model with its run's files, on a branch of a
    new repo, and for a classifier with an explicit token, private, with an extra tag."""
    import os  # noqa: PLC0415

    push, checkpoints = args["push"], args["checkpoints"]
    blocker = block_package()
    from transformers import AutoModelForImageClassification  # noqa: PLC0415

    remote = AutoModelForImageClassification.from_pretrained(
        args["a"]["repo"], trust_remote_code=True, num_labels=3
    )
    assert type(remote).__module__.startswith("transformers_modules."), type(remote).__module__
    remote.push_to_hub(push["remote_repo"])
    print("OK remote-code push_to_hub")
    sys.meta_path.remove(blocker)

    from modeling_corinfomax import CorInfoMaxForImageClassification, CorInfoMaxForPreTraining  # noqa: PLC0415

    model = CorInfoMaxForPreTraining.from_pretrained(f"{checkpoints}/a")
    commit = model.push_to_hub(
        push["repo"], revision=push["revision"], run_dir=f"{checkpoints}/a", commit_message="push_to_hub test"
    )
    classifier = CorInfoMaxForImageClassification.from_pretrained(f"{checkpoints}/b", num_labels=3)
    classifier.push_to_hub(
        push["classifier_repo"], private=True, token=os.environ["PUSH_TOKEN"], tags=["linear-probe"]
    )
    print(json.dumps({"oid": commit.oid}))


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    (push_everything if "push" in arguments else load_everything)(arguments)
