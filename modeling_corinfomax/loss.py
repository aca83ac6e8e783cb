"""The CorInfoMax objective, its distributed gather and cheap collapse diagnostics.

This file travels to the Hub as remote code with the modeling file: it imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class CorInfoMaxNumericalError(FloatingPointError):
    """Raised when the loss meets a non-finite input or a covariance that is not positive definite."""


@dataclass
class CorInfoMaxLossOutput:
    """What `CorInfoMaxLoss` returns.

    Attributes:
        loss: `alpha * invariance_loss + covariance_loss`, scalar float64 with the autograd graph.
        invariance_loss: mean over all N*D entries of `(z1 - z2)^2` (scalar, float64).
        covariance_loss: `-(logdet(R1' + eps I) + logdet(R2' + eps I)) / D` (scalar, float64).
        error: `None`, or the message of the numerical fault when `on_error="report"` (the state is
            then left unchanged and `loss` is NaN).
    """

    loss: torch.Tensor
    invariance_loss: torch.Tensor
    covariance_loss: torch.Tensor
    error: str | None = None


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    Every rank computes the same global-batch loss, so the summed gradient is `world_size` times the
    gradient of that loss with respect to this rank's inputs; DDP's gradient averaging over
    `world_size` ranks then gives exactly the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        padded = max(sizes)
        if x.shape[0] < padded:  # all_gather needs equal shapes: pad, gather, then cut the padding
            x = torch.cat([x, x.new_zeros(padded - x.shape[0], *x.shape[1:])])
        out = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(out, x.contiguous())
        return torch.cat([t[:n] for t, n in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (N_r, ...) from every process along dim 0, keeping the gradient path.

    Returns `x` unchanged when torch.distributed is not initialised or has a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return _AllGatherWithGrad.apply(x, [int(s) for s in sizes])


class _CholeskyLogDet(torch.autograd.Function):
    """log det(A) of symmetric positive-definite matrices `(..., D, D)` through their Cholesky factors L;
    d/dA = A^{-1}.

    The forward factorisation is reused by the backward (`cholesky_solve` against the identity), so the
    gradient costs two triangular solves instead of a second factorisation. Under `create_graph=True`
    the inverse is built from differentiable operations, so higher-order gradients are exact too.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, L)
        return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, L = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate through the inverse as well
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(A))
        else:
            inverse = torch.cholesky_solve(torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), L)
        return grad[..., None, None] * inverse, None


def cholesky_logdet(A: torch.Tensor, what: str | list[str] = "matrix") -> tuple[torch.Tensor, str | None]:
    """Log-determinant of a symmetric positive-definite matrix `(D, D)`, or of each of a batch
    `(B, D, D)`, with the Cholesky error codes and finiteness checked in one host synchronisation.

    Returns `(logdet, None)`, `logdet` of shape `A.shape[:-2]`, or `(nan, message)` when a matrix is
    not finite or not positive definite; the message names it (`what`, one name per matrix of a batch)
    and its smallest eigenvalue.
    """
    L, info = torch.linalg.cholesky_ex(A.detach())
    # One `.item()`: each host sync stalls a GPU's queue.
    if not (torch.isfinite(A).all() & (info == 0).all()).item():
        matrices, codes = A.detach().reshape(-1, *A.shape[-2:]), info.reshape(-1)
        names = [what] * len(codes) if isinstance(what, str) else list(what)
        bad = next(i for i, M in enumerate(matrices) if codes[i] != 0 or not torch.isfinite(M).all())
        return A.new_full(A.shape[:-2], float("nan")), _not_positive_definite(matrices[bad], names[bad])
    return _CholeskyLogDet.apply(A, L), None


def _not_positive_definite(A: torch.Tensor, what: str) -> str:
    smallest = torch.linalg.eigvalsh(A.detach()).min().item() if torch.isfinite(A).all() else float("nan")
    return f"{what} is not positive definite (smallest eigenvalue {smallest:.3e})"


class CorInfoMaxLoss(nn.Module):
    r"""CorInfoMax loss (Ozsoy et al., "Self-Supervised Learning with an Information Maximization
    Criterion", NeurIPS 2022, arXiv:2209.07999).

    For projections `z1, z2` of shape (N, D) of two augmented views, optionally L2-normalised, and
    per-view running statistics (float64 buffers, one set per view `a = 1, 2`):

        mu_a' = lambda_mu * mu_a + (1 - lambda_mu) * mean_i z_a,i           (gradient through the batch part)
        C_a   = (1/N) sum_i (z_a,i - mu_a')(z_a,i - mu_a')^T                  (biased)
        R_a'  = lambda_R * R_a + (1 - lambda_R) * C_a
        covariance_loss = -(logdet(R_1' + eps I) + logdet(R_2' + eps I)) / D
        invariance_loss = mean over all N*D entries of (z1 - z2)^2
        loss = alpha * invariance_loss + covariance_loss

    In training mode `R_a <- R_a'.detach()` and `mu_a <- mu_a'.detach()` after each call; in eval
    mode the state is read but not updated. The state starts at `R = R_init * I`, `mu = 0`.

    Everything after the (optional) gather runs in float64 outside autocast, so bf16/fp16 inputs give
    the fp32 loss up to the rounding of the inputs. The log-determinant is Cholesky-based with its
    error code checked: a non-finite input or a covariance that is not positive definite raises
    `CorInfoMaxNumericalError` (or, with `on_error="report"`, returns a NaN loss with `error` set and
    leaves the state untouched), never a silent NaN.

    Under torch.distributed, `z1` and `z2` are all-gathered with a gradient-carrying gather before
    both terms: every rank computes the global-batch loss and keeps an identical state, and with DDP's
    gradient averaging the parameter gradients equal those of one process on the concatenated batch.

    Argument names follow the paper; the official code (github.com/serdarozsoy/corinfomax-ssl) calls
    them:

    | ours         | official flag     | CIFAR-10 | ImageNet-1K |
    |--------------|-------------------|----------|-------------|
    | `alpha`      | `sim_loss_weight` | 250      | 2000        |
    | `lambda_R`   | `la_R`            | 0.01     | 0.1         |
    | `lambda_mu`  | `la_mu`           | 0.01     | 0.1         |
    | `R_init`     | `R_ini`           | 1.0      | 1.0         |
    | `eps`        | `R_eps_weight`    | 1e-8     | 1e-8        |
    | `normalize`  | `normalize_on`    | True     | True        |

    Example:
        >>> loss_fn = CorInfoMaxLoss(dim=64, alpha=250.0, lambda_R=0.01, lambda_mu=0.01)
        >>> z1, z2 = torch.randn(256, 64), torch.randn(256, 64)
        >>> out = loss_fn(z1, z2)
        >>> out.loss.backward()  # doctest: +SKIP
    """

    _state_names = ("R1", "R2", "mu1", "mu2")

    def __init__(
        self,
        dim: int,
        alpha: float = 2000.0,
        lambda_R: float = 0.1,
        lambda_mu: float = 0.1,
        R_init: float = 1.0,
        eps: float = 1e-8,
        normalize: bool = True,
        gather_distributed: bool = True,
        on_error: str = "raise",
    ):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim={dim} must be a positive projection size.")
        if not (0.0 <= lambda_R < 1.0 and 0.0 <= lambda_mu < 1.0):
            raise ValueError(f"lambda_R={lambda_R} and lambda_mu={lambda_mu} must lie in [0, 1).")
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0 (the paper uses 1e-8).")
        if not R_init > 0:
            raise ValueError(f"R_init={R_init} must be > 0 (the paper uses 1.0): R starts at R_init * I.")
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error={on_error!r}: use 'raise' or 'report'.")
        self.dim, self.alpha, self.lambda_R, self.lambda_mu = (
            dim,
            float(alpha),
            float(lambda_R),
            float(lambda_mu),
        )
        self.R_init, self.eps, self.normalize = float(R_init), float(eps), normalize
        self.gather_distributed, self.on_error = gather_distributed, on_error
        eye = torch.eye(dim, dtype=torch.float64)
        self.register_buffer("R1", R_init * eye)
        self.register_buffer("R2", R_init * eye.clone())
        self.register_buffer("mu1", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("mu2", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse=True):
        # `model.half()`/`.to(dtype)` must not round the running state: keep it float64, follow the device.
        state = {name: getattr(self, name) for name in self._state_names}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = getattr(self, name)
            if new.dtype != torch.float64:
                setattr(self, name, old.to(device=new.device))
        return self

    @classmethod
    def from_config(cls, config, **kwargs) -> CorInfoMaxLoss:
        """The loss a `CorInfoMaxConfig` describes (its dimension and hyperparameters)."""
        return cls(
            dim=config.embedding_dim,
            alpha=config.alpha,
            lambda_R=config.lambda_R,
            lambda_mu=config.lambda_mu,
            R_init=config.R_init,
            eps=config.eps,
            normalize=config.normalize,
            **kwargs,
        )

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> CorInfoMaxLossOutput:
        """z1, z2: (N, D) projections of the two views (any float dtype, this process's part of the batch)."""
        if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[1] != self.dim:
            raise ValueError(
                f"expected z1 and z2 of the same shape (N, {self.dim}); got {tuple(z1.shape)} and {tuple(z2.shape)}."
            )
        if self.gather_distributed:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        if z1.shape[0] < 2:
            raise ValueError(
                f"the (global) batch has {z1.shape[0]} sample(s); a covariance needs at least 2."
            )
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = z1.to(torch.float64), z2.to(torch.float64)
            if self.normalize:
                z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
            invariance = F.mse_loss(z1, z2)
            R1, mu1 = self._update(z1, self.R1, self.mu1)
            R2, mu2 = self._update(z2, self.R2, self.mu2)
            eye = self.eps * torch.eye(self.dim, dtype=torch.float64, device=z1.device)
            logdets, error = cholesky_logdet(
                torch.stack([R1, R2]) + eye,
                [f"the running covariance {view} + eps*I" for view in ("R1 (view 1)", "R2 (view 2)")],
            )
            if error is not None:
                # A non-finite projection makes its view's covariance non-finite: name the cause.
                finite = torch.isfinite(z1).all() & torch.isfinite(z2).all()
                return self._fail(error if finite else "non-finite projections", invariance)
            covariance = -(logdets[0] + logdets[1]) / self.dim
            loss = self.alpha * invariance + covariance
        if self.training:
            with torch.no_grad():
                self.R1.copy_(R1)
                self.R2.copy_(R2)
                self.mu1.copy_(mu1)
                self.mu2.copy_(mu2)
                self.num_updates += 1
        return CorInfoMaxLossOutput(loss=loss, invariance_loss=invariance, covariance_loss=covariance)

    def _update(
        self, z: torch.Tensor, R: torch.Tensor, mu: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mu_new = self.lambda_mu * mu + (1.0 - self.lambda_mu) * z.mean(dim=0)
        zc = z - mu_new
        C = zc.T @ zc / z.shape[0]
        return self.lambda_R * R + (1.0 - self.lambda_R) * C, mu_new

    def _fail(self, error: str, invariance: torch.Tensor) -> CorInfoMaxLossOutput:
        message = (
            f"CorInfoMax loss at update {int(self.num_updates) + 1}: {error}. Likely causes: a learning rate too "
            f"high (diverged weights), eps={self.eps:g} too small for this precision, or a collapsed or "
            "non-finite embedding (check bf16/fp16 overflow). The running state was left unchanged."
        )
        if self.on_error == "raise":
            raise CorInfoMaxNumericalError(message)
        nan = invariance.new_tensor(float("nan"))
        return CorInfoMaxLossOutput(
            loss=nan, invariance_loss=invariance.detach(), covariance_loss=nan, error=message
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, alpha={self.alpha:g}, lambda_R={self.lambda_R:g}, lambda_mu={self.lambda_mu:g}, "
            f"R_init={self.R_init:g}, eps={self.eps:g}, normalize={self.normalize}"
        )


# ---------------------------------------------------------------------------------------------------
# Diagnostics: cheap enough to log during training.


@torch.no_grad()
def covariance_eigenvalues(R: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric covariance estimate, float64, sorted in decreasing order."""
    R = R.detach().to(torch.float64)
    return torch.linalg.eigvalsh((R + R.T) / 2).flip(0)


@torch.no_grad()
def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp of the entropy of the normalised (non-negative) eigenvalues; D for isotropic, 1 for rank one."""
    p = eigenvalues.detach().to(torch.float64).clamp_min(0)
    p = p / p.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023) of an (N, D) embedding matrix: exp(-sum p log p), p = s/|s|_1 + eps."""
    s = torch.linalg.svdvals(embeddings.detach().to(torch.float32))
    p = s / s.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def ld_mutual_information(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-8) -> float:
    """Symmetric log-determinant mutual information `I_eps(z1; z2) + I_eps(z2; z1)` of a batch, in nats.

    `I_eps(x; y) = 1/2 logdet(R_x + eps I) - 1/2 logdet(R_e + eps I)` with the error covariance of the
    best linear estimate of x from y, `R_e = R_x - R_xy (R_y + eps I)^{-1} R_xy^T` (paper, Eq. 3). The
    official `LDMITracking` logs `2/D` times this value.
    """
    z1, z2 = z1.detach().to(torch.float64), z2.detach().to(torch.float64)
    n, d = z1.shape
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
    R1, R2, R12 = z1.T @ z1 / n, z2.T @ z2 / n, z1.T @ z2 / n
    eye = eps * torch.eye(d, dtype=torch.float64, device=z1.device)
    Re12 = R1 - R12 @ torch.linalg.solve(R2 + eye, R12.T)
    Re21 = R2 - R12.T @ torch.linalg.solve(R1 + eye, R12)
    ld = [torch.linalg.slogdet(M + eye).logabsdet for M in (R1, R2, Re12, Re21)]
    return 0.5 * (ld[0] + ld[1] - ld[2] - ld[3]).item()


__all__ = [
    "CorInfoMaxLoss",
    "CorInfoMaxLossOutput",
    "CorInfoMaxNumericalError",
    "cholesky_logdet",
    "covariance_eigenvalues",
    "effective_rank",
    "gather_with_grad",
    "ld_mutual_information",
    "rankme",
]
