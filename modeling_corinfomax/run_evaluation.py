"""How good is the encoder a pretraining run trains: what train.py measures during the run (RankMe of fixed
training images, kNN on the evaluation split, the projection spectrum) and its final report (kNN and the
linear probe of the encoder against a random init and the raw pixels, eval_results.json, training_log.json
and the figures).

The functions take the run's resolved settings (`args`, train.py's parsed flags: image size, mean and
std, channels_last, the image cache's settings) and an `EvalData` (the labelled evaluation rows).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast

from .checkpointing import BEST_MODEL, write_atomically
from .data import (
    ExampleCollator,
    ImageViewDataset,
    InMemoryEvalDataset,
    InMemoryTwoViewDataset,
    IterableImageViewDataset,
    NormalizedBatches,
    eval_view,
    normalize_batch,
)
from .evaluation import (
    BUNDLED_DATASET_NAME,
    EVAL_RESULTS_NAME,
    FROZEN_PROTOCOLS,
    KNN_K,
    KNN_TEMPERATURE,
    evaluate_frozen,
    extract_features,
    knn_accuracy,
    random_init_encoder,
    raw_pixel_features,
    update_eval_results,
)
from .loss import rankme
from .monitoring import projection_spectrum
from .reporting import TRAINING_FIGURE_NAME, TRAINING_LOG_NAME, plot_training, write_embedding_pictures
from .wrappers import corinfomax_encoder

logger = logging.getLogger("corinfomax.train")

EVAL_BATCH_SIZE = 256


@dataclass
class EvalData:
    """The labelled evaluation rows of a run (`rows`: "train" is the kNN bank and the probe's training
    set, "test" the evaluation split, with "num_classes" and "names") and the DataLoader settings that
    read them."""

    rows: dict
    loader_kwargs: dict = field(default_factory=dict)


def fixed_test_batch(eval_rows: dict | None, args) -> torch.Tensor | None:
    """Up to 512 normalised un-augmented test images, for the projection spectrum at start and end."""
    if eval_rows is None:
        return None
    loader = torch.utils.data.DataLoader(eval_rows["test"], batch_size=512, collate_fn=ExampleCollator(True))
    pixels = next(iter(loader)).get("pixel_values")  # None when all of the first 512 are unreadable
    return None if pixels is None else normalize_batch(pixels, args.image_mean, args.image_std)


def rankme_rows(rows, args) -> InMemoryEvalDataset | None:
    """The fixed training images RankMe is measured on: `--rankme_samples` of them, un-augmented (resize
    and centre crop), drawn once with `--seed` (a stream's first ones); None when none can be read."""
    n = args.rankme_samples
    if isinstance(rows, IterableImageViewDataset):
        stream = IterableImageViewDataset(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = list(itertools.islice(stream, n))
    else:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))[:n]
        if isinstance(rows, InMemoryTwoViewDataset):
            labels = torch.full((len(pick),), -1, dtype=torch.long)
            return InMemoryEvalDataset(eval_view(rows.images[pick], args.image_size), labels, pick)
        views = ImageViewDataset(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = [views[i] for i in pick.tolist()]
    batch = ExampleCollator(skip_bad_images=True)(examples)
    if "pixel_values" not in batch:
        return None
    return InMemoryEvalDataset(batch["pixel_values"], batch["labels"], batch["index"])


def probe_rankme(model, images: InMemoryEvalDataset | None, args, accelerator) -> float | None:
    """RankMe of the pooled backbone embeddings of `images` (eval mode, no gradients), computed on the
    main process (which alone holds the images) and sent to the others, so that every process takes the
    same `--save_best_by` decisions; None when there are no images or the embeddings are not finite."""
    score = float("nan")
    if images is not None:
        # Slices, not a DataLoader: starting one draws from the global RNG, which training must not see.
        batches = [
            {
                "pixel_values": images.pixel_values[i : i + EVAL_BATCH_SIZE],
                "labels": images.index[i : i + EVAL_BATCH_SIZE],
            }
            for i in range(0, len(images), EVAL_BATCH_SIZE)
        ]
        features, _ = extract_features(
            model, NormalizedBatches(batches, args.image_mean, args.image_std, args.channels_last)
        )
        if torch.isfinite(features).all():  # diverged weights: the next step's fault check ends the run
            score = rankme(features)
    if accelerator.num_processes > 1:
        score = broadcast(torch.tensor([score], device=accelerator.device)).item()
    return None if math.isnan(score) else score


def eval_split(eval_data: EvalData, split: str, args) -> torch.utils.data.Dataset:
    """The evaluation rows of `split`; with `--image_cache`, made once on first use and kept in memory."""
    rows = eval_data.rows[split]
    if isinstance(rows, ImageViewDataset) and args.image_cache != "off":
        max_bytes = int(args.image_cache_max_gb * 2**30)
        cached = InMemoryEvalDataset.from_views(
            rows, max_bytes, eval_data.loader_kwargs["num_workers"], args.skip_bad_images
        )
        if cached is not None:
            eval_data.rows[split] = rows = cached
    return rows


def eval_features(model, rows, args, accelerator, loader_kwargs):
    """Backbone features of un-augmented images (for kNN and the linear probe)."""
    if isinstance(getattr(rows, "dataset", rows), InMemoryEvalDataset):  # in memory: no workers
        loader_kwargs = {k: loader_kwargs[k] for k in ("collate_fn", "pin_memory")} | {"num_workers": 0}
    loader = torch.utils.data.DataLoader(rows, batch_size=EVAL_BATCH_SIZE, shuffle=False, **loader_kwargs)
    several = accelerator.num_processes > 1
    loader = accelerator.prepare_data_loader(loader) if several else loader
    return extract_features(
        model,
        NormalizedBatches(loader, args.image_mean, args.image_std, args.channels_last),
        accelerator=accelerator if several else None,
    )


def monitor_knn(model, eval_data: EvalData, args, accelerator) -> float:
    """kNN top-1 of the current encoder on the first `--max_eval_samples` of the bank and the test split."""
    n = args.max_eval_samples or len(eval_data.rows["test"])
    encoder, features = corinfomax_encoder(model), {}
    for k in ("train", "test"):
        rows = eval_split(eval_data, k, args)
        subset = torch.utils.data.Subset(rows, range(min(n, len(rows))))
        features[k] = eval_features(encoder, subset, args, accelerator, eval_data.loader_kwargs)
    num_classes = eval_data.rows["num_classes"]
    return knn_accuracy(
        *features["train"], *features["test"], num_classes, k=KNN_K, temperature=KNN_TEMPERATURE
    )["top1"]


def final_report(
    model, state, args, accelerator, eval_data: EvalData | None, seconds: float, spectrum_batch
) -> dict:
    """Evaluate the encoder (`model`, the unwrapped pretraining model) against the baselines; write
    eval_results.json, training_log.json, the figures; print the summary."""
    project = Path(args.output_dir)
    results: dict = {
        "train_runtime_seconds": round(seconds, 1),
        "global_step": state.global_step,
        "skipped_steps": state.skipped_steps,
        "bad_images": state.bad_images,
    }
    if state.best is not None:
        results["best_rankme_step"], results["best_rankme"] = state.best["step"], state.best["rankme"]
        logger.info(
            "best RankMe %.2f at step %d: %s", state.best["rankme"], state.best["step"], project / BEST_MODEL
        )
    if eval_data is not None and args.do_eval:
        results.update(evaluate_with_baselines(model, args, accelerator, eval_data))
    if accelerator.is_main_process:
        try:  # keep what eval.py / finetune.py already wrote there for the same dataset
            update_eval_results(project, results)
        except ValueError as error:
            logger.warning("%s: replacing %s/eval_results.json", error, project)
            write_atomically(project / EVAL_RESULTS_NAME, json.dumps(results, indent=2))
        write_atomically(project / TRAINING_LOG_NAME, json.dumps(state.history, indent=2))
        start = torch.tensor(state.spectrum_start) if state.spectrum_start is not None else None
        end = projection_spectrum(model, spectrum_batch) if spectrum_batch is not None else None
        plot_training(project / TRAINING_FIGURE_NAME, state.history, start, end)
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=2))
    return results


def evaluate_with_baselines(model, args, accelerator, eval_data: EvalData) -> dict:
    """kNN + linear probe of the encoder, and of the random-init and raw-pixel baselines; the pictures."""
    eval_rows = eval_data.rows
    for split in ("train", "test"):
        eval_split(eval_data, split, args)

    def features(encoder, split):
        return eval_features(encoder, eval_rows[split], args, accelerator, eval_data.loader_kwargs)

    ours = {split: features(corinfomax_encoder(model), split) for split in ("train", "test")}
    results = evaluate_frozen(ours["train"], ours["test"], eval_rows["num_classes"])
    if accelerator.is_main_process:
        write_pictures(Path(args.output_dir), ours, eval_rows)
    if args.eval_baselines:
        random_init = random_init_encoder(args.model_config, args.seed).to(accelerator.device)
        if args.channels_last:
            random_init = random_init.to(memory_format=torch.channels_last)
        baselines = {
            "random_init": [features(random_init, split) for split in ("train", "test")],
            "raw_pixels": [raw_pixels(eval_rows[split], args) for split in ("train", "test")],
        }
        for name, (train, test) in baselines.items():
            for key, value in evaluate_frozen(train, test, eval_rows["num_classes"]).items():
                results[f"{key}_{name}"] = value
    results["dataset"] = {
        "name": args.dataset_name or args.train_dir or BUNDLED_DATASET_NAME,
        "config": args.dataset_config_name,
        "split": args.validation_split,
    }
    results["protocols"] = FROZEN_PROTOCOLS
    return results


def raw_pixels(rows, args):
    """Flattened normalised un-augmented pixels of `rows`: the no-learning baseline."""
    loader = torch.utils.data.DataLoader(rows, batch_size=512, collate_fn=ExampleCollator(True))
    return raw_pixel_features(loader, args.image_mean, args.image_std)


def write_pictures(project: Path, features: dict, eval_rows: dict) -> None:
    """`embeddings.png` and `neighbours.png` of the final encoder (the model card shows them)."""
    if any(len(features[split][0]) != len(eval_rows[split]) for split in ("train", "test")):
        logger.info("no embedding pictures: some evaluation images were unreadable (--skip_bad_images)")
        return
    written = write_embedding_pictures(
        project,
        *features["train"],
        *features["test"],
        lambda i: eval_rows["train"][i]["pixel_values"],
        lambda i: eval_rows["test"][i]["pixel_values"],
        class_names=eval_rows["names"],
    )
    logger.info("pictures of the embeddings: %s", ", ".join(str(path) for path in written))
