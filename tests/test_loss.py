"""CorInfoMaxLoss against a slow float64 reference written from the formula, its gradients, precision,
state handling, numerical errors, diagnostics, and the 2-process gather."""

import copy
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modeling_corinfomax import (
    CorInfoMaxLoss,
    CorInfoMaxNumericalError,
    covariance_eigenvalues,
    effective_rank,
    ld_mutual_information,
    rankme,
)
from modeling_corinfomax.loss import cholesky_logdet

STATE = ("R1", "R2", "mu1", "mu2")


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def reference_step(z1, z2, state, *, alpha, lambda_R, lambda_mu, eps, normalize):
    """One CorInfoMax step exactly as the official code's `CovarianceLoss` computes it (the formula in
    CorInfoMaxLoss's docstring), in float64, with explicit sums over samples and an eigenvalue-based
    log-determinant. Differentiable in z1, z2.

    Returns `(loss, invariance, covariance, new_state)`.
    """
    z1, z2 = z1.to(torch.float64), z2.to(torch.float64)
    n, d = z1.shape
    if normalize:
        z1 = torch.stack([z1[i] / torch.sqrt((z1[i] ** 2).sum()) for i in range(n)])
        z2 = torch.stack([z2[i] / torch.sqrt((z2[i] ** 2).sum()) for i in range(n)])
    new_state, logdets = {}, []
    for a, z in (("1", z1), ("2", z2)):
        mu = lambda_mu * state["mu" + a] + (1 - lambda_mu) * sum(z[i] for i in range(n)) / n
        C = sum(torch.outer(z[i] - mu, z[i] - mu) for i in range(n)) / n
        R = lambda_R * state["R" + a] + (1 - lambda_R) * C
        logdets.append(torch.log(torch.linalg.eigvalsh(R + eps * torch.eye(d, dtype=torch.float64))).sum())
        new_state["R" + a], new_state["mu" + a] = R.detach(), mu.detach()
    invariance = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    covariance = -(logdets[0] + logdets[1]) / d
    return alpha * invariance + covariance, invariance, covariance, new_state


def initial_state(d: int, R_init: float = 1.0) -> dict:
    eye = torch.eye(d, dtype=torch.float64)
    return {
        "R1": R_init * eye,
        "R2": R_init * eye,
        "mu1": torch.zeros(d, dtype=torch.float64),
        "mu2": torch.zeros(d, dtype=torch.float64),
    }


def view_pairs(steps: int, n: int, d: int, seed: int = 0, scale: float = 1.0):
    """Correlated view pairs with a non-zero mean and anisotropic spectrum (float64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    out = []
    for _ in range(steps):
        base = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5
        noise = torch.randn(n, d, generator=g, dtype=torch.float64)
        out.append((scale * base, scale * (base + 0.3 * noise)))
    return out


HYPER = [
    dict(normalize=True, alpha=250.0, lambda_R=0.01, lambda_mu=0.01, eps=1e-8),  # CIFAR-10 run
    dict(normalize=True, alpha=2000.0, lambda_R=0.5, lambda_mu=0.3, eps=1e-6),  # long memory
    dict(normalize=False, alpha=2.0, lambda_R=0.1, lambda_mu=0.1, eps=1e-8),  # ImageNet-1K lambdas
    dict(normalize=False, alpha=0.5, lambda_R=0.7, lambda_mu=0.0, eps=1e-3),
]


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()))
def test_matches_reference_over_consecutive_steps(hyper):
    n, d = 24, 6
    loss_fn = CorInfoMaxLoss(dim=d, **hyper)
    state = initial_state(d)
    errors = {"loss": 0.0, "grad": 0.0, "state": 0.0}
    for z1, z2 in view_pairs(6, n, d, scale=1.0 if hyper["normalize"] else 0.3):
        a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        out = loss_fn(a1, a2)
        out.loss.backward()
        b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        ref_loss, ref_inv, ref_cov, state = reference_step(b1, b2, state, **hyper)
        ref_loss.backward()
        assert out.loss.dtype == torch.float64
        errors["loss"] = max(
            errors["loss"],
            max_rel_err(out.loss, ref_loss),
            max_rel_err(out.invariance_loss, ref_inv),
            max_rel_err(out.covariance_loss, ref_cov),
        )
        errors["grad"] = max(errors["grad"], max_rel_err(a1.grad, b1.grad), max_rel_err(a2.grad, b2.grad))
        errors["state"] = max(errors["state"], *(max_rel_err(getattr(loss_fn, k), state[k]) for k in STATE))
    print(f"\nreference agreement (max rel err over 6 steps) {hyper}: {errors}")
    assert int(loss_fn.num_updates) == 6
    assert errors["loss"] < 1e-12
    assert errors["state"] < 1e-12
    assert errors["grad"] < 1e-9


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_against_finite_differences(normalize):
    n, d = 6, 4
    loss_fn = CorInfoMaxLoss(dim=d, alpha=3.0, lambda_R=0.3, lambda_mu=0.2, eps=1e-6, normalize=normalize)
    for z1, z2 in view_pairs(2, n, d, seed=1):  # move the state away from R_init * I
        loss_fn(z1, z2)
    loss_fn.eval()  # gradcheck calls the function many times: the state must not move
    z1, z2 = view_pairs(1, n, d, seed=2)[0]
    inputs = (z1.requires_grad_(), z2.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b).loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn(a, b).covariance_loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6
    )


def test_second_order_gradients():
    n, d = 6, 4
    loss_fn = CorInfoMaxLoss(dim=d, alpha=3.0, lambda_R=0.3, lambda_mu=0.2, eps=1e-6, normalize=False).eval()
    z1, z2 = view_pairs(1, n, d, seed=3)[0]
    assert torch.autograd.gradgradcheck(
        lambda a, b: loss_fn(a, b).loss, (z1.requires_grad_(), z2.requires_grad_())
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_the_float32_loss_of_the_rounded_values(dtype):
    n, d = 32, 8
    low, high = CorInfoMaxLoss(dim=d, alpha=250.0), CorInfoMaxLoss(dim=d, alpha=250.0)
    for z1, z2 in view_pairs(3, n, d, seed=4):
        l1, l2 = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
        h1, h2 = l1.detach().float().requires_grad_(), l2.detach().float().requires_grad_()
        out_low, out_high = low(l1, l2), high(h1, h2)
        assert out_low.loss.dtype == torch.float64
        assert torch.equal(out_low.loss, out_high.loss)
        out_low.loss.backward()
        out_high.loss.backward()
        assert l1.grad.dtype == dtype
        assert torch.allclose(l1.grad.float(), h1.grad, rtol=1e-2, atol=1e-3 * h1.grad.abs().max().item())
    for name in STATE:
        assert torch.equal(getattr(low, name), getattr(high, name))


def test_autocast_keeps_the_loss_in_float64():
    d = 8
    z1, z2 = view_pairs(1, 32, d, seed=5)[0]
    z1, z2 = z1.float(), z2.float()
    plain, autocast = CorInfoMaxLoss(dim=d), CorInfoMaxLoss(dim=d)
    expected = plain(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = autocast(z1, z2)
    assert out.loss.dtype == out.covariance_loss.dtype == torch.float64
    assert torch.equal(out.loss, expected.loss)
    assert autocast.R1.dtype == torch.float64 and torch.equal(autocast.R1, plain.R1)

    # A projector under autocast produces bf16 projections; the loss equals the one of those values.
    torch.manual_seed(0)
    head = nn.Linear(12, d)
    x1, x2 = torch.randn(32, 12), torch.randn(32, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p1, p2 = head(x1), head(x2)
        out = CorInfoMaxLoss(dim=d)(p1, p2)
    assert p1.dtype == torch.bfloat16 and out.loss.dtype == torch.float64
    assert torch.equal(out.loss, CorInfoMaxLoss(dim=d)(p1.float(), p2.float()).loss)
    out.loss.backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_eval_mode_reads_but_does_not_update_the_state():
    d = 8
    batches = view_pairs(3, 32, d, seed=6)
    loss_fn = CorInfoMaxLoss(dim=d, lambda_R=0.5, lambda_mu=0.5)
    for z1, z2 in batches[:2]:
        loss_fn(z1, z2)
    before = copy.deepcopy(loss_fn.state_dict())
    training_twin = copy.deepcopy(loss_fn)
    loss_fn.eval()
    first = loss_fn(*batches[2])
    second = loss_fn(*batches[2])
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(first.loss, second.loss)
    # Same value as the training-mode call from the same state (the state is read in eval mode)...
    assert torch.equal(first.loss, training_twin(*batches[2]).loss)
    # ...which differs from what a fresh state would give.
    assert not torch.allclose(
        first.loss, CorInfoMaxLoss(dim=d, lambda_R=0.5, lambda_mu=0.5).eval()(*batches[2]).loss
    )


def test_state_dict_round_trip_mid_run_continues_bit_for_bit():
    d = 8
    batches = view_pairs(6, 32, d, seed=7)
    kwargs = dict(dim=d, alpha=250.0, lambda_R=0.3, lambda_mu=0.2)
    original = CorInfoMaxLoss(**kwargs)
    for z1, z2 in batches[:3]:
        original(z1, z2)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = CorInfoMaxLoss(**kwargs)
    resumed.load_state_dict(torch.load(buffer))
    assert int(resumed.num_updates) == 3
    for z1, z2 in batches[3:]:
        a, b = original(z1, z2), resumed(z1, z2)
        assert torch.equal(a.loss, b.loss)
    for key, value in original.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # The restored state matters: a fresh loss gives a different value on the same batch.
    assert not torch.equal(CorInfoMaxLoss(**kwargs)(*batches[5]).loss, original(*batches[5]).loss)


def test_module_dtype_casts_keep_the_state_float64():
    loss_fn = CorInfoMaxLoss(dim=4)
    loss_fn(*view_pairs(1, 16, 4, seed=8)[0])
    R1 = loss_fn.R1.clone()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(loss_fn)
        assert all(getattr(loss_fn, k).dtype == torch.float64 for k in STATE)
        assert loss_fn.num_updates.dtype == torch.long
        assert torch.equal(loss_fn.R1, R1)


def corrupted_loss(on_error: str, d: int = 6):
    """A loss whose state comes from a broken checkpoint: R1 has a negative eigenvalue, so R1' + eps I
    is not positive definite on the next update (lambda_R = 0.9 keeps it dominant)."""
    kwargs = dict(dim=d, lambda_R=0.9, lambda_mu=0.1, on_error=on_error)
    loss_fn = CorInfoMaxLoss(**kwargs)
    for z1, z2 in view_pairs(2, 16, d, seed=9):
        loss_fn(z1, z2)
    state = loss_fn.state_dict()
    state["R1"] = torch.diag(torch.tensor([-0.5] + [1.0] * (d - 1), dtype=torch.float64))
    loss_fn.load_state_dict(state)
    return loss_fn, kwargs


def test_non_positive_definite_covariance_raises_naming_update_and_eigenvalue():
    loss_fn, kwargs = corrupted_loss("raise")
    z1, z2 = view_pairs(1, 16, kwargs["dim"], seed=10)[0]
    state = {k: getattr(loss_fn, k).clone() for k in STATE}
    _, _, _, new = reference_step(
        z1, z2, state, alpha=loss_fn.alpha, lambda_R=0.9, lambda_mu=0.1, eps=1e-8, normalize=True
    )
    smallest = np.linalg.eigvalsh(
        (new["R1"] + 1e-8 * torch.eye(kwargs["dim"], dtype=torch.float64)).numpy()
    ).min()
    assert smallest < 0
    with pytest.raises(CorInfoMaxNumericalError) as excinfo:
        loss_fn(z1, z2)
    message = str(excinfo.value)
    assert "update 3" in message and "R1" in message
    reported = float(re.search(r"smallest eigenvalue ([-+0-9.e]+)", message).group(1))
    assert reported == pytest.approx(smallest, rel=1e-3)
    assert int(loss_fn.num_updates) == 2


@pytest.mark.parametrize(
    "poison",
    [
        lambda z: z.index_put_(
            (torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"), dtype=z.dtype)
        ),
        lambda z: z.index_put_(
            (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"), dtype=z.dtype)
        ),
        lambda z: (z.half() * 1e5).float(),  # fp16 overflow to inf
    ],
    ids=["nan", "inf", "fp16-overflow"],
)
def test_non_finite_inputs_raise_naming_the_update(poison):
    d = 6
    loss_fn = CorInfoMaxLoss(dim=d)
    batches = view_pairs(3, 16, d, seed=11)
    loss_fn(*batches[0])
    before = copy.deepcopy(loss_fn.state_dict())
    with pytest.raises(CorInfoMaxNumericalError, match=r"update 2: non-finite"):
        loss_fn(poison(batches[1][0].clone()), batches[1][1])
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_on_error_report_returns_nan_and_leaves_the_state_unchanged():
    loss_fn, kwargs = corrupted_loss("report")
    before = copy.deepcopy(loss_fn.state_dict())
    z1, z2 = view_pairs(1, 16, kwargs["dim"], seed=10)[0]
    out = loss_fn(z1, z2)
    assert torch.isnan(out.loss) and torch.isnan(out.covariance_loss)
    assert torch.isfinite(out.invariance_loss)
    assert out.error is not None and "update 3" in out.error and "not positive definite" in out.error
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[key]), key

    d = 6
    loss_fn = CorInfoMaxLoss(dim=d, on_error="report")
    twin = CorInfoMaxLoss(dim=d)
    batches = view_pairs(3, 16, d, seed=12)
    loss_fn(*batches[0]), twin(*batches[0])
    bad = batches[1][0].clone()
    bad[0, 0] = float("nan")
    out = loss_fn(bad, batches[1][1])
    assert torch.isnan(out.loss) and "non-finite" in out.error and "update 2" in out.error
    # The run continues as if the bad batch had been skipped.
    assert torch.equal(loss_fn(*batches[2]).loss, twin(*batches[2]).loss)
    assert int(loss_fn.num_updates) == int(twin.num_updates) == 2


def test_invalid_arguments_and_shapes():
    with pytest.raises(ValueError, match="lambda_R=1.0"):
        CorInfoMaxLoss(dim=4, lambda_R=1.0)
    with pytest.raises(ValueError, match="eps=0"):
        CorInfoMaxLoss(dim=4, eps=0.0)
    with pytest.raises(ValueError, match="on_error='ignore'"):
        CorInfoMaxLoss(dim=4, on_error="ignore")
    loss_fn = CorInfoMaxLoss(dim=4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        loss_fn(torch.randn(8, 5), torch.randn(8, 5))
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(torch.randn(1, 4), torch.randn(1, 4))


def test_isotropic_unit_vectors_reach_the_am_gm_bound():
    # For unit-norm z, tr(R) = 1 - |mu|^2 <= 1, so by AM-GM logdet R <= D ln(1/D): covariance_loss >= 2 ln D,
    # with equality iff R = I/D (isotropic on the sphere).
    d = 16
    g = torch.Generator().manual_seed(13)
    loss_fn = CorInfoMaxLoss(dim=d, lambda_R=0.01, lambda_mu=0.01)
    for _ in range(3):
        out = loss_fn(torch.randn(4096, d, generator=g), torch.randn(4096, d, generator=g))
    assert 2 * math.log(d) <= out.covariance_loss.item() < 2 * math.log(d) * 1.01


def test_cholesky_logdet_of_a_batch_names_the_matrix_that_is_not_positive_definite():
    g = torch.Generator().manual_seed(18)
    a = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    A = (a @ a.mT + 0.1 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    logdet, error = cholesky_logdet(A, ["x", "y", "z"])
    assert error is None and logdet.shape == (3,)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(A.detach()).logabsdet, rtol=1e-12, atol=0)
    logdet.sum().backward()
    torch.testing.assert_close(A.grad, torch.linalg.inv(A.detach()).mT, rtol=1e-10, atol=1e-12)
    broken = A.detach().clone()
    broken[1] = torch.diag(torch.tensor([-1.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    logdet, error = cholesky_logdet(broken, ["x", "y", "z"])
    assert (
        torch.isnan(logdet).all() and error == "y is not positive definite (smallest eigenvalue -1.000e+00)"
    )
    broken[1, 0, 0] = float("nan")
    assert cholesky_logdet(broken, "R")[1] == "R is not positive definite (smallest eigenvalue nan)"


# ---------------------------------------------------------------------------------------------------
# Diagnostics, against independent computations.


def test_covariance_eigenvalues_match_numpy():
    g = torch.Generator().manual_seed(14)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    R = a @ a.T
    got = covariance_eigenvalues(R.float())
    assert got.dtype == torch.float64
    assert torch.all(got[:-1] >= got[1:])
    expected = np.sort(np.linalg.eigvals(R.numpy()).real)[::-1]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_effective_rank():
    d = 32
    assert effective_rank(torch.ones(d)) == pytest.approx(d, rel=1e-12)
    assert effective_rank(torch.tensor([5.0] + [0.0] * (d - 1))) == pytest.approx(1.0)
    # Rank-k embeddings with equal variance along k orthonormal directions: about k.
    g = torch.Generator().manual_seed(15)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    for k in (1, 4, 12):
        z = torch.randn(20000, k, generator=g, dtype=torch.float64) @ basis[:, :k].T
        eig = covariance_eigenvalues(torch.cov(z.T, correction=0))
        assert effective_rank(eig) == pytest.approx(k, rel=0.03)


def test_rankme_matches_its_definition_and_the_rank():
    g = torch.Generator().manual_seed(16)
    z = torch.randn(300, 20, generator=g) @ torch.randn(20, 20, generator=g)
    s = np.linalg.svd(z.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    basis, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    low_rank = torch.randn(20000, 5, generator=g) @ basis[:, :5].T
    assert rankme(low_rank) == pytest.approx(5.0, rel=0.02)


def test_ld_mutual_information_of_gaussians_matches_the_closed_form():
    # y = A x + n with x ~ N(0, S_x), n ~ N(0, S_n): I(x; y) = 1/2 logdet(A S_x A^T + S_n) - 1/2 logdet(S_n),
    # and I(x; y) = I(y; x), so the symmetric LDMI tends to twice that as eps -> 0 and N grows.
    d, n = 4, 200_000
    g = torch.Generator().manual_seed(17)
    Lx = torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    Ln = 0.7 * torch.randn(d, d, generator=g, dtype=torch.float64) + torch.eye(d, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    Sx, Sn = Lx @ Lx.T, Ln @ Ln.T
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ Lx.T
    y = x @ A.T + torch.randn(n, d, generator=g, dtype=torch.float64) @ Ln.T
    closed = 0.5 * (np.linalg.slogdet((A @ Sx @ A.T + Sn).numpy())[1] - np.linalg.slogdet(Sn.numpy())[1])
    assert closed > 0.5
    assert ld_mutual_information(x, y) == pytest.approx(2 * closed, rel=0.02)
    assert ld_mutual_information(y.float(), x.float()) == pytest.approx(2 * closed, rel=0.02)
    independent = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert abs(ld_mutual_information(x, independent)) < 1e-3


# ---------------------------------------------------------------------------------------------------
# Two real processes (torchrun, gloo) against one process on the concatenated batch.


def test_two_processes_match_one_process(tmp_path):
    worker = Path(__file__).with_name("loss_distributed_worker.py")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    print("\n2-process max relative errors:", json.dumps(reports, indent=1))
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2 and report["backend"] == "gloo"
        assert report["steps"] == 5
        # Each rank saw only its slice, yet the global batch size went into the loss.
        assert report["global_batch_sizes"] == [24, 24, 24, 24, 24]
        for name, value in report["errors"].items():
            assert value < 1e-6, (rank, name, value)
