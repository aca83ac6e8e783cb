#!/usr/bin/env python
"""Pretrain a CorInfoMax image encoder with Accelerate on a `datasets` image corpus.

    accelerate launch train.py                                   # bundled Fashion-MNIST demo (CPU)
    accelerate launch train.py --preset cifar10 --train_dir my_images   # the paper's recipe on your images
    accelerate launch --multi_gpu train.py --preset imagenet1k-r50 --dataset_name ILSVRC/imagenet-1k

The script reads as transformers' `run_*_no_trainer.py` examples: `pretrain` parses the flags
(`train_args.py`), builds the Accelerator, the data (`train_data.py`), the model, the optimizer and the
schedule, prepares them, resumes, runs `train_one_epoch` until the planned step, then saves, evaluates and
pushes. `train_one_epoch` holds the step itself: the two views, the forward, `accelerator.backward`,
`optimizer.step`, `zero_grad`, `scheduler.step`, then the bookkeeping (`after_step`: logging, checkpoint
cadence, stop signal, time budget). The parts live in the package: `training` (state, optimizer, schedule,
views, budgets, signals), `checkpointing`, `run_evaluation` (monitoring and the final report), `monitoring`
and `reporting`. `main` turns the library's errors into a one-line `error:` exit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax import CorInfoMaxForPreTraining
from modeling_corinfomax.checkpointing import CheckpointSaver, RunLock, write_atomically
from modeling_corinfomax.cli.flags import exits_on_error
from modeling_corinfomax.cli.train_args import parse_args, set_backbone, set_image_size
from modeling_corinfomax.cli.train_data import build_dataloaders, run_length
from modeling_corinfomax.data import InMemoryEvalDataset, batch_crops
from modeling_corinfomax.errors import (
    CheckpointError,
    ConfigurationError,
    CorInfoMaxError,
    DataError,
    PublishError,
)
from modeling_corinfomax.hardware import (
    choose_cpu_threads,
    choose_mixed_precision,
    expected_device,
    launched_processes,
    reuse_host_memory,
)
from modeling_corinfomax.monitoring import CollapseMonitor, projection_spectrum, spectrum_summary
from modeling_corinfomax.reporting import TRAINING_ARGS_NAME
from modeling_corinfomax.run_evaluation import (
    EvalData,
    final_report,
    fixed_test_batch,
    monitor_knn,
    probe_rankme,
    rankme_rows,
)
from modeling_corinfomax.starting_point import load_starting_weights
from modeling_corinfomax.training import (
    MAX_CONSECUTIVE_SKIPS,
    DeviceLoader,
    Schedule,
    StopSignal,
    TimeBudget,
    TrainerState,
    TwoViews,
    all_processes_agree,
    checked_forward,
    make_optimizer,
    peak_learning_rate,
    undo_forward,
)
from modeling_corinfomax.wrappers import unwrap

logger = logging.getLogger("corinfomax.train")


@exits_on_error
def main(argv: list[str] | None = None) -> dict | None:
    """Run `pretrain`; a problem the user can fix (a `CorInfoMaxError`: the data, a setting, the output
    folder, also one found mid-run in a DataLoader worker) ends it with one `error:` line."""
    return pretrain(argv)


# ----------------------------------------------------------------------------------------- the training run


def pretrain(argv: list[str] | None = None) -> dict | None:
    started = psutil.Process().create_time()  # a time budget counts the start-up too
    args = parse_args(argv)
    project = Path(args.output_dir)
    accelerator = make_accelerator(args, project)
    lock = hold_output_dir(project, accelerator)
    saver = CheckpointSaver(accelerator, project, args.save_total_limit)
    check_resume(args, project, saver)
    set_seed(args.seed)
    rows, sampler, train_loader, eval_rows, loader_kwargs = build_dataloaders(args, accelerator, started)
    streaming = sampler is None
    eval_data = EvalData(eval_rows, loader_kwargs) if eval_rows is not None else None

    # Model, optimizer, prepare
    peak_lr = peak_learning_rate(args.learning_rate, args.total_batch_size, args.lr_reference_batch_size)
    model, optimizer, train_loader = build_and_prepare(args, accelerator, train_loader, streaming, peak_lr)
    unwrapped = unwrap(model)

    # Resume, then plan the run (a budget fits its length once the step time is measured)
    state = resume(args, saver, TrainerState(bad_images=len(getattr(rows, "bad_images", ()))))
    schedule, budget = plan(
        args, accelerator, optimizer, train_loader, streaming, peak_lr, state, started, eval_data
    )
    saver.prepare_folder()
    write_training_args(args, accelerator, project)
    spectrum_batch = fixed_test_batch(eval_rows, args)
    if state.global_step == 0 and spectrum_batch is not None:
        state.spectrum_start = projection_spectrum(unwrapped, spectrum_batch).tolist()
    log = StepLog.start(args, accelerator, state, schedule, rows, eval_data)
    stopping = Stopping(StopSignal(), budget)
    views = TwoViews(
        args.two_view_augmentation, args.image_mean, args.image_std, accelerator.device, seed=args.seed,
        process_index=accelerator.process_index, channels_last=args.channels_last,
    )  # fmt: skip

    # Train!
    model.train()
    while state.global_step < schedule.total_steps and stopping.stopped_by is None:
        train_one_epoch(
            args, accelerator, model, optimizer, schedule, views, train_loader, rows, state, saver, log, stopping
        )  # fmt: skip
    log.progress.close()
    if stopping.stopped_by is not None:
        save_interrupted(saver, unwrapped, state, stopping.stopped_by)
        return finish(accelerator, lock, None)

    # Save, evaluate, push
    accelerator.wait_for_everyone()
    saver.save_model(unwrapped)
    results = final_report(
        unwrapped, state, args, accelerator, eval_data, time.time() - started, spectrum_batch
    )
    if args.push_to_hub and accelerator.is_main_process:
        push(args, project)
    return finish(accelerator, lock, results)


def build_and_prepare(args, accelerator, train_loader, streaming: bool, peak_lr: float):
    """The model and the optimizer of the flags, prepared by Accelerate with the training loader, and
    compiled with `--torch_compile`."""
    model = build_model(args, accelerator)
    optimizer = make_optimizer(
        model, args.optimizer, peak_lr, args.momentum, args.weight_decay, args.exclude_bias_and_norm_from_wd
    )
    if streaming:  # a stream is already split per process (`split_stream`): Accelerate would split it again
        model, optimizer = accelerator.prepare(model, optimizer)
        train_loader = DeviceLoader(train_loader, accelerator.device)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if args.torch_compile:
        model = torch.compile(model)
    return model, optimizer, train_loader


def save_interrupted(saver: CheckpointSaver, model, state: TrainerState, signum: int) -> None:
    """After a stop signal: the checkpoint of the last completed step, unless it was just written."""
    path = saver.last_saved
    if path is None or path.name != f"step_{state.global_step}":
        path = saver.save_or_stop(model, state.to_dict())
    logger.info("received %s: saved %s; resume with --resume_from_checkpoint latest",
                signal.Signals(signum).name, path)  # fmt: skip


def push(args, project: Path) -> None:
    """`--push_to_hub`: the saved folder, its card and the timm-format export, to `--hub_model_id`. A
    failure after training loses nothing: the message says how to publish the saved folder again."""
    from modeling_corinfomax.export import publish  # noqa: PLC0415

    token = args.hub_token or os.environ.get("HF_TOKEN")
    try:
        publish(project, repo_id=args.hub_model_id, token=token, private=args.hub_private_repo)
    except (CorInfoMaxError, OSError, ValueError, RuntimeError) as error:
        raise PublishError(
            f"could not publish {project} to {args.hub_model_id} ({type(error).__name__}: {error}). The trained "
            f"model is saved in {project}: publish it with `corinfomax-push {project} --repo_id "
            f"{args.hub_model_id}` once the cause is fixed."
        ) from error


def finish(accelerator: Accelerator, lock: RunLock | None, results: dict | None) -> dict | None:
    """End the trackers and release `--output_dir`."""
    accelerator.end_training()
    if lock is not None:
        lock.release()
    return results


def check_resume(args, project: Path, saver: CheckpointSaver) -> None:
    """A fresh run refuses a folder that holds another run's checkpoints; a resumed one keeps its image size
    and backbone."""
    if args.resume_from_checkpoint is None and saver.latest() is not None:
        # A fresh run would mix its checkpoints with these, and a later 'latest' could pick the old run's.
        raise CheckpointError(
            f"--output_dir {project} holds checkpoints of an earlier run: pass --resume_from_checkpoint "
            f"latest to continue it, or start afresh in another --output_dir (or delete {project / 'checkpoints'})."
        )
    if args.resume_from_checkpoint:
        restore_run_choices(args, project, saver)


def resume(args, saver: CheckpointSaver, state: TrainerState) -> TrainerState:
    """The state of `--resume_from_checkpoint` (weights, optimizer, RNGs restored by the saver), or `state`."""
    if not args.resume_from_checkpoint:
        return state
    latest = args.resume_from_checkpoint == "latest"
    path = saver.latest() if latest else Path(args.resume_from_checkpoint)
    if path is None:
        logger.info(
            "--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", saver.output_dir
        )
        return state
    state = TrainerState.from_dict(saver.resume(path))
    logger.info("resumed from %s at step %d", path, state.global_step)
    return state


def plan(
    args,
    accelerator,
    optimizer,
    train_loader,
    streaming: bool,
    peak_lr: float,
    state,
    started: float,
    eval_data,
):
    """The run's `Schedule` and its `TimeBudget` (None without `--time_budget_minutes`, or when a resumed
    run's budget has already fitted the length, which must not change)."""
    # This process's batches per epoch, after `prepare` split them; Accelerate also steps at the end of the
    # loader, so a last, shorter accumulation window is a step too.
    steps_per_epoch = None if streaming else math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps, budget = run_length(args, steps_per_epoch), None
    if args.time_budget_minutes and state.total_steps is not None:
        total_steps = state.total_steps  # fitted before the interruption
    elif args.time_budget_minutes:
        reserve = lambda step_time: evaluation_seconds(args, eval_data, step_time)  # noqa: E731
        budget = TimeBudget(args.time_budget_minutes, started, total_steps, reserve)
        total_steps = total_steps or TimeBudget.UNFITTED_STEPS
    schedule = Schedule(
        optimizer,
        peak_lr,
        steps_per_epoch or total_steps,
        args.warmup_epochs,
        args.warmup_start_lr,
        args.min_lr,
    ).fit(total_steps, state.global_step)
    logger.info(
        "%d processes on %s, global batch %d, peak lr %.4g, %s steps (%s per epoch)",
        accelerator.num_processes, accelerator.device, args.total_batch_size, peak_lr,
        "time-budgeted" if total_steps == TimeBudget.UNFITTED_STEPS else total_steps,
        "streaming: no fixed number" if streaming else steps_per_epoch,
    )  # fmt: skip
    return schedule, budget


def hold_output_dir(project: Path, accelerator: Accelerator) -> RunLock | None:
    """The main process takes `--output_dir`'s run lock (`RunLock`); every process ends with the same one
    line when another run holds it."""
    lock = RunLock(project) if accelerator.is_main_process else None
    refusal = [lock.acquire() if lock is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise CheckpointError(refusal[0])
    return lock


def restore_run_choices(args, project: Path, saver: CheckpointSaver) -> None:
    """A resumed run trains at the resolution, and with the backbone, that the interrupted one chose itself
    (a time budget's choices depend on the machine's speed at the time)."""
    path = project / TRAINING_ARGS_NAME
    if (args.resume_from_checkpoint == "latest" and saver.latest() is None) or not path.is_file():
        return
    saved = json.loads(path.read_text())
    size = saved.get("image_size")
    if args.image_size is None and isinstance(size, int):
        set_image_size(args, size)
        logger.info("image size %d px, as the interrupted run chose", size)
    backbone = saved.get("backbone")
    if "backbone" not in args.explicit and isinstance(backbone, str) and backbone != args.backbone:
        set_backbone(args, backbone)
        logger.info("backbone %s, as the interrupted run chose", backbone)


def build_model(args, accelerator) -> torch.nn.Module:
    """`CorInfoMaxForPreTraining` of the flags, with SyncBatchNorm (`--sync_bn`, several GPU processes) and
    channels_last; under `--on_nan skip` its loss reports faults instead of raising them."""
    model = CorInfoMaxForPreTraining(args.model_config)
    if args.starting_point is not None:  # continued pretraining (`--model_name_or_path`)
        logger.info(
            "starting from %s", load_starting_weights(model, args.starting_point, args.resume_loss_state)
        )
    if args.on_nan == "skip":
        model.numerical_faults = "report"
    if args.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":  # torch's SyncBatchNorm has no CPU kernel
            logger.info("--sync_bn: not available on CPU; each process normalises its own share of the batch")
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


MULTI_PROCESS_CPU_LAUNCH = (
    "accelerate launch --multi_gpu --num_processes N train.py ... (or torchrun --nproc_per_node N)"
)


def process_group() -> PartialState:
    """Accelerate's process state, formed from the launcher's settings: the N processes a launcher started
    (`WORLD_SIZE` and the like) become one group of N, on CPU too (gloo), or the run is refused with one
    line. Without `cpu=True` Accelerate leaves CPU processes ungrouped: N independent runs over the whole
    data, writing into the same folder."""
    launched = launched_processes()
    try:
        state = PartialState(cpu=expected_device().type == "cpu")
    except (RuntimeError, ValueError, OSError) as error:  # no rendezvous address, a peer that never came...
        raise ConfigurationError(
            f"the launcher started {launched} processes but they could not form one group ({error}); "
            f"launch several processes with {MULTI_PROCESS_CPU_LAUNCH}."
        ) from None
    if state.num_processes != launched:
        raise ConfigurationError(
            f"the launcher started {launched} processes but Accelerate formed a group of "
            f"{state.num_processes} ({state.distributed_type}); launch several processes with "
            f"{MULTI_PROCESS_CPU_LAUNCH}."
        )
    return state


def make_accelerator(args, project: Path) -> Accelerator:
    """The Accelerator with the chosen precision and CPU threads, and logging set up; one line states
    each choice."""
    state = process_group()
    device = state.device
    args.mixed_precision, precision_reason = choose_mixed_precision(args.mixed_precision, device)
    threads_reason = None
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))  # processes here
        threads, threads_reason = choose_cpu_threads(args.num_threads, local)
        torch.set_num_threads(threads)
    memory_line = reuse_host_memory(args.reuse_host_memory, device)  # before anything large is allocated
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(project),
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False if args.streaming else None),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    logger.info(
        "precision: %s (%s; --mixed_precision no|bf16|fp16 to change; the loss is float64 either way)",
        "fp32" if args.mixed_precision == "no" else f"{args.mixed_precision} autocast",
        precision_reason,
    )
    if memory_line is not None:
        logger.info(memory_line)
    if threads_reason is not None:
        logger.info("CPU threads: %d per process (%s; --num_threads N to change)", torch.get_num_threads(),
                    threads_reason)  # fmt: skip
    if args.gradient_accumulation_steps > 1:
        logger.warning(
            "gradient accumulation: the CorInfoMax covariance and its log-det are estimated per micro-batch of "
            "%d x %d processes, not over the accumulated batch; the loss is not the large-batch loss.",
            args.per_device_train_batch_size or 0,
            accelerator.num_processes,
        )
    return accelerator


def write_training_args(args, accelerator, project: Path) -> None:
    """training_args.json (every resolved flag, no token), and the trackers' run configuration."""
    resolved = {
        k: v
        for k, v in vars(args).items()
        if k not in ("model_config", "two_view_augmentation", "hub_token", "starting_point")
    }
    if accelerator.is_main_process:
        write_atomically(project / TRAINING_ARGS_NAME, json.dumps(resolved, indent=2, default=str))
    if args.report_to != "none":
        scalars = {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("corinfomax", scalars if accelerator.is_main_process else {})


def evaluation_seconds(args, eval_data: EvalData | None, step_time: float) -> float:
    """A rough cost of the final save and evaluation, from the training step's time: each evaluated
    encoder (the model, and the random-init baseline) runs a forward over the bank and the test split in
    fp32, about a sixth of a two-view training step per image; the probes take a few seconds each."""
    seconds = 10.0  # save, figure, results
    if eval_data is not None and args.do_eval:
        images = len(eval_data.rows["train"]) + len(eval_data.rows["test"])
        encoders = 2 if args.eval_baselines else 1
        per_image = step_time / (6 * args.per_device_train_batch_size)
        seconds += encoders * images * per_image * (1.5 if args.mixed_precision != "no" else 1.0)
        seconds += 5.0 * (encoders + int(args.eval_baselines))
    return seconds


@dataclass
class StepLog:
    """What the logging steps keep between records (one purpose: the history): the collapse monitor,
    the progress bar, the images RankMe and kNN are measured on, and the throughput window."""

    monitor: CollapseMonitor
    progress: tqdm
    eval_data: EvalData | None
    rankme_images: InMemoryEvalDataset | None
    images_seen: int = 0
    window_start: float = field(default_factory=time.time)

    @classmethod
    def start(cls, args, accelerator, state: TrainerState, schedule: Schedule, rows, eval_data) -> StepLog:
        """Label-free collapse monitoring (RankMe of fixed training images, warnings from the history; a
        resumed run's monitor goes on from its history without warning again) and the progress bar."""
        monitor = CollapseMonitor(
            args.projector_dims[-1], window=args.collapse_window, rank_drop=args.collapse_rank_drop,
            low_rank=args.collapse_min_rank, patience=args.collapse_patience,
        )  # fmt: skip
        for record in state.history:
            monitor.update_from_record(record, args.lambda_R)
        planned = None if schedule.total_steps == TimeBudget.UNFITTED_STEPS else schedule.total_steps
        progress = tqdm(
            total=planned, initial=state.global_step, disable=not accelerator.is_local_main_process,
            desc="pretraining", dynamic_ncols=True,
        )  # fmt: skip
        sample = accelerator.is_main_process and args.rankme_samples
        return cls(monitor, progress, eval_data, rankme_rows(rows, args) if sample else None)


@dataclass
class Stopping:
    """Why the run stops before its planned step: a signal, the time budget, faults in a row."""

    signal: StopSignal
    budget: TimeBudget | None
    stopped_by: int | None = None
    consecutive_skips: int = 0


def train_one_epoch(
    args, accelerator, model, optimizer, schedule, views, train_loader, rows, state, saver, log, stopping
) -> None:
    """One pass over the data (the rest of it after a resume), until the planned step or a stop."""
    epoch, whole_epoch, usable_batches = state.epoch, state.step_in_epoch == 0, 0
    loader = epoch_batches(args, accelerator, train_loader, rows, state)
    statistics = unwrap(model).batchnorm_statistics()
    micro_batch = 0  # within the accumulation window (a resume starts at a window's start)
    for batch in loader:
        if not usable(batch, args, accelerator, state):
            continue
        usable_batches += 1
        crops = batch_crops(batch, args.image_size, accelerator.device)  # `--decode_on_device` decodes here
        view1, view2 = views.make(*crops, state.global_step, micro_batch)
        saved = [buffer.clone() for buffer in statistics]  # a faulty forward has updated them
        with accelerator.accumulate(model):
            out, fault = checked_forward(model, view1, view2)
            if fault is None:
                accelerator.backward(out.loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if fault is not None:
            undo_forward(optimizer, statistics, saved)
            handle_fault(
                args, state, saver, stopping, unwrap(model), f"step {state.global_step + 1}: {fault}"
            )
            continue
        stopping.consecutive_skips = 0
        log.images_seen += len(batch["index"]) * accelerator.num_processes
        if not accelerator.sync_gradients:
            micro_batch += 1
            continue
        micro_batch = 0
        lr = schedule.scheduler.get_last_lr()[0]  # the rate this step used
        schedule.scheduler.step()
        state.global_step += 1
        state.step_in_epoch += 1
        after_step(args, accelerator, model, out, lr, epoch, schedule, state, saver, log, stopping)
        if state.global_step >= schedule.total_steps or stopping.stopped_by is not None:
            return
    end_epoch(args, state, saver, unwrap(model), train_loader, usable_batches, whole_epoch)


def epoch_batches(args, accelerator, train_loader, rows, state: TrainerState):
    """The loader of this epoch: its sampler's epoch set, and after a resume without the batches done."""
    # Accelerate's loader sets its sampler's epoch from its own count of iterations when it starts; after
    # a resume that count is wrong, so it is set here (the skipping loader below copies it).
    train_loader.set_epoch(state.epoch)
    rows.set_epoch(state.epoch)
    if not state.step_in_epoch:
        return train_loader
    done = state.step_in_epoch * args.gradient_accumulation_steps
    if isinstance(train_loader, DeviceLoader):
        return train_loader.skip_first(done)
    return accelerator.skip_first_batches(train_loader, done)


def usable(batch: dict, args, accelerator, state: TrainerState) -> bool:
    """Count the batch's unreadable images; a batch needs 2 images (BatchNorm and the covariance), on
    every process when they may differ."""
    if batch["bad_images"]:
        state.bad_images += len(batch["bad_images"])
        logger.warning("skipped %d unreadable image(s) (total %d), first: %s", len(batch["bad_images"]),
                       state.bad_images, batch["bad_images"][0])  # fmt: skip
    ok = len(batch.get("index", ())) >= 2
    if args.skip_bad_images and accelerator.num_processes > 1:
        ok = all_processes_agree(accelerator, ok)  # drop a batch everywhere or nowhere
    return ok


def end_epoch(
    args, state: TrainerState, saver, model, train_loader, usable_batches: int, whole: bool
) -> None:
    """Close the pass: refuse a split that gave no readable batch in a whole epoch, checkpoint with
    `--checkpointing_steps epoch`."""
    if whole and not usable_batches:
        raise DataError(
            f"no image of the training split could be read in a whole epoch ({state.bad_images} skipped): "
            "check the files and --image_column."
        )
    if isinstance(train_loader, DeviceLoader):
        logger.info("pass %d over the stream: %d batches", state.epoch + 1, usable_batches)
    state.epoch += 1
    state.step_in_epoch = 0
    if args.checkpointing_steps == "epoch":
        saver.save_or_stop(model, state.to_dict())


def handle_fault(args, state: TrainerState, saver, stopping: Stopping, model, fault: str) -> None:
    """A faulty step changed nothing: skip it (`--on_nan skip`, up to `MAX_CONSECUTIVE_SKIPS` in a row),
    or checkpoint the last completed step and end the run with advice."""
    stopping.consecutive_skips += 1
    skip = args.on_nan == "skip"
    if skip and stopping.consecutive_skips <= MAX_CONSECUTIVE_SKIPS:
        state.skipped_steps += 1
        logger.warning("%s; skipped (%d so far)", fault, state.skipped_steps)
        return
    if skip:
        fault += f" (after {MAX_CONSECUTIVE_SKIPS} skipped steps in a row)"
    saver.save_or_stop(model, state.to_dict(), fault, diverged=skip)


def after_step(args, accelerator, model, out, lr, epoch, schedule, state, saver, log, stopping) -> None:
    """Log, keep the best model, checkpoint, look for a stop signal and fit the time budget."""
    step = state.global_step
    log.progress.update(1)
    if step % args.logging_steps == 0 or step == schedule.total_steps:
        log_step(args, accelerator, unwrap(model), out, lr, epoch, schedule, state, saver, log)
    checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)
    if checkpoint_every and step % checkpoint_every == 0:
        saver.save_or_stop(unwrap(model), state.to_dict())
    if stopping.signal.agreed(accelerator):
        stopping.stopped_by = stopping.signal.received or signal.SIGTERM
    if stopping.budget is not None:
        fit_budget(args, accelerator, schedule, state, log, stopping.budget)


def fit_budget(args, accelerator, schedule: Schedule, state: TrainerState, log: StepLog, budget) -> None:
    """Refit the run's length (and its schedule) to the time budget, or stop a run far past it."""
    step = state.global_step
    fitted = budget.fit(step, accelerator)
    if fitted is not None:
        state.total_steps = fitted
        schedule.fit(fitted, step)
        log.progress.total = fitted
        log.progress.refresh()
    elif step % args.logging_steps == 0 and budget.overrun(accelerator):
        logger.warning("stopped at step %d: %.0f%% of the time budget used", step, 100 * TimeBudget.OVERRUN)
        schedule.total_steps = step


def log_step(args, accelerator, model, out, lr: float, epoch: int, schedule, state, saver, log) -> None:
    """One history record (loss terms, lr, throughput, spectra of R1/R2, RankMe, kNN) to the trackers and
    the state; collapse warnings; the best-by-RankMe model. `model` is the unwrapped pretraining model."""
    step, now = state.global_step, time.time()
    record = {
        "step": step,
        "epoch": epoch + state.step_in_epoch / schedule.steps_per_epoch,
        "loss": out.loss.item(),
        "invariance_loss": out.invariance_loss.item(),
        "covariance_loss": out.covariance_loss.item(),
        "lr": lr,
        "images_per_second": log.images_seen / max(now - log.window_start, 1e-9),
    }
    for view, R in zip(("R1", "R2"), model.covariance_estimates):  # the same on every process
        for key, value in spectrum_summary(R).items():
            record[f"{key}_{view}"] = value
    if args.rankme_samples:
        score = probe_rankme(model, log.rankme_images, args, accelerator)
        if score is not None:
            record["rankme"] = score
    if args.eval_steps and step % args.eval_steps == 0 and log.eval_data is not None:
        record["knn_top1"] = monitor_knn(model, log.eval_data, args, accelerator)
    log.images_seen, log.window_start = 0, time.time()
    accelerator.log(record, step=step)
    warnings = log.monitor.update_from_record(record, args.lambda_R)
    if warnings:
        record["collapse_warnings"] = [w.kind for w in warnings]
        for warning in warnings if accelerator.is_main_process else ():
            logger.warning("%s", warning)
    state.history.append(record)
    log.progress.set_postfix(loss=f"{record['loss']:.3f}", erank=f"{record['effective_rank_R1']:.1f}")
    if args.save_best_by == "rankme" and "rankme" in record:
        if state.best is None or record["rankme"] > state.best["rankme"]:
            state.best = {"step": step, "rankme": record["rankme"]}
            saver.save_model(model, best=state.best)


if __name__ == "__main__":
    main()
