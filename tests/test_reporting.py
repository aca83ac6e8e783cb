"""The pictures of a trained encoder: PCA map and nearest-neighbour grid, checked against numpy."""

import numpy as np
import torch
from PIL import Image

from modeling_corinfomax.reporting import (
    EMBEDDING_MAP_NAME,
    NEIGHBOURS_NAME,
    nearest_neighbours,
    principal_components,
    spread_queries,
    write_embedding_pictures,
)


def test_principal_components_match_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    points, share = principal_components(torch.from_numpy(features))
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    top = eigenvectors[:, ::-1][:, :2]
    expected = x @ top
    for axis in range(2):  # an axis is defined up to its sign
        sign = np.sign(points[:, axis] @ expected[:, axis])
        np.testing.assert_allclose(sign * points[:, axis], expected[:, axis], atol=1e-10)
    np.testing.assert_allclose(share, eigenvalues[::-1][:2] / eigenvalues.sum(), rtol=1e-10)


def test_nearest_neighbours_are_the_most_cosine_similar():
    rng = np.random.default_rng(1)
    queries, bank = rng.normal(size=(5, 7)), rng.normal(size=(40, 7))
    found = nearest_neighbours(torch.from_numpy(queries), torch.from_numpy(bank), k=4).numpy()
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        bank / np.linalg.norm(bank, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(found, np.argsort(-cosine, axis=1)[:, :4])


def test_queries_cover_every_class_first():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0, 2])
    chosen = spread_queries(labels, 5, len(labels))
    assert chosen[:3] == [0, 3, 5] and len(chosen) == 5 and len(set(chosen)) == 5
    assert spread_queries(None, 3, 10) == [0, 4, 9]


def test_pictures_are_written_and_show_the_neighbours(tmp_path):
    # Two classes of flat grey images; features that put class 1 next to class 1 except one impostor.
    torch.manual_seed(0)
    train_labels = torch.tensor([0] * 10 + [1] * 10)
    test_labels = torch.tensor([0, 1, 0, 1])
    direction = torch.eye(4)
    train = direction[train_labels] + 0.05 * torch.randn(20, 4)
    test = direction[test_labels] + 0.05 * torch.randn(4, 4)
    train[0] = direction[1]  # a class-0 image that sits among class 1: shown framed in red
    images = {"train": [torch.full((1, 28, 28), 40 + 10 * i, dtype=torch.uint8) for i in range(20)],
              "test": [torch.full((1, 28, 28), 200, dtype=torch.uint8) for _ in range(4)]}  # fmt: skip
    written = write_embedding_pictures(
        tmp_path, train, train_labels, test, test_labels,
        images["train"].__getitem__, images["test"].__getitem__, ["top", "trouser"], queries=4, neighbours=3,
    )  # fmt: skip
    assert [p.name for p in written] == [EMBEDDING_MAP_NAME, NEIGHBOURS_NAME]
    grid = np.asarray(Image.open(tmp_path / NEIGHBOURS_NAME).convert("RGB")).astype(int)
    assert grid.shape[0] > 100 and grid.shape[1] > 150  # 4 rows, 1 + 3 columns
    red = (grid[..., 0] > 180) & (grid[..., 1] < 80) & (grid[..., 2] < 80)
    green = (grid[..., 1] > 100) & (grid[..., 0] < 80)
    assert green.sum() > 100 and red.sum() > 20  # the impostor is a neighbour of a class-1 query
    found = nearest_neighbours(test[[1, 3]], train, 3)
    assert (found == 0).any()

    map_picture = np.asarray(Image.open(tmp_path / EMBEDDING_MAP_NAME).convert("RGB"))
    assert map_picture.shape[:2] == (550, 650)
