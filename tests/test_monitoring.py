"""Collapse monitoring: spectra and RankMe against numpy, `CollapseMonitor` on synthetic histories, and
train.py runs that collapse (and warn), stay healthy (and do not), and keep the best-RankMe model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SMALL, assert_same_weights, run_train, weights

from modeling_corinfomax.monitoring import CollapseMonitor, rankme, spectrum_summary


def entropy_rank(values: np.ndarray) -> float:
    p = values / values.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_spectrum_summary_matches_numpy_on_covariances_of_known_spectrum():
    d = 24
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectra = {
        "identity": np.ones(d),
        "rank 5": np.r_[np.ones(5), np.zeros(d - 5)],
        "decaying": 0.5 ** np.arange(d),
    }
    for name, eigenvalues in spectra.items():
        R = torch.from_numpy(basis @ np.diag(eigenvalues) @ basis.T)
        summary = spectrum_summary(R.float())  # float32 in, float64 inside
        reference = np.linalg.eigvalsh(R.numpy())
        assert summary["eig_min"] == pytest.approx(reference.min(), abs=1e-6), name
        assert summary["eig_max"] == pytest.approx(reference.max(), rel=1e-6), name
        assert summary["effective_rank"] == pytest.approx(entropy_rank(eigenvalues), rel=1e-4), name
    assert spectrum_summary(torch.eye(d))["effective_rank"] == pytest.approx(d)
    assert spectrum_summary(torch.from_numpy(basis[:, :5] @ basis[:, :5].T))[
        "effective_rank"
    ] == pytest.approx(5)


def test_rankme_matches_numpy_svd_full_and_low_rank():
    rng = np.random.default_rng(1)
    n, d = 300, 32

    def reference(z: np.ndarray) -> float:  # Garrido et al. (2023), Eq. 1, with their epsilon
        s = np.linalg.svd(z, compute_uv=False)
        p = s / s.sum() + 1e-7
        return float(np.exp(-(p * np.log(p)).sum()))

    orthonormal, _ = np.linalg.qr(rng.standard_normal((n, d)))  # N x D with all singular values 1
    assert rankme(torch.from_numpy(orthonormal)) == pytest.approx(d, rel=1e-4)
    for k in (1, 4, 12):
        z = rng.standard_normal((n, k)) @ rng.standard_normal((k, d))  # rank k
        assert rankme(torch.from_numpy(z)) == pytest.approx(reference(z), rel=1e-3)
        assert 0.5 * k < rankme(torch.from_numpy(z)) <= k + 1e-3
        flat = orthonormal[:, :k] @ np.linalg.qr(rng.standard_normal((d, k)))[0].T  # k equal singular values
        assert rankme(torch.from_numpy(flat)) == pytest.approx(k, rel=1e-4)


# --------------------------------------------------------------------------------------------------- monitor


def feed(monitor: CollapseMonitor, ranks, invariance=None, covariance=None) -> list:
    n = len(ranks)
    invariance = invariance if invariance is not None else np.full(n, 0.02)
    covariance = covariance if covariance is not None else np.full(n, 9.0)
    warnings = []
    for i in range(n):
        warnings += monitor.update(10 * (i + 1), ranks[i], invariance[i], covariance[i], rankme=100.0 - i)
    return warnings


def test_a_healthy_history_gives_no_warning():
    rng = np.random.default_rng(2)
    steps = 200
    ranks = np.linspace(20, 45, steps) + rng.normal(0, 3, steps)  # noisy, rising
    invariance = np.linspace(0.05, 0.01, steps) * rng.uniform(0.7, 1.3, steps)  # alignment is learnt
    covariance = np.linspace(12.0, 9.0, steps) + rng.normal(0, 0.3, steps)
    assert feed(CollapseMonitor(dim=64), ranks, invariance, covariance) == []


def test_dimensional_collapse_warns_once_per_episode_with_the_numbers():
    monitor = CollapseMonitor(dim=64, window=5, rank_drop=0.5, low_rank=0.05, patience=3)
    ranks = [40.0] * 10 + [30.0, 18.0, 10.0] + [2.0] * 20 + [40.0] * 10 + [15.0] * 3
    warnings = feed(monitor, ranks)
    assert [(w.kind, w.step) for w in warnings] == [
        ("rank_drop", 130),  # 18 < 0.5 * 40, the window's highest, at 120, and still low at 130
        ("low_rank", 160),  # 3 logging steps in a row below 0.05 * 64 = 3.2: 140, 150, 160
        ("rank_drop", 450),  # recovered (a new episode), then fell again (440, 450)
    ]
    first = warnings[0].message
    assert "40.0 (step 90) to 10.0 of 64" in first and "75%" in first and "low for 2 in a row" in first
    assert "--alpha" in first and "--learning_rate" in first and "augmentations" in first
    assert "RankMe of the backbone embeddings 100.0 at step 10, now 88.0" in first
    assert "below 3.2" in warnings[1].message and "since step 140" in warnings[1].message


def test_complete_collapse_needs_both_a_vanishing_invariance_and_an_exploding_log_det():
    n = 30
    invariance = np.r_[np.full(10, 0.04), np.full(20, 1e-6)]
    exploding = np.r_[np.full(10, 9.0), np.full(20, 32.0)]
    warnings = feed(CollapseMonitor(dim=16), [6.0] * n, invariance, exploding)
    assert [(w.kind, w.step) for w in warnings] == [("complete", 110)]
    message = warnings[0].message
    assert (
        "fell to 1e-06" in message
        and "peak 0.04 at step 10" in message
        and "from 9 (step 10) to 32" in message
    )
    assert "--alpha" in message and "--lambda_R" in message and "--eps" in message
    # Views that agree while the log-det stays put (alignment learnt, spread kept): no warning.
    assert feed(CollapseMonitor(dim=16), [6.0] * n, invariance, np.full(n, 9.0)) == []
    # A log-det that rises while the views still disagree: no complete collapse either.
    assert feed(CollapseMonitor(dim=16), [6.0] * n, np.full(n, 0.04), exploding) == []


def test_steps_without_an_effective_rank_are_left_out_of_the_rank_conditions():
    measured, left_out = CollapseMonitor(dim=16), CollapseMonitor(dim=16)
    assert measured.update(1, 12.0, 0.04, 7.5) == [] and left_out.update(1, None, 0.04, 7.5) == []
    assert measured.update(2, 5.0, 0.04, 9.0) == []  # 58% below 12, for one logging step so far
    assert [w.kind for w in measured.update(3, 5.0, 0.04, 9.0)] == ["rank_drop"]
    assert left_out.update(2, 5.0, 0.04, 9.0) == []
    assert [w.kind for w in left_out.update(3, 5.0, 1e-7, 30.0)] == ["complete"]  # still watched


def test_the_demos_early_dip_is_a_transient_not_a_collapse():
    # The effective rank of `make demo` (ResNet-10-T, 40 px) over its first 120 steps, logged every 10: one
    # point below half the window's highest, undone at the next. The demo ends at kNN 82.8 / linear 86.9, above
    # both baselines; a warning there told first-time users to lower --alpha.
    demo = [32.1, 21.8, 8.7, 17.6, 25.9, 26.8, 25.3, 27.5, 27.6, 28.3, 28.4, 26.4]
    assert feed(CollapseMonitor(dim=64), demo) == []
    assert [w.kind for w in feed(CollapseMonitor(dim=64, confirm=1), demo)] == ["rank_drop"]  # the old rule
    # The same dip that stays low is a collapse.
    assert [(w.kind, w.step) for w in feed(CollapseMonitor(dim=64), [*demo[:3], 8.0, 7.5, 7.0])] == [
        ("rank_drop", 40)
    ]


def test_bad_monitor_settings_are_refused():
    for kwargs in (
        {"window": 1}, {"rank_drop": 1.0}, {"low_rank": -0.1}, {"covariance_rise": 0.0}, {"confirm": 0},
        {"confirm": 6},
    ):  # fmt: skip
        with pytest.raises(ValueError):
            CollapseMonitor(dim=16, **kwargs)


# --------------------------------------------------------------------------------------------------- train.py

# resnet10t and 64 RankMe images: a step takes ~0.1 s. One thread: on a shared CPU the OpenMP barriers of
# a second one stall (measured: 4 steps in 60 s with 2 threads, 12 s with 1, while another job ran).
TINY = [*SMALL, "--backbone", "resnet10t", "--rankme_samples", "64"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_a_collapsing_run_warns_once_and_logs_the_numbers(tmp_path):
    # alpha = 1e5: the invariance term outweighs the log-det barrier; both views of every image map to one
    # point within two updates (measured: invariance 0.04 -> 3e-7, covariance term 7.5 -> 32).
    out = tmp_path / "collapse"
    flags = ["--alpha", "100000", "--max_train_steps", "4", "--output_dir", str(out)]
    result = run_train([*TINY, *flags], ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("complete collapse at step") == 1, result.stdout[-3000:]
    assert "Lower --alpha" in result.stdout
    log = json.loads((out / "training_log.json").read_text())
    assert sum("complete" in r.get("collapse_warnings", []) for r in log) == 1
    last = log[-1]
    assert last["invariance_loss"] < 1e-4 and last["covariance_loss"] > 25
    for key in ("effective_rank_R1", "effective_rank_R2", "eig_min_R1", "eig_max_R2", "rankme"):
        assert key in last, key
    assert last["eig_max_R1"] < 1e-4 and last["rankme"] < 10  # of at most 64


def test_a_healthy_run_does_not_warn(tmp_path):
    out = tmp_path / "healthy"
    result = run_train(
        [*TINY, "--alpha", "25", "--max_train_steps", "8", "--output_dir", str(out)], ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "collapse at step" not in result.stdout, result.stdout[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert not any("collapse_warnings" in r for r in log)
    assert all(r["rankme"] > 1 and r["effective_rank_R1"] > 3 for r in log)


def test_save_best_by_rankme_keeps_the_model_of_the_best_logged_step(tmp_path, monkeypatch):
    import signal  # noqa: PLC0415

    from modeling_corinfomax.cli import train  # noqa: PLC0415

    # A scripted RankMe that rises, falls, beats its best and falls again tests the bookkeeping; the
    # runs above log the real one. In this process, with a 0.4M-parameter backbone: seconds.
    scripted = iter([3.0, 5.0, 4.0, 7.0, 6.0, 2.0])
    monkeypatch.setattr(train, "probe_rankme", lambda *args: next(scripted))
    out = tmp_path / "run"
    flags = ["--backbone", "test_resnet", "--max_train_samples", "64", "--total_batch_size", "16"]
    flags += ["--mixed_precision", "no", "--max_train_steps", "6", "--checkpointing_steps", "1"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = train.main([*SMALL, *flags, "--save_best_by", "rankme", "--output_dir", str(out)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    log = json.loads((out / "training_log.json").read_text())
    scores = {r["step"]: r["rankme"] for r in log}
    best_step = max(scores, key=scores.get)
    assert best_step == 4
    assert json.loads((out / "best" / "best_model.json").read_text()) == {"step": 4, "rankme": 7.0}
    assert (results["best_rankme_step"], results["best_rankme"]) == (4, 7.0)
    assert json.loads((out / "eval_results.json").read_text())["best_rankme_step"] == 4
    # The weights are those of that step's checkpoint (written after the same update), not an earlier
    # best's (step 2) nor the final ones.
    saved = weights(out / "best")
    for step, same in ((4, True), (2, False), (6, False)):
        checkpoint = weights(out / "checkpoints" / f"step_{step}")
        assert saved.keys() <= checkpoint.keys()
        assert all(torch.equal(saved[k], checkpoint[k]) for k in saved) == same, step
    with pytest.raises(AssertionError):
        assert_same_weights(out / "best", out)

    from transformers import AutoModel  # noqa: PLC0415

    assert type(AutoModel.from_pretrained(out / "best")).__name__ == "CorInfoMaxModel"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--save_best_by", "rankme", "--rankme_samples", "0"], "--save_best_by rankme needs RankMe"),
        (["--collapse_window", "1"], "--collapse_window must be >= 2"),
        (["--collapse_rank_drop", "1.5"], "--collapse_rank_drop must lie in (0, 1)"),
        (["--collapse_patience", "0"], "--collapse_patience must be a positive integer"),
        (["--save_best_by", "knn"], "invalid choice: 'knn'"),
    ],
)
def test_bad_collapse_flags_are_refused(flags, message):
    from modeling_corinfomax.cli import train  # noqa: PLC0415

    with pytest.raises(SystemExit) as raised:
        train.parse_args(flags)
    assert message in str(raised.value)
