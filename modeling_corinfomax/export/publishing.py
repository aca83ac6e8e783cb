"""Publishing: the full model's folder (`write_model_folder`), both artifacts of a checkpoint
(`prepare_artifacts`), their upload to two Hub repos (`publish`), and one model to one repo as
`PreTrainedModel.push_to_hub` does (`push_model`, what our models' `push_to_hub` calls)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, HfApi, get_token

from ..errors import ConfigurationError, PublishError
from ..reporting import EVAL_RESULTS_NAME, TRAINING_ARGS_NAME
from .cards import build_backbone_card, build_model_card, card_context
from .common import BACKBONE_REPO_SUFFIX, DEFAULT_LICENSE, hub_url
from .onnx import ONNX_FILE, export_onnx
from .timm_format import export_timm_backbone, load_saved_model


def write_model_folder(
    model: torch.nn.Module,
    model_dir: str | os.PathLike,
    repo_id: str,
    backbone_repo_id: str | None = None,
    run_dir: str | os.PathLike | None = None,
    *,
    license: str = DEFAULT_LICENSE,
    tags: list[str] | None = None,
    max_shard_size: int | str | None = "50GB",
    onnx: bool = False,
) -> Path:
    """Write the full model's folder to upload: `save_pretrained` (weights, config with the `auto_map` of
    every head, the code files, `preprocessor_config.json`), the run's `training_args.json`,
    `eval_results.json` and pictures when `run_dir` holds them (secrets removed), the model card, and with
    `onnx` the encoder as `onnx/model.onnx` (`export.onnx.export_onnx`).

    Args:
        model: a `CorInfoMaxModel`, `CorInfoMaxForPreTraining` or `CorInfoMaxForImageClassification`.
        model_dir: the folder to write (created if needed).
        repo_id: `org/name` the folder is for (named in the card).
        backbone_repo_id: the timm-format backbone's repo, linked from the card; None for no link.
        run_dir: a training output folder (train.py's `--output_dir`) whose files describe these weights.
        license: the card's license.
        tags: extra card tags, after ours.
        max_shard_size: passed to `save_pretrained`.
        onnx: also export the encoder to ONNX (needs `pip install 'corinfomax[onnx]'`).

    Returns:
        `model_dir` as a `Path`.
    """
    if run_dir is not None and not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"run_dir={str(run_dir)!r} is not a folder: pass the training output folder (train.py's "
            "--output_dir) whose training_args.json and eval_results.json describe these weights, or None."
        )
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir, max_shard_size=max_shard_size)
    training_args, results, figures = card_context(run_dir)
    if training_args is not None:
        (model_dir / TRAINING_ARGS_NAME).write_text(json.dumps(training_args, indent=2, default=str) + "\n")
    if results is not None:
        (model_dir / EVAL_RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
    for name in figures:
        shutil.copyfile(Path(run_dir) / name, model_dir / name)
    card = build_model_card(model, repo_id, backbone_repo_id, run_dir, license=license, onnx=onnx)
    card.data.tags = [*card.data.tags, *(tag for tag in tags or [] if tag not in card.data.tags)]
    card.save(model_dir / "README.md")
    if onnx:
        export_onnx(model, model_dir / ONNX_FILE)
    return model_dir


def prepare_artifacts(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    backbone_repo_id: str,
    model_dir: str | os.PathLike,
    backbone_dir: str | os.PathLike,
    *,
    license: str = DEFAULT_LICENSE,
    onnx: bool = False,
) -> tuple[Path, Path]:
    """Write the two folders to upload: the full model (`write_model_folder`: `save_pretrained` with code
    files, `auto_map` for every head, `preprocessor_config.json`, README, the run's `training_args.json`,
    `eval_results.json` and its pictures, and with `onnx` the encoder as `onnx/model.onnx`) and the
    timm-format backbone with its README and the pictures."""
    checkpoint_dir, backbone_dir = Path(checkpoint_dir), Path(backbone_dir)
    model = load_saved_model(checkpoint_dir)
    model_dir = write_model_folder(
        model, model_dir, repo_id, backbone_repo_id, checkpoint_dir, license=license, onnx=onnx
    )
    export_timm_backbone(
        model, backbone_dir, license=license, description=f"CorInfoMax backbone of {repo_id}"
    )
    for name in card_context(checkpoint_dir)[2]:
        shutil.copyfile(checkpoint_dir / name, backbone_dir / name)
    build_backbone_card(model, backbone_repo_id, repo_id, checkpoint_dir, license=license).save(
        backbone_dir / "README.md"
    )
    return model_dir, backbone_dir


def assert_no_secret(folders: list[Path], secret: str | None) -> None:
    """Raise if `secret` (a token) appears in any file under `folders`; the message never shows it."""
    if not secret:
        return
    needle = secret.encode()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if needle in path.read_bytes():
                raise PublishError(
                    f"{path} contains the Hub token; refusing to upload it. Remove the token from the "
                    "checkpoint's files (training_args.json, ...) and publish again."
                )


def _validate_repo_id(repo_id: str, flag: str) -> None:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ConfigurationError(f"{flag}={repo_id!r} is not a Hub repo id: use 'org/name' (or 'user/name').")


def publish(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    backbone_repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    commit_message: str = "Upload CorInfoMax checkpoint",
    onnx: bool = False,
) -> dict:
    """Publish a CorInfoMax checkpoint as two Hub repos: the full model and its timm-format backbone.

    Args:
        checkpoint_dir: a `save_pretrained` folder of a CorInfoMax model (train.py's `--output_dir`);
            its `training_args.json`, `eval_results.json` and pictures, if present, go into the cards.
        repo_id: `org/name` of the full model (transformers, remote code).
        backbone_repo_id: `org/name` of the timm-format backbone; defaults to `<repo_id>-timm`.
        private: create the repos as private (existing repos keep their visibility).
        token: a Hub token with write access; defaults to `HF_TOKEN` / the stored login. It is never
            written to a file or printed; publishing refuses to upload a file that contains it.
        dry_run_dir: write the two folders to `<dry_run_dir>/<org>--<name>` and
            `<dry_run_dir>/<org>--<name>-timm` instead of uploading.
        revision: branch to commit to (created from `main` if missing); default `main`. After the commit
            the branch holds exactly the published files (others are deleted; `.gitattributes` stays).
        commit_message: the commit message of both uploads.
        onnx: the full model's repo also gets the encoder as `onnx/model.onnx` (`export.onnx.export_onnx`;
            needs `pip install 'corinfomax[onnx]'`).

    Returns:
        `{"repo_id", "backbone_repo_id", "model_dir", "backbone_dir", "model_commit", "backbone_commit",
        "model_url", "backbone_url"}`; the folders are set for a dry run, the commits (`CommitInfo`
        URLs and ids) for an upload.
    """
    backbone_repo_id = backbone_repo_id or f"{repo_id}{BACKBONE_REPO_SUFFIX}"
    _validate_repo_id(repo_id, "repo_id")
    _validate_repo_id(backbone_repo_id, "backbone_repo_id")
    if backbone_repo_id == repo_id:
        raise ConfigurationError(
            f"backbone_repo_id must differ from repo_id ({repo_id!r}): both artifacts have a config.json. "
            f"Leave it unset for {repo_id + BACKBONE_REPO_SUFFIX!r}."
        )
    secret = token or os.environ.get("HF_TOKEN")
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "backbone_repo_id": backbone_repo_id,
        "model_dir": None,
        "backbone_dir": None,
        "model_commit": None,
        "backbone_commit": None,
        "model_url": hub_url(repo_id),
        "backbone_url": hub_url(backbone_repo_id),
    }
    if dry_run_dir is not None:
        root = Path(dry_run_dir)
        model_dir, backbone_dir = (root / r.replace("/", "--") for r in (repo_id, backbone_repo_id))
        for folder in (model_dir, backbone_dir):
            if folder.exists() and any(folder.iterdir()):
                raise FileExistsError(f"{folder} is not empty; remove it or choose another --dry_run folder.")
        prepare_artifacts(checkpoint_dir, repo_id, backbone_repo_id, model_dir, backbone_dir, onnx=onnx)
        assert_no_secret([model_dir, backbone_dir], secret)
        result.update(model_dir=str(model_dir), backbone_dir=str(backbone_dir))
        return result

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="corinfomax-publish-") as tmp:
        model_dir, backbone_dir = Path(tmp) / "model", Path(tmp) / "backbone"
        prepare_artifacts(checkpoint_dir, repo_id, backbone_repo_id, model_dir, backbone_dir, onnx=onnx)
        assert_no_secret([model_dir, backbone_dir], secret)
        for key, target, folder in (
            ("model", repo_id, model_dir),
            ("backbone", backbone_repo_id, backbone_dir),
        ):
            api.create_repo(target, private=private, exist_ok=True, repo_type="model")
            if revision and revision != "main":
                api.create_branch(target, branch=revision, exist_ok=True, repo_type="model")
            # The branch mirrors the folder: files of an earlier publish that this checkpoint lacks (an old
            # eval_results.json, figure or shard) would describe another model.
            commit = api.upload_folder(
                repo_id=target,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                repo_type="model",
                delete_patterns="*",
            )
            result[f"{key}_commit"] = {"url": commit.commit_url, "oid": commit.oid}
    return result


def push_model(
    model: torch.nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    run_dir: str | os.PathLike | None = None,
    license: str = DEFAULT_LICENSE,
) -> CommitInfo:
    """Upload one model to one repo, as `PreTrainedModel.push_to_hub` does, with the folder `publish`
    uploads for the full model (`write_model_folder`: our card, the code files, `auto_map`, processor, and
    `run_dir`'s training arguments, results and pictures). What our models' `push_to_hub` calls.

    The arguments up to `tags` are those of transformers' `push_to_hub`: the repo is created if needed
    (`private` applies to a new repo only), `revision` names a branch (created from `main` if missing),
    `create_pr` opens a pull request instead of committing. As there, files already in the repo and not
    in the folder are kept; `publish` mirrors the checkpoint instead, and also uploads the timm-format
    backbone. `run_dir` and `license` are as in `write_model_folder`. A file containing the token is
    never uploaded.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (or pull request).
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    secret = token if isinstance(token, str) else get_token()
    with tempfile.TemporaryDirectory(prefix="corinfomax-push-") as tmp:
        folder = write_model_folder(
            model, tmp, repo_id, None, run_dir, license=license, tags=tags, max_shard_size=max_shard_size
        )
        assert_no_secret([folder], secret)
        if revision and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {type(model).__name__}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
