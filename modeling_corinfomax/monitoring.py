"""Label-free collapse monitoring: spectra of the loss's running covariances, RankMe of pooled backbone
embeddings, and `CollapseMonitor`, which turns their history into warnings that say what to change.

- `spectrum_summary(R)`: effective rank (Roy & Vetterli, 2007: exp of the entropy of the normalised
  eigenvalues), smallest and largest eigenvalue of a covariance such as the loss's `R1` / `R2`.
- `projection_spectrum(model, images)`: eigenvalues of the projections' covariance on fixed images.
- RankMe (Garrido et al., ICML 2023: exp of the entropy of the normalised singular values of an (N, D)
  embedding matrix, plus their epsilon, 1e-7; at most min(N, D)) is `loss.rankme`; `run_evaluation`
  measures it on fixed training images at each logging step.
- `CollapseMonitor`: fed these numbers and the loss's two terms at every logging step; warns once per
  episode of dimensional collapse (the effective rank falls fast, or stays low) or complete collapse (the
  invariance term vanishes while the log-det term explodes).

Both measures are the loss module's (`effective_rank`, `rankme`, `covariance_eigenvalues`), which travels
as remote code; this module adds the training-time bookkeeping around them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .loss import covariance_eigenvalues, effective_rank, rankme
from .wrappers import corinfomax_encoder

R_INIT_NEGLIGIBLE = (
    1e-3  # the effective rank is read once R_init weighs less than this in the running covariance
)


def spectrum_summary(R: torch.Tensor) -> dict[str, float]:
    """`effective_rank`, `eig_min` and `eig_max` of a symmetric (D, D) covariance estimate."""
    eigenvalues = covariance_eigenvalues(R)
    return {
        "effective_rank": effective_rank(eigenvalues),
        "eig_min": eigenvalues[-1].item(),
        "eig_max": eigenvalues[0].item(),
    }


@dataclass(frozen=True)
class CollapseWarning:
    """One warning of `CollapseMonitor.update`.

    Attributes:
        kind: `"rank_drop"` or `"low_rank"` (dimensional collapse), or `"complete"` (complete collapse).
        step: the optimisation step at which the condition began.
        message: what was seen (the numbers) and what to change.
    """

    kind: str
    step: int
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class _Point:
    step: int
    effective_rank: float | None
    invariance: float
    covariance: float
    rankme: float | None


class CollapseMonitor:
    """Collapse alarms from the label-free numbers of each logging step.

    Call `update` once per logging step; it returns the warnings whose condition begins at that step. A
    condition warns when it starts and again only after it has ended and started anew (an episode), never
    at every step while it lasts.

    - `rank_drop` (dimensional collapse): the effective rank is below `(1 - rank_drop)` times its highest
      value over the last `window` logging steps, at `confirm` logging steps in a row. A single low point
      that the next one undoes is the early transient of a healthy run (the demo's effective rank goes 32.1,
      21.8, 8.7, 17.6, 25.9 over its steps 10-50, then rises to about 45), not a collapse.
    - `low_rank` (dimensional collapse): the effective rank has stayed below `low_rank * dim` for
      `patience` logging steps in a row.
    - `complete`: the invariance (attraction) term is below `invariance_ratio` times its peak so far while
      the covariance (log-det) term is more than `covariance_rise` above its lowest value so far. The
      covariance term is `-(logdet R1' + logdet R2') / D`, so a rise of 2 means the geometric mean of the
      eigenvalues fell e-fold in both views.

    Args:
        dim: the projection dimension D (the largest possible effective rank).
        window: logging steps over which a fast fall of the effective rank is looked for.
        rank_drop: fraction of the window's highest effective rank that, lost, counts as a collapse.
        low_rank: effective rank, as a fraction of `dim`, below which the embedding counts as collapsed.
        patience: logging steps in a row below `low_rank * dim` before `low_rank` warns.
        invariance_ratio: invariance term, as a fraction of its peak so far, that counts as vanished.
        covariance_rise: rise of the covariance term above its lowest value so far that counts as exploded.
        confirm: logging steps in a row that a fast fall must last before `rank_drop` warns.

    Example:
        >>> monitor = CollapseMonitor(dim=64)
        >>> for step, erank in enumerate([40.0, 41.0, 39.0, 12.0, 11.0], start=1):
        ...     for warning in monitor.update(step, erank, invariance_loss=0.01, covariance_loss=9.0):
        ...         print(warning.kind, warning.step)
        rank_drop 5
    """

    def __init__(
        self,
        dim: int,
        window: int = 5,
        rank_drop: float = 0.5,
        low_rank: float = 0.05,
        patience: int = 5,
        invariance_ratio: float = 0.01,
        covariance_rise: float = 5.0,
        confirm: int = 2,
    ):
        if dim < 1 or window < 2 or patience < 1 or not 1 <= confirm <= window:
            raise ValueError(
                f"dim={dim} must be >= 1, window={window} >= 2, patience={patience} >= 1 and confirm={confirm} "
                "in [1, window]."
            )
        if not (0.0 < rank_drop < 1.0 and 0.0 <= low_rank < 1.0 and 0.0 < invariance_ratio < 1.0):
            raise ValueError(
                f"rank_drop={rank_drop} must lie in (0, 1), low_rank={low_rank} in [0, 1) and "
                f"invariance_ratio={invariance_ratio} in (0, 1)."
            )
        if not covariance_rise > 0:
            raise ValueError(f"covariance_rise={covariance_rise} must be > 0.")
        self.dim, self.window, self.rank_drop, self.low_rank, self.patience = (
            dim,
            window,
            rank_drop,
            low_rank,
            patience,
        )
        self.invariance_ratio, self.covariance_rise, self.confirm = invariance_ratio, covariance_rise, confirm
        self.drop_count = 0  # logging steps in a row below the window's fall threshold
        self.recent: deque[_Point] = deque(maxlen=window)
        self.first: _Point | None = None  # the first point of the run (RankMe at the start)
        self.invariance_peak: _Point | None = None
        self.covariance_low: _Point | None = None
        self.low_since: _Point | None = None  # first point of the current stretch below the threshold
        self.low_count = 0  # logging steps in that stretch
        self.active: set[str] = set()  # conditions of the episode in progress

    def update(
        self,
        step: int,
        effective_rank: float | None,
        invariance_loss: float,
        covariance_loss: float,
        rankme: float | None = None,
    ) -> list[CollapseWarning]:
        """Add one logging step's numbers; return the warnings of conditions that begin here.

        `effective_rank` is that of the loss's running covariance (the smaller of the two views'), or
        None where it does not describe the embedding (the first updates, while the covariance still
        holds much of its initial `R_init * I`): the rank conditions then skip this step.
        `invariance_loss` and `covariance_loss` are the loss's two terms, `rankme` (optional) that of the
        backbone's pooled embeddings, quoted in the messages.
        """
        erank = None if effective_rank is None else float(effective_rank)
        point = _Point(step, erank, float(invariance_loss), float(covariance_loss), rankme)
        self.first = self.first or point
        if self.invariance_peak is None or point.invariance > self.invariance_peak.invariance:
            self.invariance_peak = point
        if self.covariance_low is None or point.covariance < self.covariance_low.covariance:
            self.covariance_low = point
        threshold = self.low_rank * self.dim
        found, high = {}, None
        if erank is not None:
            self.recent.append(point)
            self.low_since = (self.low_since or point) if erank < threshold else None
            self.low_count = self.low_count + 1 if erank < threshold else 0
            high = max(self.recent, key=lambda p: p.effective_rank)
            dropped = erank < (1.0 - self.rank_drop) * high.effective_rank
            self.drop_count = self.drop_count + 1 if dropped else 0
            found["rank_drop"] = self.drop_count >= self.confirm
            found["low_rank"] = self.low_count >= self.patience
        found["complete"] = (
            point.invariance < self.invariance_ratio * self.invariance_peak.invariance
            and point.covariance > self.covariance_low.covariance + self.covariance_rise
        )
        warnings = []
        for kind, now in found.items():
            if now and kind not in self.active:
                warnings.append(CollapseWarning(kind, step, self._message(kind, point, high, threshold)))
            (self.active.add if now else self.active.discard)(kind)
        return warnings

    def update_from_record(self, record: dict, lambda_R: float) -> list[CollapseWarning]:
        """`update` from one of train.py's logged records (none for the records of a checkpoint written
        before the spectra of both views were logged). The effective rank of the first updates is left
        out: their running covariance still holds a part `lambda_R ** step` of `R_init * I`, which lifts
        it (measured: 11.6 of 16 after one update, 7.8 after two)."""
        if "effective_rank_R2" not in record:
            return []
        erank = min(record["effective_rank_R1"], record["effective_rank_R2"])
        return self.update(
            record["step"],
            erank if lambda_R ** record["step"] <= R_INIT_NEGLIGIBLE else None,
            record["invariance_loss"],
            record["covariance_loss"],
            record.get("rankme"),
        )

    def _rankme(self, point: _Point) -> str:
        if point.rankme is None or self.first is None or self.first.rankme is None:
            return ""
        return f"; RankMe of the backbone embeddings {self.first.rankme:.1f} at step {self.first.step}, now {point.rankme:.1f}"

    def _message(self, kind: str, point: _Point, high: _Point | None, threshold: float) -> str:
        if kind == "rank_drop":
            fall = 100 * (1 - point.effective_rank / high.effective_rank)
            seen = (
                f"the effective rank of the projection covariance fell from {high.effective_rank:.1f} "
                f"(step {high.step}) to {point.effective_rank:.1f} of {self.dim} ({fall:.0f}% within "
                f"{self.window} logging steps, and low for {self.drop_count} in a row){self._rankme(point)}"
            )
        elif kind == "low_rank":
            seen = (
                f"the effective rank of the projection covariance has stayed below {threshold:.1f} "
                f"({self.low_rank:.0%} of {self.dim} dimensions) since step {self.low_since.step} "
                f"(now {point.effective_rank:.1f}){self._rankme(point)}"
            )
        else:
            peak, low = self.invariance_peak, self.covariance_low
            return (
                f"complete collapse at step {point.step}: the invariance term fell to {point.invariance:.3g} "
                f"({point.invariance / peak.invariance:.1%} of its peak {peak.invariance:.3g} at step "
                f"{peak.step}) while the covariance (log-det) term rose from {low.covariance:.3g} (step "
                f"{low.step}) to {point.covariance:.3g}{self._rankme(point)}: both views of every image map "
                "to nearly one point. Lower --alpha or --learning_rate; raise --lambda_R (a longer covariance "
                "memory) or --eps (a gentler log-det pull near zero eigenvalues); check that the two views "
                "differ (augmentations that are too weak make the invariance term trivial)."
            )
        return (
            f"dimensional collapse at step {point.step}: {seen}. The embedding is losing directions: lower "
            "--alpha (the invariance weight outweighs the log-det term) or --learning_rate, raise --lambda_R "
            "or --eps, and check the augmentations (views that share too little push the embedding onto a "
            "few directions)."
        )


__all__ = [
    "CollapseMonitor",
    "CollapseWarning",
    "covariance_eigenvalues",
    "effective_rank",
    "rankme",
    "spectrum_summary",
]


@torch.no_grad()
def projection_spectrum(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Sorted eigenvalues of the covariance of the L2-normalised projections of fixed, normalised images
    (`model`: a `CorInfoMaxForPreTraining`; eval mode for the call, its flag restored)."""
    was_training = model.training
    model.eval()
    x = pixel_values.to(next(model.parameters()).device)
    z = torch.nn.functional.normalize(corinfomax_encoder(model)(x).projections.double(), dim=1)
    z = z - z.mean(0)
    eigenvalues = covariance_eigenvalues(z.T @ z / z.shape[0]).cpu()
    model.train(was_training)
    return eigenvalues
