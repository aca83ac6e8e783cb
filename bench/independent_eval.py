#!/usr/bin/env python
"""An evaluation of a saved encoder that shares no code with the training run.

It loads the saved folder as any user would (`AutoModel` + `AutoImageProcessor`, remote code), reads the
images itself (Fashion-MNIST from Debian's idx files, or an image folder), and runs its own weighted kNN
(numpy) and its own L2-regularised multinomial logistic regression (scipy's L-BFGS, to convergence) for
three encoders: the saved one, a random init of the same architecture (timm's zero-init of the last BN of
each block turned off, BatchNorm at its initial statistics) and the raw pixels the encoder sees.

    python bench/independent_eval.py outputs/corinfomax-demo                       # full Fashion-MNIST test set
    python bench/independent_eval.py bench/results/small_folder_fashion4k --folder /tmp/folders/fashion4k
    python bench/independent_eval.py outputs/run2 --encoders pretrained     # a study: baselines once

Protocol: features of un-augmented images, resized and normalised by the saved processor. kNN: cosine
similarity, k = 20 neighbours, votes weighted by exp(similarity / 0.07). Logistic regression: features
standardised with the bank's mean and std; the L2 weight is chosen per encoder from {1e-4, 1e-3, 1e-2}
(mean cross-entropy + w/2 ||W||^2) on a held-out tenth of the bank, then refit on the whole bank. For
Fashion-MNIST the bank is `--bank_per_class` training images of each class (seeded) and the test set is
all 10,000 test images; for a folder, `train/` is the bank and `test/` the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.optimize import minimize
from scipy.special import log_softmax
from small_folder import FASHION, read_idx  # the idx reader of the folders this script evaluates

KNN_K, KNN_T = 20, 0.07
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


def fashion_mnist(bank_per_class: int, seed: int = 0):
    train_x, train_y = (
        read_idx(FASHION / "train-images-idx3-ubyte.gz"),
        read_idx(FASHION / "train-labels-idx1-ubyte.gz"),
    )
    test_x, test_y = (
        read_idx(FASHION / "t10k-images-idx3-ubyte.gz"),
        read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"),
    )
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(train_y == c))[:bank_per_class] for c in range(10)])
    to_images = lambda xs: [Image.fromarray(x, mode="L") for x in xs]  # noqa: E731
    return (to_images(train_x[keep]), train_y[keep].astype(int)), (to_images(test_x), test_y.astype(int))


def image_folder(root: Path):
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    def read(split):
        images, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted((root / split / name).iterdir()):
                with Image.open(file) as image:
                    images.append(image.copy())
                labels.append(label)
        return images, np.array(labels)

    return read("train"), read("test")


@torch.no_grad()
def embed(model, processor, images, batch_size: int = 256) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = [im.convert("RGB") for im in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        out.append(model(pixel_values=pixels).pooler_output.float().numpy())
    return np.concatenate(out)


def pixels(processor, images, grey: bool, batch_size: int = 1024) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = [im.convert("RGB") for im in images[start : start + batch_size]]
        x = processor(images=batch, return_tensors="pt")["pixel_values"].numpy()
        out.append((x[:, :1] if grey else x).reshape(len(batch), -1))
    return np.concatenate(out)


def knn(bank, bank_labels, test, test_labels, classes: int) -> float:
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    correct = 0
    for start in range(0, len(test), 1000):
        similarity = test[start : start + 1000] @ bank.T
        top = np.argpartition(-similarity, KNN_K, axis=1)[:, :KNN_K]
        weights = np.exp(np.take_along_axis(similarity, top, axis=1) / KNN_T)
        votes = np.zeros((len(top), classes))
        np.add.at(votes, (np.arange(len(top))[:, None], bank_labels[top]), weights)
        correct += (votes.argmax(1) == test_labels[start : start + 1000]).sum()
    return 100.0 * correct / len(test)


def fit_logistic(x, y, classes: int, weight_decay: float) -> np.ndarray:
    n, d = x.shape
    onehot = np.eye(classes)[y]
    xb = np.hstack([x, np.ones((n, 1))])

    def objective(flat):
        w = flat.reshape(d + 1, classes)
        logp = log_softmax(xb @ w, axis=1)
        loss = -(onehot * logp).sum() / n + 0.5 * weight_decay * np.square(w[:-1]).sum()
        grad = xb.T @ (np.exp(logp) - onehot) / n
        grad[:-1] += weight_decay * w[:-1]
        return loss, grad.ravel()

    result = minimize(objective, np.zeros((d + 1) * classes), jac=True, method="L-BFGS-B",
                      options={"maxiter": 5000, "gtol": 1e-6, "maxcor": 20})  # fmt: skip
    return result.x.reshape(d + 1, classes)


def linear(bank, bank_labels, test, test_labels, classes: int, seed: int = 0) -> tuple[float, float]:
    mean, std = bank.mean(0), bank.std(0).clip(1e-6)
    xb, xt = (bank - mean) / std, (test - mean) / std
    order = np.random.default_rng(seed).permutation(len(xb))
    held, fit = order[: len(xb) // 10], order[len(xb) // 10 :]

    def accuracy(w, x, y):
        return 100.0 * (np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1).__eq__(y).mean()

    scores = {wd: accuracy(fit_logistic(xb[fit], bank_labels[fit], classes, wd), xb[held], bank_labels[held])
              for wd in WEIGHT_DECAYS}  # fmt: skip
    best = max(scores, key=scores.get)
    return accuracy(fit_logistic(xb, bank_labels, classes, best), xt, test_labels), best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved model folder (train.py's --output_dir)")
    p.add_argument("--folder", type=Path, help="an image folder with train/ and test/ class sub-folders")
    p.add_argument("--bank_per_class", type=int, default=2000, help="Fashion-MNIST training images per class")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--encoders", nargs="+", choices=["pretrained", "random init", "raw pixels"],
                   default=["pretrained", "random init", "raw pixels"],
                   help="which encoders to evaluate (the baselines depend only on the architecture, image "
                   "size and bank, so a study of training settings can evaluate them once)")  # fmt: skip
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoImageProcessor, AutoModel  # noqa: PLC0415

    start = time.time()
    (bank_images, bank_labels), (test_images, test_labels) = (
        image_folder(args.folder) if args.folder else fashion_mnist(args.bank_per_class)
    )
    grey = all(im.mode == "L" for im in bank_images[:50])
    classes = int(max(bank_labels.max(), test_labels.max())) + 1
    processor = AutoImageProcessor.from_pretrained(args.model)
    trained = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    config.backbone_kwargs = {**(config.backbone_kwargs or {}), "zero_init_last": False}
    torch.manual_seed(0)
    random_init = AutoModel.from_config(config, trust_remote_code=True).eval()
    encoders = {
        "pretrained": lambda images: embed(trained, processor, images),
        "random init": lambda images: embed(random_init, processor, images),
        "raw pixels": lambda images: pixels(processor, images, grey),
    }
    results = {"model": str(args.model), "bank": len(bank_images), "test": len(test_images)}
    print(f"bank {len(bank_images)} images, test {len(test_images)}, {classes} classes")
    print("| encoder | kNN top-1 | linear top-1 | L2 weight |\n|---|---|---|---|")
    for name in args.encoders:
        features_of = encoders[name]
        bank, test = features_of(bank_images), features_of(test_images)
        knn_top1 = knn(bank, bank_labels, test, test_labels, classes)
        linear_top1, wd = linear(bank, bank_labels, test, test_labels, classes)
        results[name] = {
            "knn_top1": round(knn_top1, 2),
            "linear_top1": round(linear_top1, 2),
            "weight_decay": wd,
        }
        print(f"| {name} | {knn_top1:.2f} | {linear_top1:.2f} | {wd:g} |", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    print(f"{results['seconds']} s")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
