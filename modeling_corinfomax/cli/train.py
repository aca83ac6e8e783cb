#!/usr/bin/env python
"""Pretrain a CorInfoMax image encoder with Accelerate on a `datasets` image corpus.

    accelerate launch train.py                                   # bundled Fashion-MNIST demo (CPU)
    accelerate launch train.py --preset cifar10 --train_dir my_images   # the paper's recipe on your images
    accelerate launch --multi_gpu train.py --preset imagenet1k-r50 --dataset_name ILSVRC/imagenet-1k

The script reads as transformers' `run_*_no_trainer.py` examples: `main()` parses the flags
(`train_args.py`), builds the Accelerator, the data, the model, the optimizer and the schedule, prepares
them, resumes, runs `train_one_epoch` until the planned step, then saves, evaluates and pushes. The
parts live in the package: `training` (state, optimizer, schedule, the step, budgets, signals),
`checkpointing`, `evaluation`, `monitoring` and `reporting`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import broadcast, broadcast_object_list, set_seed
from tqdm.auto import tqdm

import modeling_corinfomax  # noqa: F401  (registers the Auto classes)
from modeling_corinfomax import CorInfoMaxForPreTraining
from modeling_corinfomax.checkpointing import BEST_MODEL, CheckpointSaver, RunLock, write_atomically
from modeling_corinfomax.cli.train_args import parse_args, set_image_size
from modeling_corinfomax.cli.train_data import build_dataloaders
from modeling_corinfomax.data import (
    DataError,
    ExampleCollator,
    ImageViewDataset,
    InMemoryEvalDataset,
    InMemoryTwoViewDataset,
    IterableImageViewDataset,
    NormalizedBatches,
    data_error_message,
    eval_view,
    normalize_batch,
)
from modeling_corinfomax.evaluation import (
    BUNDLED_DATASET_NAME,
    EVAL_RESULTS_NAME,
    FROZEN_PROTOCOLS,
    KNN_K,
    KNN_TEMPERATURE,
    evaluate_frozen,
    extract_features,
    knn_accuracy,
    random_init_encoder,
    raw_pixel_features,
    update_eval_results,
)
from modeling_corinfomax.hardware import (
    choose_cpu_threads,
    choose_mixed_precision,
    expected_device,
    launched_processes,
)
from modeling_corinfomax.monitoring import CollapseMonitor, projection_spectrum, rankme, spectrum_summary
from modeling_corinfomax.reporting import (
    TRAINING_ARGS_NAME,
    TRAINING_FIGURE_NAME,
    TRAINING_LOG_NAME,
    plot_training,
    write_embedding_pictures,
)
from modeling_corinfomax.training import (
    MAX_CONSECUTIVE_SKIPS,
    DeviceLoader,
    PretrainingStep,
    StopSignal,
    TimeBudget,
    TrainerState,
    all_processes_agree,
    make_lr_lambda,
    make_optimizer,
    make_scheduler,
    peak_learning_rate,
    planned_steps,
)

logger = logging.getLogger("corinfomax.train")

EVAL_BATCH_SIZE = 256

# ----------------------------------------------------------------------------------------- the training run


@dataclass
class Run:
    """What `main` wires together and `train_one_epoch` uses (timm's train_one_epoch takes them as
    arguments; here they travel together)."""

    args: object
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP, compiled)
    unwrapped: CorInfoMaxForPreTraining
    optimizer: object
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: PretrainingStep
    saver: CheckpointSaver
    state: TrainerState
    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    monitor: CollapseMonitor
    budget: TimeBudget | None
    progress: tqdm
    stop: StopSignal
    eval_rows: dict | None
    loader_kwargs: dict
    rankme_images: InMemoryEvalDataset | None
    stopped_by: int | None = None
    consecutive_skips: int = 0
    images_seen: int = 0
    window_start: float = 0.0


def main(argv: list[str] | None = None) -> dict | None:
    """Run `pretrain`; a data problem, also one found mid-run in a DataLoader worker, ends it with one line."""
    try:
        return pretrain(argv)
    except DataError as error:
        message = data_error_message(error)
    # Raised outside the handler, so that the failed DataLoader (its traceback holds it) is freed now and
    # ends its workers.
    raise SystemExit(f"error: {message}")


def pretrain(argv: list[str] | None = None) -> dict | None:
    started = psutil.Process().create_time()  # a time budget counts the start-up too
    args = parse_args(argv)
    project = Path(args.output_dir)
    accelerator = make_accelerator(args, project)
    lock = hold_output_dir(project, accelerator)
    saver = CheckpointSaver(accelerator, project, args.save_total_limit)
    if args.resume_from_checkpoint is None and saver.latest() is not None:
        # A fresh run would mix its checkpoints with these, and a later 'latest' could pick the old run's.
        raise SystemExit(
            f"error: --output_dir {project} holds checkpoints of an earlier run: pass --resume_from_checkpoint "
            f"latest to continue it, or start afresh in another --output_dir (or delete {project / 'checkpoints'})."
        )
    if args.resume_from_checkpoint and args.image_size is None:
        restore_image_size(args, project, saver)
    set_seed(args.seed)
    rows, sampler, train_loader, eval_rows, loader_kwargs = build_dataloaders(args, accelerator, started)
    peak_lr = peak_learning_rate(args.learning_rate, args.total_batch_size, args.lr_reference_batch_size)

    # Model and optimizer
    model = build_model(args, accelerator)
    optimizer = make_optimizer(
        model, args.optimizer, peak_lr, args.momentum, args.weight_decay, args.exclude_bias_and_norm_from_wd
    )

    # Prepare
    if sampler is None:
        # A stream is already split per process (`split_stream`); Accelerate would split its batches again.
        model, optimizer = accelerator.prepare(model, optimizer)
        train_loader = DeviceLoader(train_loader, accelerator.device)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # This process's batches per epoch, after `prepare` split them; Accelerate also steps at the end of the
    # loader, so a last, shorter accumulation window is a step too.
    steps_per_epoch = (
        math.ceil(len(train_loader) / args.gradient_accumulation_steps) if sampler is not None else None
    )
    total_steps = run_length(args, steps_per_epoch)
    if args.torch_compile:
        model = torch.compile(model)
    unwrapped = accelerator.unwrap_model(model)

    # Resume, then fit the schedule (a budget fits it once the step time is measured)
    state = TrainerState(bad_images=len(getattr(rows, "bad_images", ())))  # those the image cache left out
    if args.resume_from_checkpoint:
        path = (
            saver.latest() if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        )
        if path is None:
            logger.info(
                "--resume_from_checkpoint latest: no complete checkpoint in %s, starting fresh", project
            )
        else:
            state = TrainerState.from_dict(saver.resume(path))
            logger.info("resumed from %s at step %d", path, state.global_step)
    budget = None
    if args.time_budget_minutes and state.total_steps is not None:
        total_steps = state.total_steps  # fitted before the interruption: the schedule must not change
    elif args.time_budget_minutes:
        reserve = lambda step_time: evaluation_seconds(args, eval_rows, step_time)  # noqa: E731
        budget = TimeBudget(args.time_budget_minutes, started, total_steps, reserve)
        total_steps = total_steps or TimeBudget.UNFITTED_STEPS
    steps_per_epoch = steps_per_epoch or total_steps
    lr_lambda = schedule(args, steps_per_epoch, total_steps, peak_lr)
    scheduler = make_scheduler(optimizer, lr_lambda, state.global_step, peak_lr)

    saver.prepare_folder()
    write_training_args(args, accelerator, project)
    logger.info(
        "%d processes on %s, global batch %d, peak lr %.4g, %s steps (%s per epoch)",
        accelerator.num_processes, accelerator.device, args.total_batch_size, peak_lr,
        "time-budgeted" if total_steps == TimeBudget.UNFITTED_STEPS else total_steps,
        steps_per_epoch if sampler is not None else "streaming: no fixed number",
    )  # fmt: skip
    spectrum_batch = fixed_test_batch(eval_rows, args)
    if state.global_step == 0 and spectrum_batch is not None:
        state.spectrum_start = projection_spectrum(unwrapped, spectrum_batch).tolist()

    # Label-free collapse monitoring: RankMe of fixed training images, warnings from the logged history.
    monitor = CollapseMonitor(
        args.projector_dims[-1], window=args.collapse_window, rank_drop=args.collapse_rank_drop,
        low_rank=args.collapse_min_rank, patience=args.collapse_patience,
    )  # fmt: skip
    for record in state.history:  # a resumed run's monitor goes on from the history, without re-warning
        monitor.update_from_record(record, args.lambda_R)
    step = PretrainingStep(
        model, optimizer, args.two_view_augmentation, args.image_mean, args.image_std, accelerator.device,
        accelerator=accelerator, seed=args.seed, process_index=accelerator.process_index,
        channels_last=args.channels_last,
    )  # fmt: skip
    run = Run(
        args, accelerator, model, unwrapped, optimizer, scheduler, step, saver, state, total_steps, steps_per_epoch,
        peak_lr, monitor, budget,
        progress=tqdm(
            total=None if total_steps == TimeBudget.UNFITTED_STEPS else total_steps, initial=state.global_step,
            disable=not accelerator.is_local_main_process, desc="pretraining", dynamic_ncols=True,
        ),
        stop=StopSignal(), window_start=time.time(), eval_rows=eval_rows, loader_kwargs=loader_kwargs,
        rankme_images=rankme_rows(rows, args) if accelerator.is_main_process and args.rankme_samples else None,
    )  # fmt: skip

    # Train!
    model.train()
    while state.global_step < run.total_steps and run.stopped_by is None:
        train_one_epoch(run, rows, train_loader, streaming=sampler is None)
    run.progress.close()
    if run.stopped_by is not None:
        path = saver.last_saved
        if path is None or path.name != f"step_{state.global_step}":  # not just written
            path = saver.save_or_stop(unwrapped, state.to_dict())
        logger.info("received %s: saved %s; resume with --resume_from_checkpoint latest",
                    signal.Signals(run.stopped_by).name, path)  # fmt: skip
        accelerator.end_training()
        if lock is not None:
            lock.release()
        return None

    # Save, evaluate, push
    accelerator.wait_for_everyone()
    saver.save_model(unwrapped)
    results = final_report(run, time.time() - started, spectrum_batch)
    if args.push_to_hub and accelerator.is_main_process:
        from modeling_corinfomax.export import publish  # noqa: PLC0415

        token = args.hub_token or os.environ.get("HF_TOKEN")
        publish(project, repo_id=args.hub_model_id, token=token, private=args.hub_private_repo)
    accelerator.end_training()
    if lock is not None:
        lock.release()
    return results


def hold_output_dir(project: Path, accelerator: Accelerator) -> RunLock | None:
    """The main process takes `--output_dir`'s run lock (`RunLock`); every process ends with the same one
    line when another run holds it."""
    lock = RunLock(project) if accelerator.is_main_process else None
    refusal = [lock.acquire() if lock is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise SystemExit(f"error: {refusal[0]}")
    return lock


def restore_image_size(args, project: Path, saver: CheckpointSaver) -> None:
    """A resumed run trains at the resolution the interrupted one chose from its data (a time budget's
    choice depends on the machine's speed at the time)."""
    path = project / TRAINING_ARGS_NAME
    if (args.resume_from_checkpoint == "latest" and saver.latest() is None) or not path.is_file():
        return
    size = json.loads(path.read_text()).get("image_size")
    if isinstance(size, int):
        set_image_size(args, size)
        logger.info("image size %d px, as the interrupted run chose", size)


def build_model(args, accelerator) -> torch.nn.Module:
    """`CorInfoMaxForPreTraining` of the flags, with SyncBatchNorm (`--sync_bn`, several GPU processes) and
    channels_last; under `--on_nan skip` its loss reports faults instead of raising them."""
    model = CorInfoMaxForPreTraining(args.model_config)
    if args.on_nan == "skip":
        model.loss_fn.on_error = "report"
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
        raise SystemExit(
            f"error: the launcher started {launched} processes but they could not form one group ({error}); "
            f"launch several processes with {MULTI_PROCESS_CPU_LAUNCH}."
        ) from None
    if state.num_processes != launched:
        raise SystemExit(
            f"error: the launcher started {launched} processes but Accelerate formed a group of "
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


def run_length(args, steps_per_epoch: int | None) -> int | None:
    """The planned number of steps (`training.planned_steps` of the flags); None: a time budget sizes it."""
    epochs_given = (
        "num_train_epochs" in args.explicit or args.bundled_demo
    )  # the demo's epochs cap its budget
    budget = bool(args.time_budget_minutes)
    return planned_steps(
        args.max_train_steps,
        args.num_train_epochs,
        epochs_given,
        steps_per_epoch,
        budget,
        args.min_train_steps,
    )


def schedule(args, steps_per_epoch: int, total_steps: int, peak_lr: float):
    """The warm-up + cosine `LambdaLR` factor of a run of `total_steps`."""
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    return make_lr_lambda(warmup, total_steps, peak_lr, args.warmup_start_lr, args.min_lr)


def write_training_args(args, accelerator, project: Path) -> None:
    """training_args.json (every resolved flag, no token), and the trackers' run configuration."""
    resolved = {
        k: v for k, v in vars(args).items() if k not in ("model_config", "two_view_augmentation", "hub_token")
    }
    if accelerator.is_main_process:
        write_atomically(project / TRAINING_ARGS_NAME, json.dumps(resolved, indent=2, default=str))
    if args.report_to != "none":
        scalars = {k: v for k, v in resolved.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("corinfomax", scalars if accelerator.is_main_process else {})


def evaluation_seconds(args, eval_rows, step_time: float) -> float:
    """A rough cost of the final save and evaluation, from the training step's time: each evaluated
    encoder (the model, and the random-init baseline) runs a forward over the bank and the test split in
    fp32, about a sixth of a two-view training step per image; the probes take a few seconds each."""
    seconds = 10.0  # save, figure, results
    if eval_rows is not None and args.do_eval:
        images = len(eval_rows["train"]) + len(eval_rows["test"])
        encoders = 2 if args.eval_baselines else 1
        per_image = step_time / (6 * args.per_device_train_batch_size)
        seconds += encoders * images * per_image * (1.5 if args.mixed_precision != "no" else 1.0)
        seconds += 5.0 * (encoders + int(args.eval_baselines))
    return seconds


def train_one_epoch(run: Run, rows, train_loader, streaming: bool) -> None:
    """One pass over the data (the rest of it after a resume), until the planned step or a stop."""
    args, accelerator, state = run.args, run.accelerator, run.state
    epoch, whole_epoch, usable_batches = state.epoch, state.step_in_epoch == 0, 0
    # Accelerate's loader sets its sampler's epoch from its own count of iterations when it starts;
    # after a resume that count is wrong, so it is set here (the skipping loader below copies it).
    train_loader.set_epoch(epoch)
    rows.set_epoch(epoch)
    loader = train_loader
    if state.step_in_epoch:
        done = state.step_in_epoch * args.gradient_accumulation_steps
        loader = (
            train_loader.skip_first(done)
            if isinstance(train_loader, DeviceLoader)
            else accelerator.skip_first_batches(train_loader, done)
        )
    micro_batch = 0  # within the accumulation window (a resume starts at a window's start)
    for batch in loader:
        if batch["bad_images"]:
            state.bad_images += len(batch["bad_images"])
            logger.warning("skipped %d unreadable image(s) (total %d), first: %s", len(batch["bad_images"]),
                           state.bad_images, batch["bad_images"][0])  # fmt: skip
        usable = len(batch.get("index", ())) >= 2  # BatchNorm and the covariance need 2 images
        if args.skip_bad_images and accelerator.num_processes > 1:
            usable = all_processes_agree(accelerator, usable)  # drop a batch everywhere or nowhere
        if not usable:
            continue
        usable_batches += 1
        out, fault = run.step(batch["view1"], batch["view2"], state.global_step, micro_batch)
        if fault is not None:
            handle_fault(run, f"step {state.global_step + 1}: {fault}")
            continue
        run.consecutive_skips = 0
        run.images_seen += batch["view1"].shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            micro_batch += 1
            continue
        micro_batch = 0
        lr = run.scheduler.get_last_lr()[0]  # the rate this step used
        run.scheduler.step()
        state.global_step += 1
        state.step_in_epoch += 1
        run.progress.update(1)
        after_step(run, out, lr, epoch)
        if state.global_step >= run.total_steps or run.stopped_by is not None:
            return
    if whole_epoch and not usable_batches:
        raise DataError(
            f"no image of the training split could be read in a whole epoch ({state.bad_images} skipped): "
            "check the files and --image_column."
        )
    if streaming:
        logger.info("pass %d over the stream: %d batches", epoch + 1, usable_batches)
    state.epoch += 1
    state.step_in_epoch = 0
    if args.checkpointing_steps == "epoch":
        run.saver.save_or_stop(run.unwrapped, state.to_dict())


def handle_fault(run: Run, fault: str) -> None:
    """A faulty step changed nothing: skip it (`--on_nan skip`, up to `MAX_CONSECUTIVE_SKIPS` in a row),
    or checkpoint the last completed step and end the run with advice."""
    run.consecutive_skips += 1
    skip = run.args.on_nan == "skip"
    if skip and run.consecutive_skips <= MAX_CONSECUTIVE_SKIPS:
        run.state.skipped_steps += 1
        logger.warning("%s; skipped (%d so far)", fault, run.state.skipped_steps)
        return
    if skip:
        fault += f" (after {MAX_CONSECUTIVE_SKIPS} skipped steps in a row)"
    run.saver.save_or_stop(run.unwrapped, run.state.to_dict(), fault, diverged=skip)


def after_step(run: Run, out, lr: float, epoch: int) -> None:
    """Log, keep the best model, checkpoint, look for a stop signal and fit the time budget."""
    args, accelerator, state, step = run.args, run.accelerator, run.state, run.state.global_step
    if step % args.logging_steps == 0 or step == run.total_steps:
        log_step(run, out, lr, epoch)
    checkpoint_every = None if args.checkpointing_steps in (None, "epoch") else int(args.checkpointing_steps)
    if checkpoint_every and step % checkpoint_every == 0:
        run.saver.save_or_stop(run.unwrapped, state.to_dict())
    if run.stop.agreed(accelerator):
        run.stopped_by = run.stop.received or signal.SIGTERM
    if run.budget is None:
        return
    fitted = run.budget.fit(step, accelerator)
    if fitted is not None:
        run.total_steps = state.total_steps = fitted
        lr_lambda = schedule(args, run.steps_per_epoch, fitted, run.peak_lr)
        run.scheduler = make_scheduler(run.optimizer, lr_lambda, step, run.peak_lr)
        run.progress.total = fitted
        run.progress.refresh()
    elif step % args.logging_steps == 0 and run.budget.overrun(accelerator):
        logger.warning("stopped at step %d: %.0f%% of the time budget used", step, 100 * TimeBudget.OVERRUN)
        run.total_steps = step


def log_step(run: Run, out, lr: float, epoch: int) -> None:
    """One history record (loss terms, lr, throughput, spectra of R1/R2, RankMe, kNN) to the trackers and
    the state; collapse warnings; the best-by-RankMe model."""
    args, accelerator, state, step = run.args, run.accelerator, run.state, run.state.global_step
    now = time.time()
    record = {
        "step": step,
        "epoch": epoch + state.step_in_epoch / run.steps_per_epoch,
        "loss": out.loss.item(),
        "invariance_loss": out.invariance_loss.item(),
        "covariance_loss": out.covariance_loss.item(),
        "lr": lr,
        "images_per_second": run.images_seen / max(now - run.window_start, 1e-9),
    }
    for view in ("R1", "R2"):  # the same on every process: the loss gathers the global batch
        for key, value in spectrum_summary(getattr(run.unwrapped.loss_fn, view)).items():
            record[f"{key}_{view}"] = value
    if args.rankme_samples:
        score = probe_rankme(run.unwrapped, run.rankme_images, args, accelerator)
        if score is not None:
            record["rankme"] = score
    if args.eval_steps and step % args.eval_steps == 0 and run.eval_rows is not None:
        record["knn_top1"] = monitor_knn(run.unwrapped, run.eval_rows, args, accelerator, run.loader_kwargs)
    run.images_seen, run.window_start = 0, time.time()
    accelerator.log(record, step=step)
    warnings = run.monitor.update_from_record(record, args.lambda_R)
    if warnings:
        record["collapse_warnings"] = [w.kind for w in warnings]
        for warning in warnings if accelerator.is_main_process else ():
            logger.warning("%s", warning)
    state.history.append(record)
    run.progress.set_postfix(loss=f"{record['loss']:.3f}", erank=f"{record['effective_rank_R1']:.1f}")
    if args.save_best_by == "rankme" and "rankme" in record:
        if state.best is None or record["rankme"] > state.best["rankme"]:
            state.best = {"step": step, "rankme": record["rankme"]}
            run.saver.save_model(run.unwrapped, best=state.best)


# ------------------------------------------------------------------------------- monitoring and evaluation


def fixed_test_batch(eval_rows: dict | None, args) -> torch.Tensor | None:
    """Up to 512 normalised un-augmented test images, for the projection spectrum at start and end."""
    if eval_rows is None:
        return None
    loader = torch.utils.data.DataLoader(eval_rows["test"], batch_size=512, collate_fn=ExampleCollator(True))
    pixels = next(iter(loader)).get("pixel_values")  # None when all of the first 512 are unreadable
    return None if pixels is None else normalize_batch(pixels, args.image_mean, args.image_std)


def rankme_rows(rows, args) -> InMemoryEvalDataset | None:
    """The fixed training images RankMe is measured on: `--rankme_samples` of them, un-augmented (resize
    and centre crop), drawn once with `--seed` (a stream's first ones); None when none can be read."""
    n = args.rankme_samples
    if isinstance(rows, IterableImageViewDataset):
        stream = IterableImageViewDataset(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = list(itertools.islice(stream, n))
    else:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))[:n]
        if isinstance(rows, InMemoryTwoViewDataset):
            labels = torch.full((len(pick),), -1, dtype=torch.long)
            return InMemoryEvalDataset(eval_view(rows.images[pick], args.image_size), labels, pick)
        views = ImageViewDataset(rows.dataset, rows.image_column, None, args.image_size, mode="eval")
        examples = [views[i] for i in pick.tolist()]
    batch = ExampleCollator(skip_bad_images=True)(examples)
    if "pixel_values" not in batch:
        return None
    return InMemoryEvalDataset(batch["pixel_values"], batch["labels"], batch["index"])


def probe_rankme(model, images: InMemoryEvalDataset | None, args, accelerator) -> float | None:
    """RankMe of the pooled backbone embeddings of `images` (eval mode, no gradients), computed on the
    main process (which alone holds the images) and sent to the others, so that every process takes the
    same `--save_best_by` decisions; None when there are no images or the embeddings are not finite."""
    score = float("nan")
    if images is not None:
        # Slices, not a DataLoader: starting one draws from the global RNG, which training must not see.
        batches = [
            {
                "pixel_values": images.pixel_values[i : i + EVAL_BATCH_SIZE],
                "labels": images.index[i : i + EVAL_BATCH_SIZE],
            }
            for i in range(0, len(images), EVAL_BATCH_SIZE)
        ]
        features, _ = extract_features(
            model, NormalizedBatches(batches, args.image_mean, args.image_std, args.channels_last)
        )
        if torch.isfinite(features).all():  # diverged weights: the next step's fault check ends the run
            score = rankme(features)
    if accelerator.num_processes > 1:
        score = broadcast(torch.tensor([score], device=accelerator.device)).item()
    return None if math.isnan(score) else score


def eval_split(eval_rows: dict, split: str, args, loader_kwargs) -> torch.utils.data.Dataset:
    """The evaluation rows of `split`; with `--image_cache`, made once on first use and kept in memory."""
    rows = eval_rows[split]
    if isinstance(rows, ImageViewDataset) and args.image_cache != "off":
        max_bytes = int(args.image_cache_max_gb * 2**30)
        cached = InMemoryEvalDataset.from_views(
            rows, max_bytes, loader_kwargs["num_workers"], args.skip_bad_images
        )
        if cached is not None:
            eval_rows[split] = rows = cached
    return rows


def eval_features(model, rows, args, accelerator, loader_kwargs):
    """Backbone features of un-augmented images (for kNN and the linear probe)."""
    if isinstance(getattr(rows, "dataset", rows), InMemoryEvalDataset):  # in memory: no workers
        loader_kwargs = {k: loader_kwargs[k] for k in ("collate_fn", "pin_memory")} | {"num_workers": 0}
    loader = torch.utils.data.DataLoader(rows, batch_size=EVAL_BATCH_SIZE, shuffle=False, **loader_kwargs)
    several = accelerator.num_processes > 1
    loader = accelerator.prepare_data_loader(loader) if several else loader
    return extract_features(
        model,
        NormalizedBatches(loader, args.image_mean, args.image_std, args.channels_last),
        accelerator=accelerator if several else None,
    )


def monitor_knn(model, eval_rows, args, accelerator, loader_kwargs) -> float:
    """kNN top-1 of the current encoder on the first `--max_eval_samples` of the bank and the test split."""
    n = args.max_eval_samples or len(eval_rows["test"])
    subset = {}
    for k in ("train", "test"):
        rows = eval_split(eval_rows, k, args, loader_kwargs)
        subset[k] = torch.utils.data.Subset(rows, range(min(n, len(rows))))
    xtr, ytr = eval_features(model.corinfomax, subset["train"], args, accelerator, loader_kwargs)
    xte, yte = eval_features(model.corinfomax, subset["test"], args, accelerator, loader_kwargs)
    return knn_accuracy(xtr, ytr, xte, yte, eval_rows["num_classes"], k=KNN_K, temperature=KNN_TEMPERATURE)[
        "top1"
    ]


def final_report(run: Run, seconds: float, spectrum_batch) -> dict:
    """Evaluate the encoder against the baselines; write eval_results.json, training_log.json, the
    figures; print the summary."""
    args, accelerator, state, eval_rows = run.args, run.accelerator, run.state, run.eval_rows
    project = Path(args.output_dir)
    results: dict = {
        "train_runtime_seconds": round(seconds, 1),
        "global_step": state.global_step,
        "skipped_steps": state.skipped_steps,
        "bad_images": state.bad_images,
    }
    if state.best is not None:
        results["best_rankme_step"], results["best_rankme"] = state.best["step"], state.best["rankme"]
        logger.info(
            "best RankMe %.2f at step %d: %s", state.best["rankme"], state.best["step"], project / BEST_MODEL
        )
    if eval_rows is not None and args.do_eval:
        results.update(evaluate_with_baselines(run))
    if accelerator.is_main_process:
        try:  # keep what eval.py / finetune.py already wrote there for the same dataset
            update_eval_results(project, results)
        except ValueError as error:
            logger.warning("%s: replacing %s/eval_results.json", error, project)
            write_atomically(project / EVAL_RESULTS_NAME, json.dumps(results, indent=2))
        write_atomically(project / TRAINING_LOG_NAME, json.dumps(state.history, indent=2))
        start = torch.tensor(state.spectrum_start) if state.spectrum_start is not None else None
        end = projection_spectrum(run.unwrapped, spectrum_batch) if spectrum_batch is not None else None
        plot_training(project / TRAINING_FIGURE_NAME, state.history, start, end)
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=2))
    return results


def evaluate_with_baselines(run: Run) -> dict:
    """kNN + linear probe of the encoder, and of the random-init and raw-pixel baselines; the pictures."""
    args, accelerator, eval_rows = run.args, run.accelerator, run.eval_rows
    for split in ("train", "test"):
        eval_split(eval_rows, split, args, run.loader_kwargs)

    def features(encoder, split):
        return eval_features(encoder, eval_rows[split], args, accelerator, run.loader_kwargs)

    ours = {split: features(run.unwrapped.corinfomax, split) for split in ("train", "test")}
    results = evaluate_frozen(ours["train"], ours["test"], eval_rows["num_classes"])
    if accelerator.is_main_process:
        write_pictures(Path(args.output_dir), ours, eval_rows)
    if args.eval_baselines:
        random_init = random_init_encoder(args.model_config, args.seed).to(accelerator.device)
        if args.channels_last:
            random_init = random_init.to(memory_format=torch.channels_last)
        baselines = {
            "random_init": [features(random_init, split) for split in ("train", "test")],
            "raw_pixels": [raw_pixels(eval_rows[split], args) for split in ("train", "test")],
        }
        for name, (train, test) in baselines.items():
            for key, value in evaluate_frozen(train, test, eval_rows["num_classes"]).items():
                results[f"{key}_{name}"] = value
    results["dataset"] = {
        "name": args.dataset_name or args.train_dir or BUNDLED_DATASET_NAME,
        "config": args.dataset_config_name,
        "split": args.validation_split,
    }
    results["protocols"] = FROZEN_PROTOCOLS
    return results


def raw_pixels(rows, args):
    """Flattened normalised un-augmented pixels of `rows`: the no-learning baseline."""
    loader = torch.utils.data.DataLoader(rows, batch_size=512, collate_fn=ExampleCollator(True))
    return raw_pixel_features(loader, args.image_mean, args.image_std)


def write_pictures(project: Path, features: dict, eval_rows: dict) -> None:
    """`embeddings.png` and `neighbours.png` of the final encoder (the model card shows them)."""
    if any(len(features[split][0]) != len(eval_rows[split]) for split in ("train", "test")):
        logger.info("no embedding pictures: some evaluation images were unreadable (--skip_bad_images)")
        return
    written = write_embedding_pictures(
        project,
        *features["train"],
        *features["test"],
        lambda i: eval_rows["train"][i]["pixel_values"],
        lambda i: eval_rows["test"][i]["pixel_values"],
        class_names=eval_rows["names"],
    )
    logger.info("pictures of the embeddings: %s", ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
