"""Publishing CorInfoMax checkpoints: the timm-format backbone, the model cards and the Hub upload.

A checkpoint becomes two artifacts :

- the **full model** (`org/name`): our `save_pretrained` folder with the code files, an `auto_map` for
  every head and `preprocessor_config.json`, so it loads with `trust_remote_code=True` anywhere, or
  without it where this package is imported; it is what continues SSL training;
- the **backbone** in timm's own format (`org/name-timm`): plain timm keys and a timm `config.json`, so
  it loads with `timm.create_model("hf-hub:...")`, transformers' `AutoModel` / `AutoModelForImageClassification`
  (TimmWrapper), `AutoImageProcessor` and the feature-extraction pipeline, with no custom code (a CIFAR-stem
  backbone needs `import modeling_corinfomax`, which registers `<arch>_cifar_stem` with timm).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
import transformers
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from timm.models import save_for_hf

from .configuration_corinfomax import CorInfoMaxConfig, eval_resize_size
from .evaluation import EVAL_RESULTS_NAME
from .modeling_corinfomax import (
    CorInfoMaxForImageClassification,
    CorInfoMaxForPreTraining,
    CorInfoMaxModel,
    register_cifar_stem_architecture,
)
from .reporting import (
    EMBEDDING_MAP_NAME,
    FIGURE_CAPTIONS,
    NEIGHBOURS_NAME,
    TRAINING_ARGS_NAME,
    TRAINING_FIGURE_NAME,
)

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

# Keys of eval_results.json: `<protocol>_top<k>` for our model, `<protocol>_top<k>_<baseline>` for baselines.
_RESULT_KEY = re.compile(r"^(?P<protocol>[a-z0-9]+)_(?P<metric>top\d+)(?:_(?P<baseline>[a-z0-9_]+))?$")
PROTOCOL_NAMES = {
    "knn": "k-NN classification (frozen backbone)",
    "linear": "Linear probe (frozen backbone)",
    "finetune": "Fine-tuning",
}
BASELINE_NAMES = {"random_init": "random-init backbone", "raw_pixels": "raw pixels"}
# Never copied into a card or an uploaded file, whatever their value.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential|authorization", re.IGNORECASE)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"
# What the full repo holds, per saved head.
_CONTENTS = {
    "CorInfoMaxForPreTraining": "backbone, projector and the loss's running covariance estimates",
    "CorInfoMaxModel": "backbone and projector",
    "CorInfoMaxForImageClassification": "backbone and a linear classification head",
}
_HEADS = {
    cls.__name__: cls for cls in (CorInfoMaxForPreTraining, CorInfoMaxModel, CorInfoMaxForImageClassification)
}


def unwrap_corinfomax(model: torch.nn.Module) -> CorInfoMaxModel:
    """The `CorInfoMaxModel` (backbone + projector) inside any of our heads."""
    if isinstance(model, CorInfoMaxModel):
        return model
    inner = getattr(model, "corinfomax", None)
    if isinstance(inner, CorInfoMaxModel):
        return inner
    raise TypeError(
        f"expected a CorInfoMax model (CorInfoMaxModel, CorInfoMaxForPreTraining or "
        f"CorInfoMaxForImageClassification), got {type(model).__name__}. Load the checkpoint with "
        "CorInfoMaxForPreTraining.from_pretrained(path) first."
    )


def timm_architecture(config: CorInfoMaxConfig) -> str:
    """The timm architecture name of the backbone: `config.backbone`, or `<backbone>_cifar_stem`."""
    if not config.cifar_stem:
        return config.backbone
    return register_cifar_stem_architecture(config.backbone)


def timm_data_config(config: CorInfoMaxConfig) -> dict[str, Any]:
    """The evaluation preprocessing of `make_image_processor` in timm's terms: resize the short side to
    `int(image_size * 8/7)` (bicubic), centre-crop `image_size`, normalise with the config's mean/std."""
    resize = eval_resize_size(config.image_size)
    crop_pct = config.image_size / resize
    if math.floor(config.image_size / crop_pct) != resize:
        # timm resizes to floor(image_size / crop_pct): never let float rounding lose a pixel.
        crop_pct = config.image_size / (resize + 0.5)
    return {
        "input_size": (3, config.image_size, config.image_size),
        "interpolation": "bicubic",
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "mean": tuple(config.image_mean),
        "std": tuple(config.image_std),
    }


def export_timm_backbone(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    license: str | None = DEFAULT_LICENSE,
    description: str | None = None,
) -> Path:
    """Write the backbone alone in timm's format: `model.safetensors` with plain timm keys and timm's
    `config.json` (`architecture`, `num_classes: 0`, `pretrained_cfg` with our evaluation preprocessing).

    The folder loads with `timm.create_model("local-dir:DIR", pretrained=True)`, transformers'
    `AutoModel.from_pretrained(DIR)` (a `TimmWrapperModel` whose `pooler_output` equals our
    `pooler_output`), `AutoModelForImageClassification.from_pretrained(DIR, num_labels=N)`,
    `AutoImageProcessor` and `pipeline("image-feature-extraction", model=DIR)`. A CIFAR-stem backbone is
    written as `<backbone>_cifar_stem`, which exists once `modeling_corinfomax` is imported.

    Args:
        model: a `CorInfoMaxModel`, `CorInfoMaxForPreTraining` or `CorInfoMaxForImageClassification`.
        output_dir: the folder to write (created if needed).
        license: recorded in `pretrained_cfg["license"]`.
        description: recorded in `pretrained_cfg["description"]`.

    Returns:
        `output_dir` as a `Path`.
    """
    corinfomax = unwrap_corinfomax(model)
    config = corinfomax.config
    backbone = corinfomax.backbone
    if getattr(backbone, "num_classes", 0) != 0:
        raise ValueError(
            f"the backbone has a {backbone.num_classes}-class head; CorInfoMax backbones are built with "
            "num_classes=0. Export the backbone of a CorInfoMax checkpoint."
        )
    source_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    data_config = timm_data_config(config)
    # A shallow copy shares the weights but gets its own metadata: the source checkpoint's tag, paper,
    # license and test sizes describe timm's ImageNet weights, not ours.
    exported = copy.copy(backbone)
    exported.pretrained_cfg = {
        "architecture": timm_architecture(config),
        "custom_load": False,
        **data_config,
        "fixed_input_size": source_cfg.get("fixed_input_size", False),
        "num_classes": 0,
        "pool_size": None,
        "first_conv": source_cfg.get("first_conv"),
        "classifier": source_cfg.get("classifier"),
        "license": license,
        "description": description,
        "paper_name": PAPER_TITLE,
        "paper_ids": f"arXiv:{PAPER_ARXIV_ID}",
        "origin_url": OFFICIAL_CODE_URL,
    }
    exported.pretrained_cfg = {
        k: v for k, v in exported.pretrained_cfg.items() if v is not None or k in {"pool_size"}
    }
    output_dir = Path(output_dir)
    save_for_hf(exported, output_dir, safe_serialization=True, data_config=data_config)

    config_path = output_dir / "config.json"
    timm_config = json.loads(config_path.read_text())
    # timm 1.0.31 records num_classes in model_args and transformers' TimmWrapper passes num_classes
    # itself: "got multiple values for keyword argument 'num_classes'". The top-level num_classes stays.
    timm_config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(timm_config, indent=2) + "\n")
    return output_dir


def load_saved_model(checkpoint_dir: str | os.PathLike) -> torch.nn.Module:
    """Load a CorInfoMax `save_pretrained` folder with the head it was saved from (`config.architectures`)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} has no config.json: pass the folder a CorInfoMax model was saved to with "
            "save_pretrained (train.py's --output_dir, or hub/convert_official.py's output)."
        )
    config = CorInfoMaxConfig.from_pretrained(checkpoint_dir)
    names = [name for name in (config.architectures or []) if name in _HEADS]
    model_class = _HEADS[names[0]] if names else CorInfoMaxForPreTraining
    return model_class.from_pretrained(checkpoint_dir).eval()


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
        return {k: without_secrets(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def parse_eval_results(results: dict) -> tuple[dict, dict]:
    """Split eval_results.json into `(ours, baselines)`.

    `ours` maps `(protocol, metric)` to a value (e.g. `("knn", "top1") -> 91.2`); `baselines` maps
    `baseline -> {(protocol, metric): value}` for keys with a suffix (`knn_top1_random_init`). Other keys
    (run statistics such as `global_step`, `dataset`, `protocols`) are not results and are ignored here.
    """
    ours: dict[tuple[str, str], float] = {}
    baselines: dict[str, dict[tuple[str, str], float]] = {}
    for key, value in results.items():
        match = _RESULT_KEY.match(key)
        if match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        slot = (match["protocol"], match["metric"])
        if match["baseline"]:
            baselines.setdefault(match["baseline"], {})[slot] = float(value)
        else:
            ours[slot] = float(value)
    return ours, baselines


def _metric_label(metric: str) -> str:
    number = metric[len("top") :]
    return f"top-{number} accuracy" if metric.startswith("top") and number.isdigit() else metric


def _protocol_label(protocol: str) -> str:
    return PROTOCOL_NAMES.get(protocol, protocol)


def eval_results_to_model_index(results: dict, dataset: dict | None = None) -> list[EvalResult]:
    """Our model's results (keys without a baseline suffix) as `EvalResult`s for the card's `model-index`.

    Accuracies are in percent, as eval_results.json holds them. The protocol's parameters
    (`results["protocols"][protocol]`) become the metric arguments.
    """
    ours, _ = parse_eval_results(results)
    dataset = {**(dataset or {}), **(results.get("dataset") or {})}
    name = str(dataset.get("name") or "unknown")
    protocols = results.get("protocols") or {}
    entries = []
    for (protocol, metric), value in ours.items():
        params = protocols.get(protocol)
        entries.append(
            EvalResult(
                task_type="image-classification",
                task_name=_protocol_label(protocol),
                dataset_type=name,
                dataset_name=name,
                dataset_config=dataset.get("config") or None,
                dataset_split=dataset.get("split") or None,
                metric_type="accuracy",
                metric_name=f"{_protocol_label(protocol)}, {_metric_label(metric)} (%)",
                metric_value=value,
                metric_args=without_secrets(params) if isinstance(params, dict) and params else None,
            )
        )
    return entries


def eval_results_table(results: dict) -> str:
    """A markdown table of our results next to the baselines (`_random_init`, `_raw_pixels`, ...)."""
    ours, baselines = parse_eval_results(results)
    slots = list(ours) + [s for b in baselines.values() for s in b if s not in ours]
    slots = list(dict.fromkeys(slots))
    if not slots:
        return ""
    columns = ["CorInfoMax"] + [BASELINE_NAMES.get(b, b.replace("_", " ")) for b in baselines]
    lines = [
        "| protocol | metric | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for slot in slots:
        cells = [ours.get(slot)] + [b.get(slot) for b in baselines.values()]
        text = [
            f"**{v:.2f}**" if i == 0 and v is not None else ("-" if v is None else f"{v:.2f}")
            for i, v in enumerate(cells)
        ]
        lines.append(
            f"| {_protocol_label(slot[0])} | {_metric_label(slot[1])} (%) | " + " | ".join(text) + " |"
        )
    return "\n".join(lines)


def _hub_ids(*names: Any) -> list[str]:
    """Names that look like Hub repo ids (not local paths or free text), deduplicated."""
    ids = []
    for name in names:
        if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() and name not in ids:
            ids.append(name)
    return ids


def _hub_url(repo_id: str) -> str:
    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


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
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not _RESULT_KEY.match(k)
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
        parts.append(f"- **{_protocol_label(name)}**: {text}")
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


def _card_context(checkpoint_dir: str | os.PathLike | None) -> tuple[dict | None, dict | None, list[str]]:
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
    datasets = _hub_ids(training_args.get("dataset_name"), eval_dataset.get("name"))
    return datasets, eval_dataset


def build_model_card(
    model: torch.nn.Module,
    repo_id: str,
    backbone_repo_id: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of the full model (backbone + projector + loss state, transformers with remote code).

    Reads `training_args.json`, `eval_results.json` and its pictures (`training.png`, `embeddings.png`, `neighbours.png`) from `checkpoint_dir` when present.
    """
    corinfomax = unwrap_corinfomax(model)
    config, num_features = corinfomax.config, corinfomax.num_features
    training_args, results, figures = _card_context(checkpoint_dir)
    datasets, eval_dataset = _card_metadata(training_args, results)
    base_model = (training_args or {}).get("model_name_or_path")
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=[
            "corinfomax",
            "self-supervised",
            "image-feature-extraction",
            "vision",
            "timm",
            "custom_code",
            config.backbone,
        ],
        datasets=datasets or None,
        base_model=base_model if base_model and _hub_ids(base_model) else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results_to_model_index(results, eval_dataset) if results else None,
    )
    backbone_line = (
        f" The backbone alone, in timm format (no custom code): [{backbone_repo_id}]({_hub_url(backbone_repo_id)})."
        if backbone_repo_id
        else ""
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
    body = "\n".join(
        [
            f"# {repo_id.split('/')[-1]}",
            "",
            f"A [CorInfoMax](https://arxiv.org/abs/{PAPER_ARXIV_ID}) self-supervised `{config.backbone}`"
            f"{' (CIFAR stem)' if config.cifar_stem else ''}: {_CONTENTS.get(type(model).__name__, 'the model')}, "
            'as a transformers model (`model_type="corinfomax"`, remote code for '
            "`AutoModel`, `AutoModelForPreTraining` and `AutoModelForImageClassification`)." + backbone_line,
            "",
            _model_summary(config, num_features),
            "",
            usage,
            _training_section(config, training_args, results, figures),
            _evaluation_section(results),
            _pictures_section(figures),
            _citation_section(),
        ]
    )
    return _render(card_data, body)


def build_backbone_card(
    model: torch.nn.Module,
    backbone_repo_id: str,
    repo_id: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of the timm-format backbone (`library_name: timm`, loads in timm and transformers)."""
    corinfomax = unwrap_corinfomax(model)
    config, num_features = corinfomax.config, corinfomax.num_features
    training_args, results, figures = _card_context(checkpoint_dir)
    datasets, eval_dataset = _card_metadata(training_args, results)
    arch = timm_architecture(config)
    card_data = ModelCardData(
        library_name="timm",
        license=license,
        pipeline_tag="image-feature-extraction",
        tags=[
            "corinfomax",
            "self-supervised",
            "image-feature-extraction",
            "vision",
            "timm",
            "transformers",
            config.backbone,
        ],
        datasets=datasets or None,
        base_model=repo_id,
        model_name=backbone_repo_id.split("/")[-1],
        eval_results=eval_results_to_model_index(results, eval_dataset) if results else None,
    )
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
        f"[{repo_id}]({_hub_url(repo_id)})."
        if repo_id
        else ""
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
    body = "\n".join(
        [
            f"# {backbone_repo_id.split('/')[-1]}",
            "",
            f"The backbone of a [CorInfoMax](https://arxiv.org/abs/{PAPER_ARXIV_ID}) self-supervised "
            f"`{config.backbone}`{' (CIFAR stem)' if config.cifar_stem else ''}, in timm's format (architecture "
            f"`{arch}`, no classifier)." + full_line,
            "",
            _model_summary(
                config, num_features, projector_label="projector (training only, in the full repo)"
            ),
            "",
            usage,
            _training_section(config, training_args, results, figures),
            _evaluation_section(results),
            _pictures_section(figures),
            _citation_section(),
        ]
    )
    return _render(card_data, body)


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
) -> Path:
    """Write the full model's folder to upload: `save_pretrained` (weights, config with the `auto_map` of
    every head, the code files, `preprocessor_config.json`), the run's `training_args.json`,
    `eval_results.json` and pictures when `run_dir` holds them (secrets removed), and the model card.

    Args:
        model: a `CorInfoMaxModel`, `CorInfoMaxForPreTraining` or `CorInfoMaxForImageClassification`.
        model_dir: the folder to write (created if needed).
        repo_id: `org/name` the folder is for (named in the card).
        backbone_repo_id: the timm-format backbone's repo, linked from the card; None for no link.
        run_dir: a training output folder (train.py's `--output_dir`) whose files describe these weights.
        license: the card's license.
        tags: extra card tags, after ours.
        max_shard_size: passed to `save_pretrained`.

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
    training_args, results, figures = _card_context(run_dir)
    if training_args is not None:
        (model_dir / TRAINING_ARGS_NAME).write_text(json.dumps(training_args, indent=2, default=str) + "\n")
    if results is not None:
        (model_dir / EVAL_RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
    for name in figures:
        shutil.copyfile(Path(run_dir) / name, model_dir / name)
    card = build_model_card(model, repo_id, backbone_repo_id, run_dir, license=license)
    card.data.tags = [*card.data.tags, *(tag for tag in tags or [] if tag not in card.data.tags)]
    card.save(model_dir / "README.md")
    return model_dir


def prepare_artifacts(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    backbone_repo_id: str,
    model_dir: str | os.PathLike,
    backbone_dir: str | os.PathLike,
    *,
    license: str = DEFAULT_LICENSE,
) -> tuple[Path, Path]:
    """Write the two folders to upload: the full model (`write_model_folder`: `save_pretrained` with code
    files, `auto_map` for every head, `preprocessor_config.json`, README, and the run's
    `training_args.json`, `eval_results.json` and its pictures) and the timm-format backbone with its
    README and the pictures."""
    checkpoint_dir, backbone_dir = Path(checkpoint_dir), Path(backbone_dir)
    model = load_saved_model(checkpoint_dir)
    model_dir = write_model_folder(
        model, model_dir, repo_id, backbone_repo_id, checkpoint_dir, license=license
    )
    export_timm_backbone(
        model, backbone_dir, license=license, description=f"CorInfoMax backbone of {repo_id}"
    )
    for name in _card_context(checkpoint_dir)[2]:
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
                raise RuntimeError(
                    f"{path} contains the Hub token; refusing to upload it. Remove the token from the "
                    "checkpoint's files (training_args.json, ...) and publish again."
                )


def _validate_repo_id(repo_id: str, flag: str) -> None:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"{flag}={repo_id!r} is not a Hub repo id: use 'org/name' (or 'user/name').")


def publish(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    backbone_repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    dry_run_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    commit_message: str = "Upload CorInfoMax checkpoint",
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

    Returns:
        `{"repo_id", "backbone_repo_id", "model_dir", "backbone_dir", "model_commit", "backbone_commit",
        "model_url", "backbone_url"}`; the folders are set for a dry run, the commits (`CommitInfo`
        URLs and ids) for an upload.
    """
    backbone_repo_id = backbone_repo_id or f"{repo_id}{BACKBONE_REPO_SUFFIX}"
    _validate_repo_id(repo_id, "repo_id")
    _validate_repo_id(backbone_repo_id, "backbone_repo_id")
    if backbone_repo_id == repo_id:
        raise ValueError(
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
        "model_url": _hub_url(repo_id),
        "backbone_url": _hub_url(backbone_repo_id),
    }
    if dry_run_dir is not None:
        root = Path(dry_run_dir)
        model_dir, backbone_dir = (root / r.replace("/", "--") for r in (repo_id, backbone_repo_id))
        for folder in (model_dir, backbone_dir):
            if folder.exists() and any(folder.iterdir()):
                raise FileExistsError(f"{folder} is not empty; remove it or choose another --dry_run folder.")
        prepare_artifacts(checkpoint_dir, repo_id, backbone_repo_id, model_dir, backbone_dir)
        assert_no_secret([model_dir, backbone_dir], secret)
        result.update(model_dir=str(model_dir), backbone_dir=str(backbone_dir))
        return result

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="corinfomax-publish-") as tmp:
        model_dir, backbone_dir = Path(tmp) / "model", Path(tmp) / "backbone"
        prepare_artifacts(checkpoint_dir, repo_id, backbone_repo_id, model_dir, backbone_dir)
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


__all__ = [
    "build_backbone_card",
    "build_model_card",
    "eval_results_table",
    "eval_results_to_model_index",
    "export_timm_backbone",
    "load_saved_model",
    "parse_eval_results",
    "prepare_artifacts",
    "publish",
    "push_model",
    "timm_architecture",
    "timm_data_config",
    "unwrap_corinfomax",
    "write_model_folder",
]
