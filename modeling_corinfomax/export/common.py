"""What the export modules share: the paper's references, the license, the install line, the run's
pictures, Hub ids and URLs, and reading a run's JSON files without their secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from ..reporting import EMBEDDING_MAP_NAME, NEIGHBOURS_NAME, TRAINING_FIGURE_NAME

# How a card's reader gets the package: the wheel of the project's checkout (tests/test_wheel.py installs it).
INSTALL_LINE = "`pip install corinfomax`, or `pip install .` in a checkout of the project"
# The pictures of a run that go into the cards and the uploaded folders when the run wrote them.
FIGURE_NAMES = (TRAINING_FIGURE_NAME, EMBEDDING_MAP_NAME, NEIGHBOURS_NAME)
DEFAULT_LICENSE = "apache-2.0"
BACKBONE_REPO_SUFFIX = "-timm"

PAPER_TITLE = "Self-Supervised Learning with an Information Maximization Criterion"
PAPER_ARXIV_ID = "2209.07999"
OFFICIAL_CODE_URL = "https://github.com/serdarozsoy/corinfomax-ssl"
CITATION = """@inproceedings{ozsoy2022corinfomax,
  title     = {Self-Supervised Learning with an Information Maximization Criterion},
  author    = {Ozsoy, Serdar and Hamdan, Shadi and Arik, Sercan {\\"O}. and Yuret, Deniz and Erdogan, Alper T.},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {35},
  year      = {2022},
  eprint    = {2209.07999},
  archivePrefix = {arXiv}
}"""

# Never copied into a card or an uploaded file, whatever their value.
SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential|authorization", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); fix or remove it, then publish again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def without_secrets(value: Any) -> Any:
    """`value` with every dict entry whose key names a credential (token, password, ...) removed."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def hub_ids(*names: Any) -> list[str]:
    """Names that look like Hub repo ids (not local paths or free text), deduplicated."""
    ids = []
    for name in names:
        if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists() and name not in ids:
            ids.append(name)
    return ids


def hub_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
