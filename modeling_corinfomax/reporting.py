"""Pictures of a trained encoder: a 2-D map of its embeddings and a nearest-neighbour grid.

Both are written next to the model by train.py (with labels, after the final evaluation) and copied into
the model cards by `export.prepare_artifacts`. They need matplotlib, which the scripts import lazily.
`plot_training` draws the run's loss curves and projection spectrum (`training.png`).
`draw_map` is the scatter behind `embeddings.png`, also for corinfomax-embed's `--map` (with a query point).

- `embeddings.png`: the test embeddings projected on their first two principal components (of the
  L2-normalised features, the geometry kNN uses), one colour per class when labels exist.
- `neighbours.png`: a few test images (first column) and their nearest training images by cosine
  similarity; a neighbour of another class is framed in red.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TRAINING_ARGS_NAME = "training_args.json"  # every resolved flag of the run
EVAL_RESULTS_NAME = "eval_results.json"  # what train.py, eval.py and finetune.py measured; the cards read it
TRAINING_LOG_NAME = "training_log.json"  # one record per --logging_steps
TRAINING_FIGURE_NAME = "training.png"  # loss curves and the projection spectrum
EMBEDDING_MAP_NAME = "embeddings.png"
NEIGHBOURS_NAME = "neighbours.png"
FIGURE_CAPTIONS = {
    EMBEDDING_MAP_NAME: "Test embeddings, first two principal components",
    NEIGHBOURS_NAME: "Test images (left) and their nearest training images",
}


class PrincipalAxes:
    """The first `n` principal axes of L2-normalised features, fitted once; `place` puts any features
    (normalised alike) on them, so a map stays the same whatever is placed on it later."""

    def __init__(self, features: torch.Tensor, n: int = 2):
        x = F.normalize(torch.as_tensor(features).double(), dim=1)
        self.mean = x.mean(dim=0)
        _, s, v = torch.linalg.svd(x - self.mean, full_matrices=False)
        variance = s.square()
        self.axes = v[:n].T
        self.share = (variance[:n] / variance.sum().clamp_min(1e-300)).numpy()

    def place(self, features: torch.Tensor) -> np.ndarray:
        """(M, n) coordinates of `features` (M, D) on the axes."""
        return ((F.normalize(torch.as_tensor(features).double(), dim=1) - self.mean) @ self.axes).numpy()


def principal_components(features: torch.Tensor, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The L2-normalised `features` on their first `n` principal axes, and each axis's share of variance."""
    axes = PrincipalAxes(features, n)
    return axes.place(features), axes.share


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Indices into `bank` of the `k` most cosine-similar rows to each query, most similar first."""
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    return similarity.topk(min(k, bank.shape[0]), dim=1).indices


def spread_queries(labels: torch.Tensor | None, count: int, total: int) -> list[int]:
    """`count` query positions: one per class in turn (first occurrences) when labelled, else evenly spaced."""
    if labels is None or labels.numel() == 0:
        return np.linspace(0, total - 1, min(count, total)).astype(int).tolist()
    chosen: list[int] = []
    per_class = {int(c): torch.nonzero(labels == c).flatten().tolist() for c in labels.unique()}
    depth = 0
    while len(chosen) < min(count, total):
        added = False
        for positions in per_class.values():
            if depth < len(positions) and len(chosen) < count:
                chosen.append(positions[depth])
                added = True
        if not added:
            break
        depth += 1
    return chosen


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_embedding_map(
    path: str | Path,
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
) -> Path:
    """Scatter the first two principal components of `features` (coloured by `labels`) into `path`."""
    keep = torch.arange(features.shape[0])
    if features.shape[0] > max_points:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
    points, share = principal_components(features[keep])
    draw_map(
        points,
        None if labels is None else labels[keep].numpy(),
        class_names,
        path=path,
        title=f"{len(keep)} test embeddings (PCA of L2-normalised features)",
        axis_labels=(
            f"PC 1 ({100 * share[0]:.1f}% of variance)",
            f"PC 2 ({100 * share[1]:.1f}% of variance)" if len(share) > 1 else "PC 2",
        ),
    )
    return Path(path)


def draw_map(
    points: np.ndarray,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    label_names: Sequence[str] | None = None,
    query: Sequence[float] | np.ndarray | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    axis_labels: tuple[str, str] = ("PC 1", "PC 2"),
) -> Image.Image:
    """A scatter of 2-D `points` (N, 2), one colour per class of `labels` (named by `label_names`), with an
    optional `query` point marked by a black star; returned as a PIL image (650x550) and, with `path`,
    written there as a PNG (under a temporary name, then renamed).

    Example:
        >>> picture = draw_map(project_2d(embeddings), labels, names, path="map.png")  # doctest: +SKIP
    """
    plt = _pyplot()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
    size = float(np.clip(3000 / max(len(points), 1), 4, 30))  # a few points drawn large, many small
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=size, alpha=0.6)
    else:
        labels = np.asarray(labels)
        cmap = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
        for i, c in enumerate(np.unique(labels)):
            name = label_names[c] if label_names is not None and 0 <= c < len(label_names) else str(c)
            where = labels == c
            ax.scatter(
                points[where, 0], points[where, 1], s=size, alpha=0.6, color=cmap(i % cmap.N), label=name
            )
    if query is not None:
        x, y = np.asarray(query, dtype=np.float64).reshape(2)
        ax.scatter(
            [x], [y], s=220, marker="*", color="black", edgecolors="white", linewidths=1, label="query"
        )
    if labels is not None or query is not None:
        ax.legend(
            markerscale=max(1.0, 12 / size) if query is None else 1, fontsize=7, loc="best", frameon=False
        )
    ax.set(title=title or f"{len(points)} embeddings", xlabel=axis_labels[0], ylabel=axis_labels[1])
    fig.tight_layout()
    fig.canvas.draw()
    picture = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    plt.close(fig)
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".tmp-{path.name}")
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    return picture


def _as_picture(image: torch.Tensor) -> np.ndarray:
    """A uint8 CHW (or HW) tensor as an HWC/HW array for imshow."""
    array = image.cpu().numpy()
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)
        if array.shape[2] == 1:
            array = array[..., 0]
    return array


def plot_neighbours(
    path: str | Path,
    query_images: Sequence[torch.Tensor],
    neighbour_images: Sequence[Sequence[torch.Tensor]],
    query_labels: Sequence[int] | None = None,
    neighbour_labels: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """A grid: one row per query (its image first), then its neighbours; wrong-class neighbours in red."""
    plt = _pyplot()
    rows, columns = len(query_images), 1 + max(len(n) for n in neighbour_images)
    fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.15 * rows), squeeze=False)
    for r in range(rows):
        cells = [query_images[r], *neighbour_images[r]]
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            picture = _as_picture(cells[c])
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            if query_labels is not None and neighbour_labels is not None:
                if c == 0:
                    label = int(query_labels[r])
                    name = class_names[label] if class_names and label < len(class_names) else str(label)
                    ax.set_ylabel(name, fontsize=7)
                    colour = "black"
                else:
                    same = int(neighbour_labels[r][c - 1]) == int(query_labels[r])
                    colour = "tab:green" if same else "tab:red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2 if c else 1)
    axes[0][0].set_title("query", fontsize=8)
    for c in range(1, columns):
        axes[0][c].set_title(f"#{c}", fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_embedding_pictures(
    output_dir: str | Path,
    train_features: torch.Tensor,
    train_labels: torch.Tensor | None,
    test_features: torch.Tensor,
    test_labels: torch.Tensor | None,
    image_of_train,
    image_of_test,
    class_names: Sequence[str] | None = None,
    queries: int = 8,
    neighbours: int = 8,
) -> list[Path]:
    """Write `embeddings.png` and `neighbours.png` into `output_dir`; returns their paths.

    `image_of_train(i)` / `image_of_test(i)` return the uint8 image of row `i` of the split whose
    features are row `i` of `train_features` / `test_features`.
    """
    output_dir = Path(output_dir)
    written = [plot_embedding_map(output_dir / EMBEDDING_MAP_NAME, test_features, test_labels, class_names)]
    chosen = spread_queries(test_labels, queries, test_features.shape[0])
    found = nearest_neighbours(test_features[chosen], train_features, neighbours)
    written.append(
        plot_neighbours(
            output_dir / NEIGHBOURS_NAME,
            [image_of_test(i) for i in chosen],
            [[image_of_train(int(j)) for j in row] for row in found],
            None if test_labels is None else [int(test_labels[i]) for i in chosen],
            None if train_labels is None else [[int(train_labels[j]) for j in row] for row in found],
            class_names,
        )
    )
    return written


def plot_training(path: Path, history: list[dict], spectrum_start, spectrum_end) -> None:
    """Loss curves (total and the two terms) and the projection covariance spectrum at start vs end."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    steps = [h["step"] for h in history]
    for ax, key, title in zip(
        axes[:3],
        ("loss", "invariance_loss", "covariance_loss"),
        ("CorInfoMax loss", "invariance term (MSE)", "covariance term (-logdet/D)"),
        strict=True,
    ):
        ax.plot(steps, [h[key] for h in history])
        ax.set(title=title, xlabel="step")
    ax = axes[3]
    if spectrum_start is not None and spectrum_end is not None:
        ax.semilogy(spectrum_start.clamp_min(1e-12).numpy(), label="start")
        ax.semilogy(spectrum_end.clamp_min(1e-12).numpy(), label="end")
        ax.legend()
    ax.set(title="projection covariance eigenvalues", xlabel="index (sorted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
