"""The two model cards: the full model's (transformers, remote code) and the timm-format backbone's.
One builder (`build_card`) writes both; they differ in their metadata, introduction and usage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData

from ..configuration_corinfomax import CorInfoMaxConfig
from ..reporting import (
    EMBEDDING_MAP_NAME,
    EVAL_RESULTS_NAME,
    FIGURE_CAPTIONS,
    NEIGHBOURS_NAME,
    TRAINING_ARGS_NAME,
    TRAINING_FIGURE_NAME,
)
from ..wrappers import corinfomax_encoder
from .common import (
    CITATION,
    DEFAULT_LICENSE,
    FIGURE_NAMES,
    INSTALL_LINE,
    OFFICIAL_CODE_URL,
    PAPER_ARXIV_ID,
    PAPER_TITLE,
    hub_ids,
    hub_url,
    read_json,
    without_secrets,
)
from .onnx import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from .results import RESULT_KEY, eval_results_table, eval_results_to_model_index, protocol_label
from .timm_format import timm_architecture

# What the full repo holds, per saved head.
_CONTENTS = {
    "CorInfoMaxForPreTraining": "backbone, projector and the loss's running covariance estimates",
    "CorInfoMaxModel": "backbone and projector",
    "CorInfoMaxForImageClassification": "backbone and a linear classification head",
}


def _model_summary(config: CorInfoMaxConfig, num_features: int, projector_label: str = "projector") -> str:
    stem = " with the CIFAR stem (3x3 stride-1 first conv, no max-pool)" if config.cifar_stem else ""
    projector = "-".join(str(d) for d in [num_features, *config.projector_dims])
    rows = [
        ("backbone", f"timm `{config.backbone}`{stem}"),
        ("embedding (`pooler_output`)", f"{num_features}-d, pre-projector"),
        (projector_label, f"{projector}{' with BatchNorm' if config.projector_batchnorm else ''}"),
        (
            "input",
            f"{config.image_size}x{config.image_size} RGB, mean {config.image_mean}, std {config.image_std}",
        ),
        (
            "exported with",
            f"timm {timm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
        ),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _hyperparameter_table(config: CorInfoMaxConfig) -> str:
    rows = [
        ("alpha", "`sim_loss_weight`", config.alpha),
        ("lambda_R", "`la_R`", config.lambda_R),
        ("lambda_mu", "`la_mu`", config.lambda_mu),
        ("R_init", "`R_ini`", config.R_init),
        ("eps", "`R_eps_weight`", config.eps),
        ("normalize", "`normalize_on`", config.normalize),
        ("projector_dims", "`projector`", "-".join(map(str, config.projector_dims))),
        ("projector_batchnorm", "(ImageNet-1K `_bn` script)", config.projector_batchnorm),
    ]
    return "| ours | official flag | value |\n|---|---|---|\n" + "\n".join(
        f"| `{name}` | {flag} | {value} |" for name, flag, value in rows
    )


def _training_section(
    config: CorInfoMaxConfig, training_args: dict | None, results: dict | None, figures: list[str]
) -> str:
    parts = ["## Training", ""]
    if TRAINING_FIGURE_NAME in figures:
        parts += [f"![Training curves]({TRAINING_FIGURE_NAME})", ""]
    parts += ["CorInfoMax hyperparameters (from `config.json`):", "", _hyperparameter_table(config), ""]
    if training_args:
        parts += [
            f"<details><summary>All training arguments (<code>{TRAINING_ARGS_NAME}</code>)</summary>",
            "",
            "```json",
            json.dumps(training_args, indent=2, sort_keys=True, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    run = {
        k: v
        for k, v in (results or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not RESULT_KEY.match(k)
    }
    if run:
        parts += ["Run statistics: " + ", ".join(f"`{k}` = {v}" for k, v in run.items()) + ".", ""]
    return "\n".join(parts)


def _pictures_section(figures: list[str]) -> str:
    pictures = [name for name in (EMBEDDING_MAP_NAME, NEIGHBOURS_NAME) if name in figures]
    if not pictures:
        return ""
    parts = ["## What the encoder learned", ""]
    for name in pictures:
        parts += [f"![{FIGURE_CAPTIONS[name]}]({name})", ""]
    parts += [
        "The map shows the test embeddings on their first two principal components (of the L2-normalised "
        "backbone features); the grid shows test images and their nearest training images by cosine "
        "similarity, a neighbour of another class framed in red.",
        "",
    ]
    return "\n".join(parts)


def _evaluation_section(results: dict | None) -> str:
    if not results:
        return ""
    table = eval_results_table(results)
    if not table:
        return ""
    dataset = results.get("dataset") or {}
    where = ", ".join(f"{k} `{v}`" for k, v in dataset.items() if v) or "the evaluation data"
    parts = [
        "## Evaluation",
        "",
        f"Top-k accuracy (%) on {where}; baselines use the same protocol.",
        "",
        table,
        "",
    ]
    protocols = results.get("protocols") or {}
    for name, params in protocols.items():
        text = (
            ", ".join(f"{k}={v}" for k, v in (params or {}).items()) if isinstance(params, dict) else params
        )
        parts.append(f"- **{protocol_label(name)}**: {text}")
    return "\n".join(parts + [""])


def _citation_section() -> str:
    return "\n".join(
        [
            "## Citation",
            "",
            f"CorInfoMax: Ozsoy et al., [*{PAPER_TITLE}*](https://arxiv.org/abs/{PAPER_ARXIV_ID}), NeurIPS 2022 "
            f"(official code: {OFFICIAL_CODE_URL}).",
            "",
            "```bibtex",
            CITATION,
            "```",
            "",
        ]
    )


def _render(card_data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")


def card_context(checkpoint_dir: str | os.PathLike | None) -> tuple[dict | None, dict | None, list[str]]:
    """`training_args.json`, `eval_results.json` (secrets removed) and the names of the run's pictures."""
    if checkpoint_dir is None:
        return None, None, []
    checkpoint_dir = Path(checkpoint_dir)
    training_args = read_json(checkpoint_dir / TRAINING_ARGS_NAME)
    results = read_json(checkpoint_dir / EVAL_RESULTS_NAME)
    return (
        without_secrets(training_args) if training_args is not None else None,
        without_secrets(results) if results is not None else None,
        [name for name in FIGURE_NAMES if (checkpoint_dir / name).is_file()],
    )


def _card_metadata(training_args: dict | None, results: dict | None) -> tuple[list[str], dict]:
    """The card's Hub dataset ids and the evaluation dataset (eval_results.json, else the training data)."""
    training_args = training_args or {}
    eval_dataset = dict((results or {}).get("dataset") or {})
    if not eval_dataset.get("name") and training_args.get("dataset_name"):
        eval_dataset["name"] = training_args["dataset_name"]
    datasets = hub_ids(training_args.get("dataset_name"), eval_dataset.get("name"))
    return datasets, eval_dataset


def build_card(
    model: torch.nn.Module,
    card_repo_id: str,
    checkpoint_dir: str | os.PathLike | None,
    *,
    library_name: str,
    tags: list[str],
    base_model: str | None,
    introduction: str,
    usage: str,
    projector_label: str = "projector",
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """A card of `model`'s weights published as `card_repo_id`: the metadata (tags, datasets, the
    `model-index` of eval_results.json), the title and `introduction`, the model summary, `usage`, then the
    training, evaluation, pictures and citation sections, from `checkpoint_dir`'s files when present."""
    corinfomax = corinfomax_encoder(model)
    config, num_features = corinfomax.config, corinfomax.num_features
    training_args, results, figures = card_context(checkpoint_dir)
    datasets, eval_dataset = _card_metadata(training_args, results)
    card_data = ModelCardData(
        library_name=library_name,
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=[
            "corinfomax",
            "self-supervised",
            "image-feature-extraction",
            "vision",
            "timm",
            *tags,
            config.backbone,
        ],
        datasets=datasets or None,
        base_model=base_model,
        model_name=card_repo_id.split("/")[-1],
        eval_results=eval_results_to_model_index(results, eval_dataset) if results else None,
    )
    body = "\n".join(
        [
            f"# {card_repo_id.split('/')[-1]}",
            "",
            introduction,
            "",
            _model_summary(config, num_features, projector_label),
            "",
            usage,
            _training_section(config, training_args, results, figures),
            _evaluation_section(results),
            _pictures_section(figures),
            _citation_section(),
        ]
    )
    return _render(card_data, body)


def _described(config: CorInfoMaxConfig) -> str:
    """The paper link and the backbone, as both cards' introductions begin."""
    stem = " (CIFAR stem)" if config.cifar_stem else ""
    return f"[CorInfoMax](https://arxiv.org/abs/{PAPER_ARXIV_ID}) self-supervised `{config.backbone}`{stem}"


def build_model_card(
    model: torch.nn.Module,
    repo_id: str,
    backbone_repo_id: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    license: str = DEFAULT_LICENSE,
    onnx: bool = False,
) -> ModelCard:
    """The card of the full model (backbone + projector + loss state, transformers with remote code).

    Reads `training_args.json`, `eval_results.json` and its pictures (`training.png`, `embeddings.png`,
    `neighbours.png`) from `checkpoint_dir` when present. With `onnx`, the repo also holds the encoder as
    `onnx/model.onnx` (`export.onnx`), and the card shows how to run it with onnxruntime.
    """
    corinfomax = corinfomax_encoder(model)
    config, num_features = corinfomax.config, corinfomax.num_features
    base_model = (card_context(checkpoint_dir)[0] or {}).get("model_name_or_path")
    backbone_line = (
        f" The backbone alone, in timm format (no custom code): [{backbone_repo_id}]({hub_url(backbone_repo_id)})."
        if backbone_repo_id
        else ""
    )
    introduction = (
        f"A {_described(config)}: {_CONTENTS.get(type(model).__name__, 'the model')}, as a transformers "
        'model (`model_type="corinfomax"`, remote code for `AutoModel`, `AutoModelForPreTraining` and '
        "`AutoModelForImageClassification`)." + backbone_line
    )
    commit = "<commit sha>"
    usage = f"""## How to use

Remote code runs on your machine: read it, then pin the commit you reviewed with `revision=` (weights,
config) and `code_revision=` (the `.py` files).

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

repo, commit = "{repo_id}", "{commit}"
processor = AutoImageProcessor.from_pretrained(repo, revision=commit)
model = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=commit, code_revision=commit).eval()
inputs = processor(Image.open("image.jpg"), return_tensors="pt")
features = model(**inputs).pooler_output  # ({num_features},) per image: the pre-projector embedding
projections = model(**inputs).projections  # what the CorInfoMax loss sees
```

With the `corinfomax` package installed ({INSTALL_LINE}), importing it registers the Auto classes, so no remote code runs:

```python
import modeling_corinfomax  # noqa: F401
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo_id}")
```

Feature-extraction pipeline (`pool=True` returns the pooled embedding instead of the feature map):

```python
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model="{repo_id}", trust_remote_code=True, revision="{commit}")
embedding = extractor("image.jpg", pool=True)
```

Continue self-supervised training (the checkpoint carries the loss's running covariance state) or
fine-tune / linear-probe:

```python
from transformers import AutoModelForImageClassification, AutoModelForPreTraining

pretraining = AutoModelForPreTraining.from_pretrained("{repo_id}", trust_remote_code=True, revision="{commit}", code_revision="{commit}")
loss = pretraining(pixel_values=view1, pixel_values_2=view2).loss
classifier = AutoModelForImageClassification.from_pretrained(
    "{repo_id}", trust_remote_code=True, revision="{commit}", code_revision="{commit}", num_labels=10
)
```
"""
    if onnx:
        usage += f"""
The encoder is also in ONNX (`{ONNX_FILE.as_posix()}`: input `{INPUT_NAME}` with any batch size, output
`{OUTPUT_NAME}`, the `pooler_output` above), for onnxruntime without PyTorch:

```python
import onnxruntime as ort
from huggingface_hub import hf_hub_download
from PIL import Image
from transformers import AutoImageProcessor

repo, commit = "{repo_id}", "{commit}"
processor = AutoImageProcessor.from_pretrained(repo, revision=commit)
session = ort.InferenceSession(hf_hub_download(repo, "{ONNX_FILE.as_posix()}", revision=commit))
pixel_values = processor(Image.open("image.jpg"), return_tensors="np")["pixel_values"]
embedding = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": pixel_values}})[0]  # ({num_features},) per image
```
"""
    return build_card(
        model, repo_id, checkpoint_dir, library_name="transformers", tags=["custom_code", *(["onnx"] if onnx else [])],
        base_model=base_model if base_model and hub_ids(base_model) else None,
        introduction=introduction, usage=usage, license=license,
    )  # fmt: skip


def build_backbone_card(
    model: torch.nn.Module,
    backbone_repo_id: str,
    repo_id: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of the timm-format backbone (`library_name: timm`, loads in timm and transformers)."""
    corinfomax = corinfomax_encoder(model)
    config, num_features = corinfomax.config, corinfomax.num_features
    arch = timm_architecture(config)
    needs_import = (
        f"\n**CIFAR stem:** the architecture `{arch}` is registered with timm by our package, so run "
        f"`import modeling_corinfomax` (package `corinfomax`: {INSTALL_LINE}) before loading, in timm and in transformers alike; "
        f'without it timm reports "Unknown model ({arch})".\n'
        if config.cifar_stem
        else ""
    )
    import_line = (
        "import modeling_corinfomax  # noqa: F401  (registers the CIFAR-stem architecture)\n"
        if config.cifar_stem
        else ""
    )
    full_line = (
        f" The full self-supervised checkpoint (projector and loss state, to continue training): "
        f"[{repo_id}]({hub_url(repo_id)})."
        if repo_id
        else ""
    )
    introduction = (
        f"The backbone of a {_described(config)}, in timm's format (architecture `{arch}`, no classifier)."
        + full_line
    )
    usage = f"""## How to use
{needs_import}
timm (`num_classes=0`: the model returns the {num_features}-d pooled embedding; pin a commit with
`hf-hub:{backbone_repo_id}@<commit sha>`):

```python
{import_line}import timm
from PIL import Image

model = timm.create_model("hf-hub:{backbone_repo_id}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
features = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))
```

transformers (TimmWrapper; pin with `revision="<commit sha>"`):

```python
{import_line}from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

processor = AutoImageProcessor.from_pretrained("{backbone_repo_id}")
model = AutoModel.from_pretrained("{backbone_repo_id}").eval()
features = model(**processor(Image.open("image.jpg"), return_tensors="pt")).pooler_output

extractor = pipeline("image-feature-extraction", model="{backbone_repo_id}")
embedding = extractor("image.jpg", pool=True)

classifier = AutoModelForImageClassification.from_pretrained("{backbone_repo_id}", num_labels=10)  # new head
```
"""
    return build_card(
        model, backbone_repo_id, checkpoint_dir, library_name="timm", tags=["transformers"],
        base_model=repo_id, introduction=introduction, usage=usage, license=license,
        projector_label="projector (training only, in the full repo)",
    )  # fmt: skip
