"""The pieces of CorInfoMax pretraining that train.py wires together and bench/ measures.

- `TrainerState`: what a checkpoint's trainer_state.json holds (step, epoch, history, best model...).
- `make_optimizer`, `peak_learning_rate`, `make_lr_lambda`, `planned_steps`: the recipe's optimisation.
- `TimeBudget`: fits the number of steps to `--time_budget_minutes` once the step time is measured;
  `seconds_per_step` times an update before training (the budget's resolution rule).
- `TwoViews`, `checked_forward`, `undo_forward`: the pieces of one update (views augmented on the device,
  the forward with its fault check, and the undoing of a faulty one); train.py's `train_one_epoch` and the
  benchmarks' step put them together with backward and the optimizer step.
- `Schedule`: the run's length and its warm-up + cosine learning rate, refitted by a time budget.
- `StopSignal`, `all_processes_agree`, `kill_daemon_processes`: stopping cleanly on every process.
- `DeviceLoader`: moves a stream's batches to the device (the loader Accelerate does not prepare).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import signal
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from timm.optim import create_optimizer_v2

from .data import BatchViewAugment, TwoViewAugmentation, derive_seed
from .errors import Interrupted
from .loss import CorInfoMaxNumericalError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 10  # with --on_nan skip: more faults in a row mean the run has diverged

# Our names -> timm's: timm's "sgd" is Nesterov SGD; the paper (and `--optimizer sgd`) uses plain momentum.
TIMM_OPTIMIZERS = {"sgd": "momentum", "lars": "lars"}


@dataclass
class TrainerState:
    """The progress of a run, saved with every checkpoint (trainer_state.json) and restored on resume."""

    global_step: int = 0  # optimisation steps done
    epoch: int = 0  # completed passes over the data
    step_in_epoch: int = 0  # steps done in the current pass (a resumed run skips their batches)
    skipped_steps: int = 0  # --on_nan skip: updates left out after a numerical fault
    bad_images: int = 0  # --skip_bad_images: unreadable images left out
    history: list[dict] = field(default_factory=list)  # one record per --logging_steps
    best: dict | None = None  # --save_best_by: {"step", "rankme"} of the model in <output_dir>/best
    total_steps: int | None = None  # the run's length once a time budget has fitted it
    spectrum_start: list[float] | None = None  # projection covariance eigenvalues before training

    @classmethod
    def from_dict(cls, data: dict) -> TrainerState:
        """The state of a trainer_state.json (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def peak_learning_rate(learning_rate: float, total_batch_size: int, reference_batch_size: int) -> float:
    """`--learning_rate` is the rate at `--lr_reference_batch_size`; it scales linearly with the global batch."""
    return learning_rate * total_batch_size / reference_batch_size


def make_optimizer(
    model, name: str, lr: float, momentum: float, weight_decay: float, exclude_bias_and_norm: bool
):
    """timm's optimizer factory (`sgd`: `torch.optim.SGD` with plain momentum, as the paper; `lars`: timm's
    LARS); weight decay is left off biases and norm weights when `exclude_bias_and_norm` is set."""
    return create_optimizer_v2(
        model,
        opt=TIMM_OPTIMIZERS[name],
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        filter_bias_and_bn=exclude_bias_and_norm,
    )


def make_lr_lambda(warmup_steps: int, total_steps: int, peak_lr: float, start_lr: float, min_lr: float):
    """`LambdaLR` factor: linear warm-up from `start_lr` to the peak, then cosine to `min_lr`, which the last
    step (`total_steps - 1`, counted from 0) uses. The warm-up takes at most half of a short run."""
    warmup = min(warmup_steps, total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup:
            lr = start_lr + (peak_lr - start_lr) * step / warmup
        else:
            progress = (step - warmup) / max(1, total_steps - 1 - warmup)
            lr = min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
        return lr / peak_lr

    return factor


def make_scheduler(
    optimizer, lr_lambda, done_steps: int, peak_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The `LambdaLR` of `lr_lambda` (a factor of `peak_lr`) at step `done_steps`. The schedule is a function
    of the step, so it is rebuilt on resume rather than checkpointed: a resumed run follows the current
    flags (a lower --learning_rate after a numerical fault), and no pickled scheduler is loaded
    (Accelerate unpickles registered objects with weights_only=False)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda, last_epoch=done_steps - 1)


def planned_steps(
    max_train_steps: int | None,
    num_train_epochs: float | None,
    epochs_given: bool,
    steps_per_epoch: int | None,
    time_budget: bool,
    min_train_steps: int | None,
) -> int | None:
    """The run's length in optimisation steps, or None when a time budget is to size it.

    `max_train_steps`, or epochs the user gave (`epochs_given`), fix the length (and cap a budget).
    Otherwise a budget decides; without one, the epochs of the defaults or the preset, but at least
    `min_train_steps`, so that a small dataset still gets enough updates.
    """
    if max_train_steps:
        explicit = max_train_steps
    elif epochs_given and steps_per_epoch:
        explicit = math.ceil(num_train_epochs * steps_per_epoch)
    else:
        explicit = None
    if time_budget or explicit is not None:
        return explicit  # with a budget: a cap, below which the budget fits the length
    return max(math.ceil(num_train_epochs * steps_per_epoch), min_train_steps or 1)


class TimeBudget:
    """Fits the number of steps to `--time_budget_minutes` once the step time is known, and refits it as
    the run goes.

    The first `SKIP` steps (allocation, lazy initialisation, compilation) are not timed; the next
    `MEASURE` give the first fit. A machine's speed drifts and the short first window misses costs that
    come later (epoch starts, the logging steps' spectra), so the fit is repeated on the mean step time
    since step `SKIP`, each time a quarter of the remaining steps has run, until the last `MEASURE` steps.
    Every process takes the slowest measurement and the latest clock, so all agree on the same number of
    steps, which leaves `reserve_seconds(step_time)` for the final save and evaluation.
    """

    SKIP, MEASURE = 3, 20
    OVERRUN = 1.25  # a run still going at this multiple of the budget stops (a safety net, not the plan)
    UNFITTED_STEPS = 10**9  # the run's length until the step time is measured (the cosine is then ~flat)

    def __init__(self, minutes: float, started: float, cap: int | None, reserve_seconds):
        self.seconds, self.started, self.cap, self.reserve_seconds = (
            minutes * 60,
            started,
            cap,
            reserve_seconds,
        )
        self.timer_start: float | None = None
        self.next_fit = self.SKIP + self.MEASURE

    def fit(self, step: int, accelerator) -> int | None:
        """Called after every step (on every process): the fitted number of steps at a fitting step."""
        now = time.time()
        if step == self.SKIP:
            self.timer_start = now
        if step != self.next_fit or self.timer_start is None:
            return None
        measured = torch.tensor(
            [(now - self.timer_start) / (step - self.SKIP), now - self.started], device=accelerator.device
        )
        step_time, elapsed = accelerator.gather(measured[None]).max(dim=0).values.tolist()
        reserve = self.reserve_seconds(step_time)
        total = step + max(1, int((self.seconds - elapsed - reserve) // step_time))
        total = max(min(total, self.cap) if self.cap else total, step)
        following = step + max(self.MEASURE, (total - step) // 4)
        self.next_fit = following if following < total - self.MEASURE else None
        logger.info(
            "time budget %.1f min: %.3f s/step measured over %d steps, %.0f s reserved for saving and "
            "evaluation -> %d steps",
            self.seconds / 60, step_time, step - self.SKIP, reserve, total,
        )  # fmt: skip
        return total

    def overrun(self, accelerator) -> bool:
        """Whether the run is far past its budget on any process (the same answer everywhere)."""
        late = torch.tensor(
            [time.time() - self.started > self.OVERRUN * self.seconds], device=accelerator.device
        )
        return bool(accelerator.gather(late.float()).max().item() > 0)


def seconds_per_step(
    model, batch_size: int, accelerator, channels_last: bool = False, repeats: int = 2
) -> float:
    """The time of one training update of `model` (forward of two views of `batch_size` random images at
    `model.config.image_size`, backward) under `accelerator`'s device and autocast: the median of `repeats`
    after one warm-up, the slowest process's. The global random state is left as it was, so that the run's
    own model and draws do not depend on whether this was called; the model's parameters and loss state
    change (use a throwaway model)."""
    size = model.config.image_size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = model.to(device, memory_format=memory_format).train()
        views = [
            torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
            for _ in range(2)
        ]
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with accelerator.autocast():
                loss = model(pixel_values=views[0], pixel_values_2=views[1]).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    measured = torch.tensor([sorted(times[1:])[len(times[1:]) // 2]], device=device)
    return float(accelerator.gather(measured).max().item())


class TwoViews:
    """The two views of a batch, made on the training device from its uint8 crops: colour jitter,
    grayscale, blur, solarisation and normalisation (`BatchViewAugment`), in `channels_last` or not.

    The draws come from a generator seeded by `(seed, step, process_index, micro_batch)`, so a resumed run
    sees the same views; with gradient accumulation each micro-batch of a window draws its own, and the
    first draws what a run without accumulation draws.
    """

    def __init__(
        self,
        augmentation: TwoViewAugmentation,
        image_mean,
        image_std,
        device: torch.device,
        seed: int = 0,
        process_index: int = 0,
        channels_last: bool = True,
    ):
        self.augment = [
            BatchViewAugment(v, image_mean, image_std).to(device)
            for v in (augmentation.view1, augmentation.view2)
        ]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device)
        self.seed, self.process_index = seed, process_index

    def make(
        self, view1: torch.Tensor, view2: torch.Tensor, step: int, micro_batch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) crops -> the two normalised float views of optimisation step `step`."""
        key = (self.seed, step, self.process_index) + ((micro_batch,) if micro_batch else ())
        self.generator.manual_seed(derive_seed(*key))  # the same on every Python, unlike hash()
        return (
            self.augment[0](view1, self.generator, self.memory_format),
            self.augment[1](view2, self.generator, self.memory_format),
        )


def checked_forward(model, view1: torch.Tensor, view2: torch.Tensor):
    """The pretraining forward: `(output, None)`, or `(output or None, message)` after a numerical fault
    (the loss raised `CorInfoMaxNumericalError`, or it is not finite). A faulty forward has already
    updated the BatchNorm statistics: `undo_forward` restores them."""
    try:
        out = model(pixel_values=view1, pixel_values_2=view2)
    except CorInfoMaxNumericalError as error:
        return None, str(error)
    if torch.isfinite(out.loss):
        return out, None
    return out, out.error or f"non-finite loss {out.loss.item()}"


def undo_forward(optimizer, statistics: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """After a faulty forward: drop the gradients (of the whole accumulation window) and put back the
    BatchNorm statistics saved before it, so that the step changed nothing."""
    optimizer.zero_grad(set_to_none=True)
    for buffer, before in zip(statistics, saved, strict=True):
        buffer.copy_(before)


class Schedule:
    """The run's length in optimisation steps and its learning rate: a linear warm-up over
    `warmup_epochs`, then a cosine to `min_lr` at the last step (`LambdaLR` on the optimizer). A time
    budget refits it (`fit`) once the step time is known."""

    def __init__(
        self, optimizer, peak_lr: float, steps_per_epoch: int, warmup_epochs: float, start_lr, min_lr
    ):
        self.optimizer, self.peak_lr, self.steps_per_epoch = optimizer, peak_lr, steps_per_epoch
        self.warmup_epochs, self.start_lr, self.min_lr = warmup_epochs, start_lr, min_lr
        self.total_steps, self.scheduler = 0, None

    def fit(self, total_steps: int, done_steps: int) -> Schedule:
        """A schedule of `total_steps`, at step `done_steps`."""
        warmup = int(round(self.warmup_epochs * self.steps_per_epoch))
        factor = make_lr_lambda(warmup, total_steps, self.peak_lr, self.start_lr, self.min_lr)
        self.total_steps = total_steps
        self.scheduler = make_scheduler(self.optimizer, factor, done_steps, self.peak_lr)
        return self


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (checkpoint, then a clean exit)."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: leave now; the checkpoints on disk are complete
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once, without saving.")
        self.received = signum

    @staticmethod
    def ignore_in_worker(worker_id: int) -> None:
        """DataLoader `worker_init_fn`: a Ctrl-C or a scheduler's SIGTERM reaches the whole process group;
        workers ignore it and keep feeding the main process until it has checkpointed and ends them."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def agreed(self, accelerator) -> bool:
        """Whether any process received a signal (the same answer everywhere)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


def all_processes_agree(accelerator, flag: bool) -> bool:
    """True when `flag` is true on every process."""
    missing = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return accelerator.reduce(missing, reduction="sum").item() == 0


def kill_daemon_processes() -> None:
    """At exit, multiprocessing ends daemon processes with SIGTERM, which DataLoader workers ignore (see
    `StopSignal.ignore_in_worker`): kill the workers of a loader that an exception left open, or the exit
    would wait for them forever (and first stop PyTorch from reporting those deaths)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()


class DeviceLoader:
    """A loader of a stream's batches moved to the training device (what Accelerate's prepared loaders do),
    for the loader that is not prepared (a stream is already split per process)."""

    def __init__(self, loader, device: torch.device, skip: int = 0):
        self.loader, self.device, self.skip = loader, device, skip

    def set_epoch(self, epoch: int) -> None:
        """The stream's epoch: its shuffle and its views follow it (as a prepared loader sets its sampler's)."""
        set_epoch = getattr(self.loader.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def skip_first(self, batches: int) -> DeviceLoader:
        """The same stream without its first `batches` batches (read and dropped: a stream cannot seek)."""
        return DeviceLoader(self.loader, self.device, batches)

    def __iter__(self):
        for batch in itertools.islice(self.loader, self.skip, None):
            yield {
                k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
            }
