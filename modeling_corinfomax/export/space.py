"""A Hugging Face Space that serves a published model as the retrieval app (`modeling_corinfomax.app`):
`write_space_folder` writes its folder (`app.py`, `requirements.txt`, `README.md` with the Space's front
matter, and a bounded copy of the bank images under `bank/`), `publish_space` uploads it. What
`corinfomax-push --space ORG/NAME-demo --space_bank FOLDER` runs after publishing the model."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from huggingface_hub import HfApi, SpaceCard, SpaceCardData

from .. import __version__
from ..errors import ConfigurationError, DataError
from .common import DEFAULT_LICENSE, hub_url
from .publishing import _validate_repo_id, assert_no_secret

# The gradio releases the app is written for: the `app` extra's range, and the Space's too.
GRADIO_REQUIREMENT = "gradio>=6.0,<7"
MAX_BANK_IMAGES = 200
BANK_FOLDER = "bank"
# The Space's app.py reads this variable first: a Space setting (or a local run) can point it at another
# model (a Hub id or a local folder) without editing the file.
MODEL_ENV = "CORINFOMAX_MODEL"

APP_TEMPLATE = '''"""CorInfoMax image retrieval: the images of {bank}/ nearest to a dropped one (modeling_corinfomax.app).
${model_env} overrides the model (a Hub id or a local folder)."""

import os
from pathlib import Path

from modeling_corinfomax.app import build_app

model = os.environ.get("{model_env}", "{model}")
demo = build_app(model, Path(__file__).parent / "{bank}", k={k})

if __name__ == "__main__":
    demo.launch()
'''


def _gradio_version() -> str:
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        raise ConfigurationError(
            "writing a Space needs gradio (its README names the gradio version the app runs on): "
            "`pip install 'corinfomax[app]'`."
        ) from None


def bank_images(folder: str | os.PathLike, limit: int = MAX_BANK_IMAGES) -> list[Path]:
    """The image files under `folder` (any depth, the extensions `imagefolder` reads), as paths relative
    to it; when there are more than `limit`, `limit` of them evenly spaced in sorted order, so that every
    class sub-folder keeps its share."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder  # noqa: PLC0415

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--space_bank {str(folder)!r} is not a folder: pass a folder of images.")
    extensions = set(ImageFolder.EXTENSIONS)
    files = sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions
    )
    if not files:
        raise DataError(
            f"--space_bank {str(folder)!r} holds no images ({', '.join(sorted(extensions)[:8])}, ...)."
        )
    if len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def write_space_folder(
    space_dir: str | os.PathLike,
    model_repo_id: str,
    bank_dir: str | os.PathLike,
    *,
    k: int = 8,
    max_bank_images: int = MAX_BANK_IMAGES,
    license: str = DEFAULT_LICENSE,
) -> Path:
    """Write a gradio Space that runs the retrieval app on `model_repo_id` with a copy of `bank_dir`.

    Args:
        space_dir: the folder to write (created if needed).
        model_repo_id: the model the Space loads (`org/name`), also named in its `models:` metadata.
        bank_dir: a folder of images (class sub-folders give labels), copied to `bank/` with its
            structure; at most `max_bank_images` of them (`bank_images`).
        k: the number of neighbours the app shows.
        license: the README's license.

    Returns:
        `space_dir` as a `Path`. It holds `app.py`, `requirements.txt`, `README.md` and `bank/`.
    """
    _validate_repo_id(model_repo_id, "repo_id")  # a Hub id: the Space downloads it, app.py quotes it
    space_dir = Path(space_dir)
    images = bank_images(bank_dir, max_bank_images)
    for relative in images:
        target = space_dir / BANK_FOLDER / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(bank_dir) / relative, target)
    (space_dir / "app.py").write_text(
        APP_TEMPLATE.format(model_env=MODEL_ENV, model=model_repo_id, bank=BANK_FOLDER, k=k)
    )
    # `~=`: the Space runs the app of this release series, whose build_app the app.py above calls.
    (space_dir / "requirements.txt").write_text(f"corinfomax~={__version__}\n{GRADIO_REQUIREMENT}\n")
    card_data = SpaceCardData(
        title=f"CorInfoMax retrieval {model_repo_id.split('/')[-1]}",
        emoji="🔎",
        colorFrom="indigo",
        colorTo="gray",
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file="app.py",
        pinned=False,
        license=license,
        models=[model_repo_id],
        tags=["corinfomax", "image-retrieval", "self-supervised-learning"],
        short_description="Nearest images by CorInfoMax features",
    )
    body = f"""# Image retrieval with [{model_repo_id}]({hub_url(model_repo_id)})

Drop an image: the app shows the {k} images of `{BANK_FOLDER}/` ({len(images)} images) whose CorInfoMax
features (the backbone's `pooler_output`) have the highest cosine similarity to it, and where it falls on
the bank's map (first two principal components of the features).

Run it locally with `pip install -r requirements.txt && python app.py`, or on any model and folder of
images with `corinfomax-app MODEL --bank FOLDER`. The `{MODEL_ENV}` variable (a Space setting) overrides
the model; a private model needs an `HF_TOKEN` secret that can read it.
"""
    SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n").save(space_dir / "README.md")
    return space_dir


def publish_space(
    space_repo_id: str,
    model_repo_id: str,
    bank_dir: str | os.PathLike,
    *,
    private: bool = False,
    token: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
    commit_message: str = "Upload CorInfoMax retrieval app",
    k: int = 8,
) -> dict:
    """Publish the retrieval app on `model_repo_id` as a gradio Space (`write_space_folder`).

    Args:
        space_repo_id: `org/name` of the Space (created if missing; `private` applies to a new one).
        model_repo_id: the model the Space serves.
        bank_dir: a folder of images to search (a bounded copy is uploaded).
        token: a Hub token with write access; defaults to `HF_TOKEN` / the stored login. A file that
            contains it is never uploaded.
        dry_run_dir: write the folder to `<dry_run_dir>/<org>--<name>` instead of uploading.
        k: the number of neighbours the app shows.

    Returns:
        `{"space_repo_id", "space_dir", "space_commit", "space_url"}`: the folder for a dry run, the
        commit (`{"url", "oid"}`) for an upload. The branch `main` then holds exactly the folder's files.
    """
    _validate_repo_id(space_repo_id, "space")
    secret = token or os.environ.get("HF_TOKEN")
    result = {
        "space_repo_id": space_repo_id,
        "space_dir": None,
        "space_commit": None,
        "space_url": hub_url(f"spaces/{space_repo_id}"),
    }
    if dry_run_dir is not None:
        space_dir = Path(dry_run_dir) / space_repo_id.replace("/", "--")
        if space_dir.exists() and any(space_dir.iterdir()):
            raise FileExistsError(f"{space_dir} is not empty; remove it or choose another --dry_run folder.")
        write_space_folder(space_dir, model_repo_id, bank_dir, k=k)
        assert_no_secret([space_dir], secret)
        return {**result, "space_dir": str(space_dir)}

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="corinfomax-space-") as tmp:
        space_dir = write_space_folder(Path(tmp) / "space", model_repo_id, bank_dir, k=k)
        assert_no_secret([space_dir], secret)
        api.create_repo(space_repo_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
        # As for the model: the Space mirrors the folder, so bank images of an earlier upload go.
        commit = api.upload_folder(
            repo_id=space_repo_id,
            folder_path=space_dir,
            commit_message=commit_message,
            repo_type="space",
            delete_patterns="*",
        )
    return {**result, "space_commit": {"url": commit.commit_url, "oid": commit.oid}}
