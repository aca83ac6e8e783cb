"""Publishing to a Hub and loading by repo id, against a loopback Hub (tests/hub_stub.py).

The stub runs in this process; every Hub client runs in a fresh subprocess, because huggingface_hub
reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import and this process is offline (conftest.py).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_stub import HubStub
from huggingface_hub import ModelCard
from PIL import Image

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxForPreTraining

REPO_ROOT = Path(__file__).resolve().parents[1]
# Unique per run, so that finding it anywhere can only mean it leaked.
TOKEN = "hf_stub" + secrets.token_hex(16)
A = {"repo": "org/tiny-cifar", "backbone_repo": "org/tiny-cifar-timm"}
B = {"repo": "org/tiny-std", "backbone_repo": "org/tiny-std-timm", "revision": "v1"}
# push_to_hub: A's checkpoint to a branch of a new repo, B's as a classifier, A's classifier as remote code.
PUSH = {
    "repo": "user/tiny-cifar",
    "revision": "v2",
    "classifier_repo": "user/tiny-classifier",
    "remote_repo": "user/remote-classifier",
}
CODE_FILES = ("configuration_corinfomax.py", "modeling_corinfomax.py", "loss.py")


@pytest.fixture(scope="module")
def hub():
    with HubStub(token=TOKEN) as stub:
        yield stub


@pytest.fixture(scope="module")
def outputs() -> list[str]:
    """Everything the subprocesses printed, for the token-leak check."""
    return []


def client_env(hub: HubStub, home: Path, *, token: bool = True, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9" if offline else hub.endpoint,  # offline: nothing listens there
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    if token:
        env["HF_TOKEN"] = TOKEN
    return env


def run(command: list[str], env: dict, outputs: list[str], cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    outputs.append(result.stdout + result.stderr)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A: CIFAR-stem test_resnet with eval_results.json, training_args.json (holding a hub_token, which
    must never be published) and training.png. B: standard stem, no extras. Plus the reference outputs."""
    root = tmp_path_factory.mktemp("hub_checkpoints")
    x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    reference = {"x": x}
    for name, cifar_stem in (("a", True), ("b", False)):
        torch.manual_seed(0)
        config = CorInfoMaxConfig(
            backbone="test_resnet", cifar_stem=cifar_stem, projector_dims=[32, 16], image_size=32
        )
        model = CorInfoMaxForPreTraining(config)
        model(
            pixel_values=torch.randn(8, 3, 32, 32), pixel_values_2=torch.randn(8, 3, 32, 32)
        )  # BN + loss state
        model.eval().save_pretrained(root / name)
        with torch.no_grad():
            out = model.corinfomax(x)
        reference[f"{name}_features"] = out.pooler_output
        reference[f"{name}_projections"] = out.projections
        reference[f"{name}_R1"] = model.loss_fn.R1.clone()
    (root / "a" / "eval_results.json").write_text(
        json.dumps(
            {
                "knn_top1": 61.5,
                "linear_top1": 66.25,
                "knn_top1_random_init": 20.0,
                "linear_top1_raw_pixels": 30.5,
                "global_step": 12,
                "dataset": {"name": "uoft-cs/cifar10", "config": None, "split": "test"},
                "protocols": {
                    "knn": {"k": 20, "temperature": 0.07},
                    "linear": {"method": "logistic regression"},
                },
            }
        )
    )
    args = {"dataset_name": "uoft-cs/cifar10", "learning_rate": 0.5, "hub_token": TOKEN, "seed": 0}
    (root / "a" / "training_args.json").write_text(json.dumps(args))
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(root / "a" / "training.png")
    torch.save(reference, root / "reference.pt")
    return root


@pytest.fixture(scope="module")
def push_home(tmp_path_factory) -> Path:
    """The HF_HOME of the publishing clients."""
    return tmp_path_factory.mktemp("push_home")


@pytest.fixture(scope="module")
def published(hub, checkpoints, outputs, push_home):
    """A pushed with hub/push.py (token from HF_TOKEN); B with `publish(...)` (explicit token, private,
    on branch v1)."""
    home = push_home
    run(
        [sys.executable, str(REPO_ROOT / "hub" / "push.py"), str(checkpoints / "a"), "--repo_id", A["repo"]],
        client_env(hub, home),
        outputs,
        cwd=home,
    )
    # Published twice: the second publish, from a checkpoint without eval_results.json, removes it.
    (checkpoints / "b" / "eval_results.json").write_text(json.dumps({"knn_top1": 10.0}))
    code = (
        "import json, os, sys\n"
        "from modeling_corinfomax.export import publish\n"
        "kwargs = dict(private=True, revision='v1', token=os.environ['PUBLISH_TOKEN'])\n"
        "publish(sys.argv[1], sys.argv[2], **kwargs)\n"
        "os.remove(os.path.join(sys.argv[1], 'eval_results.json'))\n"
        "print(json.dumps(publish(sys.argv[1], sys.argv[2], **kwargs)))\n"
    )
    env = {**client_env(hub, home, token=False), "PUBLISH_TOKEN": TOKEN}
    result = json.loads(
        run([sys.executable, "-c", code, str(checkpoints / "b"), B["repo"]], env, outputs, home)
    )
    assert result["backbone_repo_id"] == B["backbone_repo"]
    return result


@pytest.fixture(scope="module")
def client_home(tmp_path_factory) -> Path:
    """The HF_HOME the loading clients fill, then reused offline."""
    return tmp_path_factory.mktemp("client_home")


def run_client(hub, home, outputs, checkpoints, *, offline: bool = False) -> str:
    args = json.dumps({"reference": str(checkpoints / "reference.pt"), "a": A, "b": B})
    command = [sys.executable, str(REPO_ROOT / "tests" / "hub_clients.py"), args]
    return run(command, client_env(hub, home, offline=offline), outputs, cwd=home)


@pytest.fixture(scope="module")
def loaded(hub, published, client_home, outputs, checkpoints) -> str:
    """A fresh interpreter loads everything by repo id, without and then with the package."""
    return run_client(hub, client_home, outputs, checkpoints)


REMOTE_CHECKS = (
    "package import blocked",
    "without trust_remote_code: refused",
    "remote-code AutoModel pooler_output",
    "remote-code AutoModelForPreTraining loss state",
    "remote-code classifier backbone",
    "pipeline image-feature-extraction org/tiny-cifar",
    "timm hf-hub standard stem, no package",
    "TimmWrapper standard stem, no package",
)
PACKAGE_CHECKS = (
    "package AutoModel without trust_remote_code",
    "timm hf-hub CIFAR stem",
    "TimmWrapper AutoModel CIFAR stem",
    "TimmWrapper AutoModelForImageClassification",
    "pipeline image-feature-extraction org/tiny-cifar-timm",
    "private repo on a branch",
)


def test_push_writes_both_repos(hub, published):
    full, backbone = hub.files(A["repo"]), hub.files(A["backbone_repo"])
    assert {
        "config.json",
        "model.safetensors",
        "configuration_corinfomax.py",
        "modeling_corinfomax.py",
        "loss.py",
        "preprocessor_config.json",
        "README.md",
        "training.png",
        "eval_results.json",
        "training_args.json",
    } <= set(full)
    assert {"config.json", "model.safetensors", "README.md", "training.png"} <= set(backbone)
    assert set(json.loads(full["config.json"])["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForPreTraining",
        "AutoModelForImageClassification",
    }
    timm_config = json.loads(backbone["config.json"])
    assert timm_config["architecture"] == "test_resnet_cifar_stem" and timm_config["num_classes"] == 0
    assert "num_classes" not in timm_config.get("model_args", {})
    # weights and images went through LFS, as on the Hub
    commit = hub.repos[A["repo"]].commits[hub.repos[A["repo"]].branches["main"]]
    assert commit["model.safetensors"].lfs and commit["training.png"].lfs and not commit["config.json"].lfs

    card = ModelCard(full["README.md"].decode())
    assert card.data.library_name == "transformers" and "corinfomax" in card.data.tags
    results = card.data.eval_results
    assert sorted(r.metric_value for r in results) == [61.5, 66.25]  # ours only, baselines are in the text
    assert "| 20.00 |" in card.text and "30.50" in card.text and "(training.png)" in card.text
    backbone_card = ModelCard(backbone["README.md"].decode())
    assert backbone_card.data.library_name == "timm" and backbone_card.data.base_model == A["repo"]
    assert "import modeling_corinfomax" in backbone_card.text
    assert hub.unhandled == []


def test_publish_private_repo_on_a_branch(hub, published):
    for repo_id in (B["repo"], B["backbone_repo"]):
        repo = hub.repos[repo_id]
        assert repo.private
        assert set(hub.files(repo_id, "main")) == {".gitattributes"}
        assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files(repo_id, B["revision"]))
    assert published["model_commit"]["oid"] == hub.repos[B["repo"]].branches[B["revision"]]
    # republishing mirrors the checkpoint: the first publish's eval_results.json is gone
    assert "eval_results.json" not in hub.files(B["repo"], B["revision"])
    assert any("eval_results.json" in commit for commit in hub.repos[B["repo"]].commits.values())
    with pytest.raises(urllib.error.HTTPError) as error:  # anonymous access to a private repo
        urllib.request.urlopen(f"{hub.endpoint}/{B['repo']}/resolve/v1/config.json", timeout=10)
    assert error.value.code == 401


@pytest.fixture(scope="module")
def pushed(hub, published, checkpoints, outputs, push_home) -> dict:
    """`push_to_hub` on our models (tests/hub_clients.py `push_everything`), after A and B were published."""
    args = json.dumps({"a": A, "b": B, "checkpoints": str(checkpoints), "push": PUSH})
    command = [sys.executable, str(REPO_ROOT / "tests" / "hub_clients.py"), args]
    env = {**client_env(hub, push_home), "PUSH_TOKEN": TOKEN}
    printed = run(command, env, outputs, cwd=push_home)
    assert "OK remote-code push_to_hub" in printed
    return json.loads(printed.strip().splitlines()[-1])


def test_push_to_hub_uploads_what_publish_uploads(hub, published, pushed):
    full = hub.files(A["repo"])  # written by hub/push.py (`publish`) from the same checkpoint
    files = hub.files(PUSH["repo"], PUSH["revision"])
    assert hub.repos[PUSH["repo"]].branches[PUSH["revision"]] == pushed["oid"]
    assert set(hub.files(PUSH["repo"], "main")) == {".gitattributes"}  # the branch got the commit
    assert set(files) == set(full)
    for name in set(full) - {"README.md", "config.json"}:  # code files, weights, processor, run files
        assert files[name] == full[name], name
    assert json.loads(files["config.json"]) == json.loads(full["config.json"])
    # The card is publish's, but for the repo it was pushed to and without the link to a timm backbone.
    backbone_link = (
        f" The backbone alone, in timm format (no custom code): "
        f"[{A['backbone_repo']}]({hub.endpoint}/{A['backbone_repo']})."
    )
    published_card = full["README.md"].decode()
    assert backbone_link in published_card
    expected = published_card.replace(backbone_link, "").replace(A["repo"], PUSH["repo"])
    assert files["README.md"].decode() == expected
    card = ModelCard(expected)
    assert {"corinfomax", "custom_code"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert sorted(r.metric_value for r in card.data.eval_results) == [61.5, 66.25]
    assert "## Evaluation" in card.text and "(training.png)" in card.text
    assert hub.unhandled == []


def test_push_to_hub_of_a_classifier_is_private_with_our_card_and_code(hub, pushed):
    repo = hub.repos[PUSH["classifier_repo"]]
    assert repo.private
    files = hub.files(PUSH["classifier_repo"])
    assert {*CODE_FILES, "config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["CorInfoMaxForImageClassification"] and len(config["auto_map"]) == 4
    card = ModelCard(files["README.md"].decode())
    assert card.data.tags[-1] == "linear-probe" and {"corinfomax", "custom_code"} <= set(card.data.tags)
    assert "backbone and a linear classification head" in card.text
    assert card.data.eval_results is None and "## Evaluation" not in card.text  # no run_dir: no results
    for name in CODE_FILES:
        assert files[name] == (REPO_ROOT / "modeling_corinfomax" / name).read_bytes(), name


def test_push_to_hub_as_remote_code_falls_back_to_the_generic_card(hub, pushed):
    files = hub.files(PUSH["remote_repo"])
    assert {*CODE_FILES, "config.json", "model.safetensors"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert {"corinfomax", "custom_code"} <= set(card.data.tags)
    assert "## How to use" not in card.text  # transformers' template, not ours


def test_remote_code_loads_without_the_package(loaded):
    for check in REMOTE_CHECKS:
        assert f"OK {check}" in loaded


def test_loads_by_repo_id_with_the_package(loaded):
    for check in PACKAGE_CHECKS:
        assert f"OK {check}" in loaded


def test_offline_from_a_prefilled_cache(hub, loaded, client_home, outputs, checkpoints):
    seen = len(hub.requests)
    printed = run_client(hub, client_home, outputs, checkpoints, offline=True)
    for check in REMOTE_CHECKS + PACKAGE_CHECKS:
        assert f"OK {check}" in printed
    assert len(hub.requests) == seen  # nothing reached the Hub


def test_token_is_never_written_or_printed(hub, published, pushed, loaded, push_home, client_home, outputs):
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}  # the token was used...
    needle = TOKEN.encode()
    stored = [
        f.data for repo in hub.repos.values() for commit in repo.commits.values() for f in commit.values()
    ]
    assert not any(needle in data for data in stored + list(hub.lfs_objects.values()))  # ...never uploaded
    assert all(TOKEN not in text for text in outputs)  # ...never printed
    for path in [*push_home.rglob("*"), *client_home.rglob("*")]:  # ...never cached
        assert not path.is_file() or needle not in path.read_bytes(), path
