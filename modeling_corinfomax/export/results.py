"""eval_results.json as a model card shows it: our results and the baselines', the card's `model-index`
and the markdown table."""

from __future__ import annotations

import re

from huggingface_hub import EvalResult

from .common import without_secrets

# Keys of eval_results.json: `<protocol>_top<k>` for our model, `<protocol>_top<k>_<baseline>` for baselines.
RESULT_KEY = re.compile(r"^(?P<protocol>[a-z0-9]+)_(?P<metric>top\d+)(?:_(?P<baseline>[a-z0-9_]+))?$")
PROTOCOL_NAMES = {
    "knn": "k-NN classification (frozen backbone)",
    "linear": "Linear probe (frozen backbone)",
    "finetune": "Fine-tuning",
}
BASELINE_NAMES = {"random_init": "random-init backbone", "raw_pixels": "raw pixels"}


def parse_eval_results(results: dict) -> tuple[dict, dict]:
    """Split eval_results.json into `(ours, baselines)`.

    `ours` maps `(protocol, metric)` to a value (e.g. `("knn", "top1") -> 91.2`); `baselines` maps
    `baseline -> {(protocol, metric): value}` for keys with a suffix (`knn_top1_random_init`). Other keys
    (run statistics such as `global_step`, `dataset`, `protocols`) are not results and are ignored here.
    """
    ours: dict[tuple[str, str], float] = {}
    baselines: dict[str, dict[tuple[str, str], float]] = {}
    for key, value in results.items():
        match = RESULT_KEY.match(key)
        if match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        slot = (match["protocol"], match["metric"])
        if match["baseline"]:
            baselines.setdefault(match["baseline"], {})[slot] = float(value)
        else:
            ours[slot] = float(value)
    return ours, baselines


def metric_label(metric: str) -> str:
    number = metric[len("top") :]
    return f"top-{number} accuracy" if metric.startswith("top") and number.isdigit() else metric


def protocol_label(protocol: str) -> str:
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
                task_name=protocol_label(protocol),
                dataset_type=name,
                dataset_name=name,
                dataset_config=dataset.get("config") or None,
                dataset_split=dataset.get("split") or None,
                metric_type="accuracy",
                metric_name=f"{protocol_label(protocol)}, {metric_label(metric)} (%)",
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
            f"| {protocol_label(slot[0])} | {metric_label(slot[1])} (%) | " + " | ".join(text) + " |"
        )
    return "\n".join(lines)
