"""Evaluation of frozen CorInfoMax representations: feature extraction, weighted kNN and linear probes.

- `extract_features`: eval-mode, no-grad embeddings (backbone `pooler_output` or projector output) of a
  whole dataloader, gathered over processes with Accelerate.
- `pooled_features`: one batch's embeddings; `nearest_neighbors`: exact cosine top-k, in blocks.
- `knn_classify` / `knn_accuracy`: the DINO / InstDisc weighted kNN on L2-normalised features.
- `linear_probe`: multinomial logistic regression on precomputed features, solved exactly (L-BFGS).
- `linear_eval`: the paper's linear evaluation on augmented images through the frozen backbone (cosine or
  step schedule, `linear_eval_scheduler`; head `linear_head`).
- `class_balanced_subset`: the fixed, seeded label subsets of the semi-supervised protocol.
- `update_eval_results`: the `eval_results.json` that eval.py, finetune.py and the model cards share.
- `evaluate_frozen`, `random_init_encoder`, `raw_pixel_features`: train.py's report (kNN + linear probe)
  of an encoder and of its two baselines.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigurationError
from .reporting import EVAL_RESULTS_NAME
from .wrappers import unwrap

# The name results on the bundled demo data carry, so that train.py's and eval.py's merge into one file.
BUNDLED_DATASET_NAME = "bundled fashion-mnist subset"
# The kNN protocol of train.py's monitor and report and eval.py's default: cosine similarity, the k
# nearest neighbours' votes weighted by exp(similarity / T) (InstDisc / DINO).
KNN_K, KNN_TEMPERATURE = 20, 0.07


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under the training wrappers, then its `CorInfoMaxModel` if it is a task head."""
    model = unwrap(model)
    return getattr(model, "corinfomax", model)


@contextmanager
def _eval_mode(model: nn.Module):
    """Put every submodule in eval mode, then restore each one's own flag (frozen backbones in a
    training model stay in eval mode, for instance)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def pooled_features(
    encoder: nn.Module, pixel_values: torch.Tensor, use_projector: bool = False
) -> torch.Tensor:
    """(B, F) float32 embeddings of normalised (B, 3, H, W) `pixel_values`: the model's `pooler_output` (the
    backbone's pooled features, what the paper evaluates), or its `projections`. Call it without gradients
    and in eval mode (`_eval_mode`)."""
    out = encoder(pixel_values=pixel_values)
    feats = out.projections if use_projector else out.pooler_output
    if feats is None:
        raise ValueError(
            f"{type(encoder).__name__} returned no {'projections' if use_projector else 'pooler_output'}; "
            "embeddings need a model whose output has a pooled embedding."
        )
    return feats.float().flatten(1)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    accelerator=None,
    use_projector: bool = False,
    progress_bar: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of `dataloader` with the frozen model, in eval mode and without gradients.

    Args:
        model: a `CorInfoMaxModel`, a model holding one as `.corinfomax` (`CorInfoMaxForPreTraining`,
            `CorInfoMaxForImageClassification`), possibly wrapped by DDP or `accelerator.prepare`, or any
            model whose output has `pooler_output` (e.g. a `TimmWrapperModel`).
        dataloader: yields dicts with `pixel_values` (B, 3, H, W) and `labels` (B,). With an
            `accelerator`, pass the dataloader returned by `accelerator.prepare` so that every process
            sees its shard and `gather_for_metrics` drops the samples duplicated to even out shards.
        accelerator: an `accelerate.Accelerator`; features are then computed under its autocast
            (bf16/fp16 as configured) and gathered from all processes.
        use_projector: return the projector output (`projections`) instead of the pre-projector
            embedding (`pooler_output`, what the paper evaluates).
        progress_bar: show a tqdm bar (on the main process only).

    Returns:
        `(features, labels)`: float32 (N, F) and int64 (N,) CPU tensors, N the dataset size, in
        dataloader order. Every process gets the full tensors. The model's train/eval flags are
        restored afterwards.
    """
    encoder = _unwrap(model)
    if use_projector and getattr(encoder, "projector", None) is None:
        raise ValueError(
            f"use_projector=True but {type(encoder).__name__} has no projector (a classification checkpoint "
            "or a base model saved without one). Evaluate the backbone (use_projector=False) or load a "
            "pretraining checkpoint."
        )
    device = accelerator.device if accelerator is not None else next(encoder.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    show = progress_bar and (accelerator is None or accelerator.is_local_main_process)
    features, labels = [], []
    with _eval_mode(encoder):
        for batch in tqdm(dataloader, desc="features", disable=not show):
            if "pixel_values" not in batch or "labels" not in batch:
                raise KeyError(
                    f"extract_features needs batches with 'pixel_values' and 'labels'; got keys {sorted(batch)}. "
                    "Rename the columns in your transform or collate function."
                )
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            batch_labels = batch["labels"].to(device, non_blocking=True)
            with autocast():
                feats = pooled_features(encoder, pixel_values, use_projector)
            if accelerator is not None:
                feats, batch_labels = accelerator.gather_for_metrics((feats, batch_labels))
            features.append(feats.cpu())
            labels.append(batch_labels.cpu().long())
    if not features:
        raise ValueError("extract_features got an empty dataloader: check the dataset split and its size.")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Weighted k-nearest-neighbour class scores (Wu et al. 2018, InstDisc; Caron et al. 2021, DINO).

    Features are L2-normalised, so similarity is cosine. Each test sample's `k` most similar training
    samples vote for their class with weight `exp(s / temperature)`:

        score[i, c] = sum_{j in topk(i)} exp(s_ij / T) * [y_j == c]

    Args:
        train_features: (N_train, F) the memory bank (un-augmented training images).
        train_labels: (N_train,) int class indices in [0, num_classes).
        test_features: (N_test, F).
        num_classes: C.
        k: neighbours (clipped to N_train); 20 and 200 are the usual values.
        temperature: T; 0.07 (DINO, InstDisc) or 0.1 (lightly, VISSL).
        chunk_size: test samples per similarity block; peak memory is about
            `chunk_size * N_train * 4` bytes.

    Returns:
        (N_test, C) float32 scores on the features' device; `argmax` is the prediction.

    Example:
        >>> scores = knn_classify(train_x, train_y, test_x, num_classes=10, k=20)
        >>> predictions = scores.argmax(dim=1)  # doctest: +SKIP
    """
    if (
        train_features.ndim != 2
        or test_features.ndim != 2
        or train_features.shape[1] != test_features.shape[1]
    ):
        raise ValueError(
            f"expected (N, F) train and test features of the same width; got {tuple(train_features.shape)} "
            f"and {tuple(test_features.shape)}."
        )
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"train_labels {tuple(train_labels.shape)} must have one label per train feature.")
    if k < 1 or not temperature > 0 or chunk_size < 1:
        raise ValueError(f"k={k}, chunk_size={chunk_size} must be >= 1 and temperature={temperature} > 0.")
    device = train_features.device
    top_similarity, top_index = nearest_neighbors(train_features, k, test_features, device, chunk_size)
    scores = torch.zeros(test_features.shape[0], num_classes, device=device)
    return scores.scatter_add_(
        1, train_labels.to(device).long()[top_index], (top_similarity / temperature).exp()
    )


@torch.no_grad()
def nearest_neighbors(
    embeddings: torch.Tensor | np.ndarray,
    k: int,
    queries: torch.Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine nearest neighbours: the `k` rows of `embeddings` (N, F) most similar to each query.

    The rows are L2-normalised once and kept on `device` (default: where `embeddings` are); the queries
    go through in blocks of `chunk` rows, so peak memory is about `chunk * N * 4` bytes. Without
    `queries`, each row is the query and is left out of its own neighbours (k is then clipped to N - 1).

    Returns:
        `(similarities, indices)`: (Q, k) float32 cosine similarities, most similar first, and (Q, k) int64
        row indices into `embeddings`, on `device`.

    Example:
        >>> similarities, indices = nearest_neighbors(features, k=10)  # each row's 10 others  # doctest: +SKIP
    """
    bank = torch.as_tensor(embeddings)
    device = torch.device(device) if device is not None else bank.device
    bank = F.normalize(bank.to(device).float(), dim=1)
    own = queries is None
    queries = bank if own else F.normalize(torch.as_tensor(queries).to(device).float(), dim=1)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"expected (N, F) embeddings and queries of the same width; got {tuple(bank.shape)} "
            f"and {tuple(queries.shape)}."
        )
    k = min(k, bank.shape[0] - own)
    if k < 1 or chunk < 1:
        raise ValueError(
            f"k={k} and chunk={chunk} must be >= 1 (k is clipped to the rows that can be neighbours)."
        )
    similarities, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ bank.T
        if own:  # a row is not its own neighbour
            rows = torch.arange(start, start + similarity.shape[0], device=device)
            similarity[rows - start, rows] = -float("inf")
        top = similarity.topk(k, dim=1)
        similarities.append(top.values)
        indices.append(top.indices)
    if not similarities:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    return torch.cat(similarities), torch.cat(indices)


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies in percent, as `{"top1": ..., "top5": ...}`; k is clipped to the number of classes."""
    labels = labels.to(scores.device)
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).sum().item() / max(1, len(labels)) for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of `knn_classify`: `{"top1": ..., "top5": ...}`."""
    scores = knn_classify(
        train_features, train_labels, test_features, num_classes, k=k, temperature=temperature
    )
    return topk_accuracy(scores, test_labels)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
) -> dict[str, float]:
    """Multinomial logistic regression on frozen, precomputed features, solved to its optimum; top-1/top-5
    test accuracy (percent).

    The fast linear evaluation (`eval.py --precompute_features`, train.py's report). Features are
    standardised with the training set's mean and std (ddof 1, floored at 1e-6); a linear layer
    `logits = x W^T + b` minimises the convex objective

        mean cross-entropy + weight_decay / 2 * ||W||^2        (the bias is not penalised)

    with full-batch L-BFGS (strong-Wolfe line search) from zero. It stops when the largest gradient entry
    is below `tolerance`, when 25 iterations lower the objective by less than 1e-6 of its value (float32
    resolution), or after `max_iter` iterations (with a warning). The search runs in whitened coordinates, W = V (S + weight_decay I)^-1/2 with S the
    covariance of up to 8,192 training rows: an invertible change of variables, so the objective and its
    optimum are unchanged, reached in about a third of the iterations on correlated features such as
    pixels. This is scikit-learn's `LogisticRegression(C=1 / (weight_decay * N))` on N training rows; on
    24,000 x 784 Fashion-MNIST pixels the objective ends within 1e-5 of a float64 solution (float32
    precision) and the test accuracy within 0.05 points, in 14 s on 2 idle CPU cores (about 60 s
    when other jobs share them). The optimum is unique, so there is no seed.

    Unlike `linear_eval` (the paper's protocol) there is no augmentation, so report it as a different
    protocol.

    Returns:
        `{"top1": ..., "top5": ..., "train_top1": ..., "objective": ..., "iterations": ...}`: the
        accuracies in percent, the objective's final value and the L-BFGS iterations taken.
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows.")
    if not weight_decay > 0 or max_iter < 1 or not tolerance > 0:
        raise ValueError(
            f"weight_decay={weight_decay} and tolerance={tolerance} must be > 0 (without weight decay "
            f"separable classes have no optimum) and max_iter={max_iter} >= 1."
        )
    x_train = train_features.float()
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_test = (test_features.float().to(x_train.device) - mean) / std
    y_train = train_labels.to(x_train.device).long()

    weight, bias, objective, iterations = _fit_logistic_regression(
        x_train, y_train, num_classes, weight_decay, max_iter, tolerance
    )
    if iterations >= max_iter:
        warnings.warn(
            f"linear_probe stopped at max_iter={max_iter} L-BFGS iterations before converging (objective "
            f"{objective:.6g}); pass a larger max_iter, or a larger weight_decay.",
            stacklevel=2,
        )
    results = topk_accuracy(torch.addmm(bias, x_test, weight.T), test_labels)
    results["train_top1"] = topk_accuracy(torch.addmm(bias, x_train, weight.T), y_train, ks=(1,))["top1"]
    return {**results, "objective": objective, "iterations": iterations}


class _WhitenedCoordinates:
    """The probe's search coordinates: `weight = v (S + ridge I)^-1/2`, S the second moment of the
    (centred) training rows `x` on a strided subset of up to `max_rows` of them. An invertible change of
    variables, so the objective and its optimum are unchanged. Three forms of the same map:

    - F <= n (encoder features): the (F, F) matrix is formed;
    - F > N and all N rows used (the raw pixels of a photo folder: 37,632 at 112 px): S has rank <= N, the
      optimum's weight lies in the rows' span (the cross-entropy's gradient does, and the penalty pulls the
      rest to zero), so the search runs on the N x k whitened row coordinates `inputs` from the (N, N) Gram
      matrix, about F/k times cheaper per step than any (F, ...) form, with the same optimum;
    - F > n otherwise (more rows than the subset): the low-rank map plus `ridge^-1/2` times the identity,
      without an (F, F) matrix (which would take 8 GiB and minutes of `eigh` at 104 px, 180 GiB at 224).
    """

    def __init__(self, x: torch.Tensor, ridge: float, max_rows: int = 8192):
        rows = x[:: math.ceil(x.shape[0] / max_rows)].double()
        n, features = rows.shape
        self.inputs, self.ridge = x, ridge
        if features <= n:
            self.form = "matrix"
            eigenvalues, eigenvectors = torch.linalg.eigh(rows.T @ rows / n)
            scale = (eigenvalues.clamp_min(0) + ridge).rsqrt()
            self.matrix = ((eigenvectors * scale) @ eigenvectors.T).to(x.dtype)
            return
        eigenvalues, u = torch.linalg.eigh(rows @ rows.T / n)  # S's nonzero eigenvalues, on the rows' side
        keep = eigenvalues > eigenvalues.max().clamp_min(1e-300) * 1e-12
        eigenvalues, u = eigenvalues[keep], u[:, keep]
        self.vectors = ((rows.T @ u) / (n * eigenvalues).sqrt()).to(x.dtype)  # (F, k) orthonormal
        self.scale = (eigenvalues + ridge).rsqrt().to(x.dtype)
        self.form = "rows" if n == x.shape[0] else "low-rank"
        if self.form == "rows":  # x @ vectors = u * sqrt(n * eigenvalues): no (N, F) product needed
            self.inputs = (u * (n * eigenvalues).sqrt()).to(x.dtype) * self.scale

    @property
    def width(self) -> int:
        """The number of coordinates per class."""
        return self.inputs.shape[1]

    def weight(self, v: torch.Tensor) -> torch.Tensor:
        """The probe's (C, F) weight at coordinates `v`."""
        if self.form == "matrix":
            return v @ self.matrix
        if self.form == "rows":
            return (v * self.scale) @ self.vectors.T
        outside = self.ridge**-0.5  # S's null space
        return ((v @ self.vectors) * (self.scale - outside)) @ self.vectors.T + v * outside

    def objective(self, v: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, weight_decay: float):
        """Mean cross-entropy + weight_decay / 2 * ||weight||^2 at coordinates `v`."""
        if self.form == "rows":  # ||(v * scale) vectors^T||^2 with orthonormal vectors
            logits, penalty = torch.addmm(bias, self.inputs, v.T), (v * self.scale).square().sum()
        else:
            weight = self.weight(v)
            logits, penalty = torch.addmm(bias, self.inputs, weight.T), weight.square().sum()
        return F.cross_entropy(logits, y) + 0.5 * weight_decay * penalty


_STALL_CHECK_ITERATIONS = 25


@torch.enable_grad()
def _fit_logistic_regression(x, y, num_classes, weight_decay, max_iter, tolerance):
    """The minimiser `(W, b)` of the probe's objective on standardised `x`, its value and the iterations."""
    # The Hessian scales with the feature covariance: in these coordinates it is close to the identity
    # (up to the softmax curvature), where L-BFGS needs far fewer steps than on raw correlated features.
    coordinates = _WhitenedCoordinates(x, weight_decay)
    v = torch.zeros(num_classes, coordinates.width, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [v, bias],
        lr=1.0,
        max_iter=_STALL_CHECK_ITERATIONS,
        max_eval=10 * _STALL_CHECK_ITERATIONS,  # so that only convergence ends a round early
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return coordinates.objective(v, bias, y, weight_decay)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = objective()
        loss.backward()
        return loss

    # Rounds of L-BFGS (its history carries over). Near the optimum float32 rounding lets it creep on by
    # a few ulps per step for hundreds of steps: a round that gains less than 1e-6 of the objective ends it.
    iterations, value = 0, math.inf
    while iterations < max_iter:
        optimizer.param_groups[0]["max_iter"] = min(_STALL_CHECK_ITERATIONS, max_iter - iterations)
        optimizer.step(closure)
        done = optimizer.state[v]["n_iter"] - iterations
        iterations += done
        with torch.no_grad():
            previous, value = value, objective().item()
        if done < optimizer.param_groups[0]["max_iter"] or previous - value <= 1e-6 * abs(value):
            break  # converged (gradient or step below tolerance) or stalled
    with torch.no_grad():
        weight = coordinates.weight(v)
    return weight, bias.detach(), value, iterations


def _feature_dim(encoder: nn.Module, use_projector: bool) -> int:
    """Width of the features `extract_features` returns for `encoder`."""
    if use_projector:
        return int(encoder.config.projector_dims[-1])
    for module in (encoder, getattr(encoder, "timm_model", None), getattr(encoder, "backbone", None)):
        width = getattr(module, "num_features", None)
        if isinstance(width, int):
            return width
    raise ValueError(
        f"cannot tell the embedding width of {type(encoder).__name__} (no `num_features`): evaluate a "
        "CorInfoMax or timm-based model, or use the precomputed-feature probe (`linear_probe`)."
    )


# The official linear evaluations step their schedule once per epoch: a cosine from `lr` to `min_lr`
# (CIFAR, Tiny ImageNet, ImageNet-100) or x`lr_gamma` every `lr_step_size` epochs (ImageNet-1K).
LINEAR_EVAL_SCHEDULES = {
    "cosine": lambda optimizer, epochs, min_lr, step_size, gamma: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs, eta_min=min_lr
    ),
    "step": lambda optimizer, epochs, min_lr, step_size, gamma: torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=step_size, gamma=gamma
    ),
}


def linear_eval_scheduler(
    optimizer: torch.optim.Optimizer,
    lr_schedule: str,
    epochs: int,
    min_lr: float = 0.0,
    lr_step_size: int = 20,
    lr_gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule of `linear_eval`: `"cosine"` (from the optimizer's lr to
    `min_lr` over `epochs`) or `"step"` (lr * lr_gamma ** (epoch // lr_step_size))."""
    if lr_schedule not in LINEAR_EVAL_SCHEDULES:
        raise ValueError(
            f"lr_schedule={lr_schedule!r} is not one of {sorted(LINEAR_EVAL_SCHEDULES)}: use 'cosine' "
            "(CIFAR, Tiny ImageNet, ImageNet-100) or 'step' (ImageNet-1K)."
        )
    if lr_step_size < 1:
        raise ValueError(f"lr_step_size={lr_step_size} must be >= 1 (epochs between decays).")
    return LINEAR_EVAL_SCHEDULES[lr_schedule](optimizer, epochs, min_lr, lr_step_size, lr_gamma)


def linear_head(in_features: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """`nn.Linear(in_features, num_classes)` with PyTorch's default init (weights and bias uniform in
    +-1/sqrt(in_features)), as the official linear classifier, drawn from `seed` without moving the
    global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


def linear_eval(
    model: nn.Module,
    train_dataloader: Iterable[Mapping[str, torch.Tensor]],
    eval_dataloader: Iterable[Mapping[str, torch.Tensor]],
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.2,
    lr_schedule: str = "cosine",
    min_lr: float = 2e-3,
    lr_step_size: int = 20,
    lr_gamma: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    accelerator=None,
    use_projector: bool = False,
    seed: int = 0,
    progress_bar: bool = False,
) -> dict[str, float]:
    """The paper's linear evaluation: a linear head on the frozen backbone, trained on augmented images.

    Official protocols: the backbone stays in eval mode (BatchNorm uses its running statistics) and gets
    no gradient; features are not normalised; the head (`linear_head`: nn.Linear's default init, seeded)
    is trained with SGD (momentum 0.9, no weight decay) for 100 epochs at a global batch of 256, the
    learning rate stepped once per epoch:
    - CIFAR-10/100, Tiny ImageNet, ImageNet-100: lr 0.2, cosine to `min_lr` 2e-3 (the defaults);
    - ImageNet-1K: lr 25, `lr_schedule="step"`, x0.1 every 20 epochs.
    Train images: RandomResizedCrop (scale 0.08-1, bicubic) + horizontal flip; test images: resize to 8/7
    of the crop size + centre crop. The loaders carry those transforms; top-1/top-5 are measured after
    the last epoch.

    Args:
        model: as for `extract_features`.
        train_dataloader, eval_dataloader: yield dicts with `pixel_values` and `labels`; with an
            `accelerator`, pass the loaders returned by `accelerator.prepare`. A train dataset with
            `set_epoch` (seeded augmentations) is told the epoch.
        num_classes: C.
        lr_schedule, min_lr, lr_step_size, lr_gamma: see `linear_eval_scheduler`.
        accelerator: trains the head with DDP across processes and gathers the test predictions.

    Returns:
        `{"top1": ..., "top5": ...}` in percent on `eval_dataloader`.
    """
    from .data.datasets import set_epoch  # noqa: PLC0415

    encoder = _unwrap(model)
    device = accelerator.device if accelerator is not None else next(encoder.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    show = progress_bar and (accelerator is None or accelerator.is_local_main_process)

    head = linear_head(_feature_dim(encoder, use_projector), num_classes, seed).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    # Stepped once per epoch, as the official code; not passed to `accelerator.prepare`, whose scheduler
    # wrapper would step it once per process.
    scheduler = linear_eval_scheduler(optimizer, lr_schedule, epochs, min_lr, lr_step_size, lr_gamma)
    if accelerator is not None:
        head, optimizer = accelerator.prepare(head, optimizer)

    def embed(batch) -> torch.Tensor:
        with torch.no_grad(), autocast():
            out = encoder(pixel_values=batch["pixel_values"].to(device, non_blocking=True))
        return (out.projections if use_projector else out.pooler_output).float().flatten(1)

    with _eval_mode(encoder):
        for epoch in tqdm(range(epochs), desc="linear eval", disable=not show):
            set_epoch(train_dataloader, epoch)
            head.train()
            for batch in train_dataloader:
                loss = F.cross_entropy(head(embed(batch)), batch["labels"].to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                optimizer.step()
            scheduler.step()
        head.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in eval_dataloader:
                batch_logits = head(embed(batch))
                batch_labels = batch["labels"].to(device, non_blocking=True)
                if accelerator is not None:
                    batch_logits, batch_labels = accelerator.gather_for_metrics((batch_logits, batch_labels))
                logits.append(batch_logits.float().cpu())
                labels.append(batch_labels.cpu())
    return topk_accuracy(torch.cat(logits), torch.cat(labels))


def class_balanced_subset(labels: Iterable[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a fixed, seeded, class-balanced subset with `fraction` of each class's images (at
    least one per class), for the semi-supervised protocol (`--train_fraction 0.01` / `0.1`).

    Each class keeps `max(1, round(fraction * n_c))` of its `n_c` images, drawn with
    `numpy.random.default_rng(seed)`; the same labels, fraction and seed always give the same subset.
    Returns sorted int64 indices into `labels`.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"fraction={fraction} must be in (0, 1], e.g. 0.01 or 0.1 for 1% or 10% of the labels."
        )
    labels = np.asarray(list(labels))
    if (labels < 0).any():
        raise ValueError(
            "class_balanced_subset needs a label for every image; found negative (missing) labels."
        )
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        picks.append(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _same_dataset(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(key) == b.get(key) for key in ("name", "config", "split"))


def check_eval_results(output_dir: str | Path, dataset: Mapping[str, Any]) -> None:
    """Raise before any work if `<output_dir>/eval_results.json` holds results for another dataset or
    split, which a merge would mix up in the model card."""
    path = Path(output_dir) / EVAL_RESULTS_NAME
    if not path.is_file():
        return
    existing = json.loads(path.read_text()).get("dataset")
    if existing and not _same_dataset(existing, dataset):
        raise ConfigurationError(
            f"{path} holds results on dataset {dict(existing)} and this run evaluates on {dict(dataset)}; "
            "merging them would mislabel the results. Pick another --output_dir, or delete the file."
        )


def update_eval_results(output_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `results` into `<output_dir>/eval_results.json` and return the merged dict.

    The file is shared by eval.py (`knn_top1/5`, `linear_top1/5`), finetune.py (`finetune_top1/5`) and
    train.py, and read by the model card: flat `<protocol>_top<k>` keys, a `"dataset"` with `name`,
    `config` and `split`, and `"protocols"` with each protocol's parameters. New keys replace old
    ones; other protocols' results and parameters are kept. Written atomically.
    """
    if results.get("dataset"):
        check_eval_results(output_dir, results["dataset"])
    path = Path(output_dir) / EVAL_RESULTS_NAME
    existing = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**existing, **results}
    merged["protocols"] = {**existing.get("protocols", {}), **results.get("protocols", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)
    return merged


# ----------------------------------------------------------------------------------- train.py's baselines


# What train.py's report (`evaluate_frozen`) records as its protocols in eval_results.json.
FROZEN_PROTOCOLS = {
    "knn": {
        "k": KNN_K,
        "temperature": KNN_TEMPERATURE,
        "similarity": "cosine",
        "features": "backbone, un-augmented",
    },
    "linear": {"method": "logistic regression on frozen precomputed backbone features"},
}


def evaluate_frozen(train: tuple, test: tuple, num_classes: int) -> dict[str, float]:
    """kNN (`KNN_K`, `KNN_TEMPERATURE`) and the exact linear probe of `(features, labels)` pairs:
    `{"knn_top1": ..., "linear_top1": ...}` in percent."""
    knn = knn_accuracy(*train, *test, num_classes, k=KNN_K, temperature=KNN_TEMPERATURE)
    linear = linear_probe(*train, *test, num_classes)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


def random_init_encoder(config, seed: int = 0) -> nn.Module:
    """The fair untrained baseline of `config`'s encoder: the same architecture, seeded, without a
    projector and without timm's zero-init of the last BatchNorm of each residual block (with it,
    untrained, every image maps to nearly the same vector), where the architecture has that option."""
    from .configuration_corinfomax import CorInfoMaxConfig  # noqa: PLC0415
    from .modeling_corinfomax import CorInfoMaxModel  # noqa: PLC0415

    def build(kwargs: dict) -> nn.Module:
        torch.manual_seed(seed)
        encoder_config = CorInfoMaxConfig(**{**config.to_dict(), "backbone_kwargs": kwargs})
        return CorInfoMaxModel(encoder_config, add_projector=False)

    try:
        return build({**config.backbone_kwargs, "zero_init_last": False})
    except TypeError:  # the architecture has no such option (no timm model builds to read it from)
        return build(dict(config.backbone_kwargs))


def raw_pixel_features(
    batches: Iterable[Mapping[str, torch.Tensor]], mean, std
) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-learning baseline: flattened normalised pixels of uint8 `pixel_values` batches, and labels.
    Grey images decoded to three equal channels keep one copy of each pixel (three would divide the
    probe's L2 penalty by three and slow its convergence)."""
    from .data import normalize_batch  # noqa: PLC0415

    xs, ys, grey = [], [], True
    for batch in batches:
        pixels = batch["pixel_values"]
        grey = grey and bool((pixels == pixels[:, :1]).all())
        xs.append(normalize_batch(pixels, mean, std))
        ys.append(batch["labels"])
    return torch.cat(xs)[:, : 1 if grey else None].flatten(1), torch.cat(ys)


__all__ = [
    "BUNDLED_DATASET_NAME",
    "EVAL_RESULTS_NAME",
    "FROZEN_PROTOCOLS",
    "KNN_K",
    "KNN_TEMPERATURE",
    "evaluate_frozen",
    "random_init_encoder",
    "raw_pixel_features",
    "LINEAR_EVAL_SCHEDULES",
    "check_eval_results",
    "class_balanced_subset",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "linear_eval",
    "linear_eval_scheduler",
    "linear_head",
    "linear_probe",
    "nearest_neighbors",
    "pooled_features",
    "topk_accuracy",
    "update_eval_results",
]
