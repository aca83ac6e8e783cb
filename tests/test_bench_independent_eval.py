"""bench/independent_eval.py: its kNN and logistic regression against direct computations."""

import importlib.util
import sys

import numpy as np
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))  # its sibling scripts, as when run from bench/
spec = importlib.util.spec_from_file_location("independent_eval", REPO_ROOT / "bench" / "independent_eval.py")
independent_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(independent_eval)


def test_knn_matches_a_loop_over_queries():
    rng = np.random.default_rng(0)
    bank, test = rng.normal(size=(120, 6)), rng.normal(size=(30, 6))
    bank_labels, test_labels = rng.integers(0, 3, 120), rng.integers(0, 3, 30)
    correct = 0
    for query, label in zip(test, test_labels, strict=True):
        cosine = bank @ query / np.linalg.norm(bank, axis=1) / np.linalg.norm(query)
        top = np.argsort(-cosine)[:20]
        votes = [np.exp(cosine[top][bank_labels[top] == c] / 0.07).sum() for c in range(3)]
        correct += int(np.argmax(votes) == label)
    assert independent_eval.knn(bank, bank_labels, test, test_labels, 3) == 100.0 * correct / 30


def test_logistic_regression_reaches_the_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int) + (x[:, 1] > 1)
    w = independent_eval.fit_logistic(x, y, 3, weight_decay=1e-2)
    logits = np.hstack([x, np.ones((300, 1))]) @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = np.hstack([x, np.ones((300, 1))]).T @ (p - np.eye(3)[y]) / 300
    grad[:-1] += 1e-2 * w[:-1]
    assert np.abs(grad).max() < 1e-5  # stationary point of a strictly convex objective: the optimum
    assert (logits.argmax(1) == y).mean() > 0.7
