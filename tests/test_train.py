"""train.py: flags, validation before data loading, outputs, exact resume, signals and 2 processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, SMALL, TrainInBackground, assert_same_weights, run_train

from modeling_corinfomax import hardware
from modeling_corinfomax.cli import train, train_args, train_data
from modeling_corinfomax.presets import DEFAULTS, PRESETS

# --------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lambda_R", "1.0"], "lambda_R=1.0"),
        (["--lambda_mu", "-0.1"], "lambda_mu=-0.1"),
        (["--eps", "0"], "eps=0.0"),
        (["--total_batch_size", "0"], "--total_batch_size must be a positive integer"),
        (["--per_device_train_batch_size", "-4"], "--per_device_train_batch_size must be a positive integer"),
        (["--backbone", "resnet9000"], "not a timm architecture"),
        (["--push_to_hub"], "--hub_model_id"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps"),
        (["--projector_dims"], "expected at least one argument"),
        (["--backbone", "vit_tiny_patch16_224", "--image_size", "32"], "cannot take 32x32"),
        (["--backbone", "vit_tiny_patch16_224", "--cifar_stem"], "cifar_stem=True needs a ResNet"),
        (["--streaming", "--dataset_name", "x/y"], "--max_train_steps"),
        (["--dataset_name", "x/y", "--train_dir", "/tmp"], "not both"),
    ],
)
def test_bad_flags_are_refused_before_loading_data(flags, message, capsys):
    with pytest.raises(SystemExit) as raised:
        train.parse_args(flags)
    text = str(raised.value) + capsys.readouterr().err
    assert message in text


def test_the_hf_example_flag_names_are_the_same_flags():
    from modeling_corinfomax.cli import eval as eval_command  # noqa: PLC0415
    from modeling_corinfomax.cli import push  # noqa: PLC0415

    for parse in (train.parse_args, eval_command.parse_args):
        extra = [] if parse is train.parse_args else ["--model_name_or_path", "m"]
        args = parse([*extra, "--image_column_name", "picture", "--label_column_name", "kind"])
        assert (args.image_column, args.label_column) == ("picture", "kind")
    args = push.parse_args(["ckpt", "--hub_model_id", "org/m", "--hub_token", "t", "--hub_private_repo"])
    assert (args.repo_id, args.token, args.private) == ("org/m", "t", True)


def test_every_command_negates_a_switch_both_ways():
    from modeling_corinfomax.cli import eval as eval_command  # noqa: PLC0415
    from modeling_corinfomax.cli import push  # noqa: PLC0415

    for negation in ("--no_streaming", "--no-streaming"):  # HfArgumentParser's style and argparse's
        assert train.parse_args(["--streaming", "--max_train_steps", "2", negation]).streaming is False
    for negation in ("--no_use_projector", "--no-use_projector"):
        args = eval_command.parse_args(["--model_name_or_path", "m", "--use_projector", negation])
        assert args.use_projector is False
    assert push.parse_args(["ckpt", "--repo_id", "o/m", "--private", "--no_private"]).private is False


def test_report_to_takes_every_accelerate_tracker_and_checks_it_is_installed():
    import importlib.util  # noqa: PLC0415

    from accelerate.utils import LoggerType  # noqa: PLC0415

    assert set(train_args.TRACKERS) == {t.value for t in LoggerType} - {"all"}
    assert train.parse_args(["--report_to", "tensorboard"]).report_to == ["tensorboard"]  # a dev dependency
    assert train.parse_args(["--report_to", "all"]).report_to == "all"
    with pytest.raises(SystemExit, match="unknown tracker \\['tensorbored'\\]"):
        train.parse_args(["--report_to", "tensorboard,tensorbored"])
    missing = next(
        name for name in ("aim", "dvclive", "swanlab", "clearml") if not importlib.util.find_spec(name)
    )
    with pytest.raises(SystemExit, match=f"--report_to {missing} needs `pip install {missing}`"):
        train.parse_args(["--report_to", f"tensorboard,{missing}"])


def test_a_resolution_the_backbone_cannot_take_raises_the_configuration_error_naming_the_fix():
    from modeling_corinfomax.errors import ConfigurationError  # noqa: PLC0415

    # Found with the data, after the flags: an exception for the caller (not an exit), which main reports.
    args = train.parse_args(["--backbone", "vit_tiny_patch16_224", "--train_dir", "unused"])
    with pytest.raises(ConfigurationError, match="cannot take 32x32 images .*Use a larger --image_size"):
        train_args.set_image_size(args, 32)


@pytest.mark.parametrize("command", ["eval", "finetune", "push", "convert_official"])
def test_every_command_ends_a_problem_the_user_can_fix_in_one_error_line(command, tmp_path, monkeypatch):
    """A `CorInfoMaxError` raised below a command's main (a missing column or checkpoint) ends it with one
    `error:` line that names the fix, not a traceback."""
    import importlib  # noqa: PLC0415

    module = importlib.import_module(f"modeling_corinfomax.cli.{command}")
    column = ["--model_name_or_path", "m", "--image_column", "pixels", "--cache_dir", str(tmp_path)]
    no_column = "--image_column 'pixels' is not a column"
    argv, fix = {
        "eval": (column, no_column),
        "finetune": ([*column, "--output_dir", str(tmp_path / "out")], no_column),
        "push": ([str(tmp_path / "none"), "--repo_id", "org/m"], "pass a save_pretrained folder"),
        "convert_official": ([str(tmp_path / "none.pth"), str(tmp_path / "out")], "pass an official .pth"),
    }[command]
    if command == "finetune":  # HfArgumentParser reads sys.argv, as in the HF examples
        monkeypatch.setattr(sys, "argv", ["finetune.py", *argv])
        argv = None
    with pytest.raises(SystemExit) as raised:
        module.main() if argv is None else module.main(argv)
    message = str(raised.value)
    assert message.startswith("error: ") and fix in message and "\n" not in message


def test_unknown_preset_is_refused_in_one_line():
    with pytest.raises(SystemExit) as raised:
        train.parse_args(["--preset", "cifar11"])
    message = str(raised.value)
    assert message.startswith("error: argument --preset: invalid choice: 'cifar11'") and "\n" not in message


def test_a_data_source_on_the_command_line_replaces_the_presets_and_keeps_its_recipe(tmp_path):
    preset = PRESETS["cifar10"]
    for flags in (["--train_dir", str(tmp_path)], ["--dataset_name", "org/other", "--train_split", "all"]):
        args = train.parse_args(["--preset", "cifar10", *flags])
        assert args.image_column is None and args.label_column is None  # resolved for the new source
        assert args.validation_split == DEFAULTS["validation_split"] and args.dataset_config_name is None
        for key in (
            "alpha",
            "projector_dims",
            "total_batch_size",
            "learning_rate",
            "warmup_epochs",
            "image_mean",
        ):
            assert getattr(args, key) == preset[key], key
    args = train.parse_args(["--preset", "cifar10", "--dataset_name", "org/other", "--image_column", "png"])
    assert (args.dataset_name, args.image_column, args.train_split) == ("org/other", "png", "train")
    config = tmp_path / "data.yaml"
    config.write_text(f"train_dir: {tmp_path}\n")  # a source from a config file counts as the user's too
    args = train.parse_args(["--preset", "cifar10", "--config", str(config)])
    assert args.dataset_name is None and args.train_dir == str(tmp_path) and args.image_column is None
    assert train.parse_args(["--preset", "cifar10"]).image_column == "img"  # the preset's own source


def test_run_length_rules(tmp_path):
    def steps(flags, per_epoch):
        return train.run_length(train.parse_args(flags), per_epoch)

    folder = ["--train_dir", str(tmp_path)]
    assert steps([], 187) == 935  # the demo: 5 epochs of the bundled data at batch 128
    assert steps(folder, 93) == 744 and steps(folder, 15) == 700  # a folder: 8 epochs, at least 700 steps
    assert steps([*folder, "--num_train_epochs", "2"], 15) == 30  # asked for: as given
    assert steps(["--max_train_steps", "5"], 15) == 5
    assert steps([*folder, "--time_budget_minutes", "9"], 15) is None  # the budget decides
    assert (
        steps([*folder, "--time_budget_minutes", "9", "--num_train_epochs", "3"], 15) == 45
    )  # ... under a cap
    assert steps(["--preset", "cifar10"], 97) == 97_000


def test_the_bundled_demo_has_its_own_recipe_and_other_data_keeps_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_runs_bf16_fast", lambda: True)
    demo = train.parse_args([])
    assert (demo.total_batch_size, demo.num_train_epochs, demo.time_budget_minutes) == (128, 5, 9.5)
    assert demo.backbone == "resnet10t" and demo.image_size is None  # 40 px: the rule, for 28 px images
    assert train.parse_args(["--image_size", "28"]).image_size == 28  # a flag still wins
    for flags in (["--train_dir", str(tmp_path)], ["--dataset_name", "org/data"]):
        args = train.parse_args(flags)
        assert (args.total_batch_size, args.num_train_epochs, args.time_budget_minutes) == (256, 8, None)
        assert args.backbone == "resnet18" and not args.bundled_demo, flags
    cifar = train.parse_args(["--preset", "cifar10", "--train_dir", str(tmp_path)])
    assert (cifar.image_size, cifar.total_batch_size) == (32, 512)  # the recipe, not the demo's
    help_text = " ".join(train_args.build_parser().format_help().split())
    assert "default: resnet18 (resnet10t for the bundled demo)" in help_text
    assert "default: none (9.5 for the bundled demo)" in help_text


def test_the_demo_recipe_is_the_same_on_both_cpu_classes_and_its_budget_sizes_it(monkeypatch):
    for native_bf16, precision in ((False, "no"), (True, "bf16")):  # an AVX2-only CPU; AMX or AVX512-BF16
        monkeypatch.setattr(hardware, "cpu_runs_bf16_fast", lambda native=native_bf16: native)
        args = train.parse_args([])
        assert (args.backbone, args.time_budget_minutes, args.num_train_epochs) == ("resnet10t", 9.5, 5)
        assert hardware.choose_mixed_precision("auto", torch.device("cpu"))[0] == precision
    assert train.parse_args(["--backbone", "resnet50"]).backbone == "resnet50"  # a flag wins
    # a length the user sets replaces the demo's budget (epochs and steps are as given; a budget is theirs)
    assert train.parse_args(["--num_train_epochs", "2"]).time_budget_minutes is None
    assert train.parse_args(["--max_train_steps", "9"]).time_budget_minutes is None
    assert train.parse_args(["--time_budget_minutes", "20"]).time_budget_minutes == 20


def test_the_default_batch_shrinks_for_small_datasets_only(tmp_path):
    def batch(flags, size):
        return train_data.default_batch_size(train.parse_args(flags), size)

    folder = ["--train_dir", str(tmp_path)]
    assert batch([], 24_000) == 128  # the demo's own batch
    assert batch(folder, 24_000) == 256 and batch(folder, 10_000) == 128
    assert batch(folder, 4_000) == 64 and batch(folder, 300) == 64
    assert batch([*folder, "--total_batch_size", "256"], 4_000) == 256  # asked for: as given
    assert batch(["--preset", "cifar10"], 4_000) == 512  # a recipe keeps its batch


def test_presets_set_the_original_hyperparameters_and_flags_override():
    args = train.parse_args(["--preset", "cifar10"])
    assert (args.backbone, args.cifar_stem, args.projector_dims) == ("resnet18", True, [2048, 2048, 64])
    assert (args.alpha, args.lambda_R, args.lambda_mu, args.eps, args.learning_rate) == (
        250.0,
        0.01,
        0.01,
        1e-8,
        0.5,
    )
    assert (args.total_batch_size, args.num_train_epochs, args.warmup_epochs) == (512, 1000, 10)
    args = train.parse_args(["--preset", "imagenet1k-r50", "--alpha", "1000"])
    assert args.projector_batchnorm and args.projector_dims == [8192, 8192, 512] and args.lambda_R == 0.1
    assert args.alpha == 1000.0 and args.model_config.alpha == 1000.0


def test_every_config_field_is_a_flag():
    from modeling_corinfomax import CorInfoMaxConfig

    fields = set(CorInfoMaxConfig().to_diff_dict()) | set(train_args.CONFIG_FIELDS)
    fields -= {
        "model_type",
        "transformers_version",
        "initializer_range",
        "auto_map",
        "architectures",
        "dtype",
    }
    args = train.parse_args([])
    assert fields <= set(vars(args)), fields - set(vars(args))


def test_config_file_is_read_and_unknown_keys_refused(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("alpha: 123.0\nprojector_dims: [32, 8]\n")
    args = train.parse_args(["--config", str(good), "--lambda_R", "0.2"])
    assert (args.alpha, args.projector_dims, args.lambda_R) == (123.0, [32, 8], 0.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"alpha": 1.0, "learning_rat": 0.1}))
    with pytest.raises(SystemExit, match=r"unknown keys \['learning_rat'\].*Known keys: .*learning_rate"):
        train.parse_args(["--config", str(bad)])


def test_lr_schedule_warms_up_then_follows_a_cosine():
    from modeling_corinfomax.training import Schedule  # noqa: PLC0415

    args = train.parse_args(["--warmup_epochs", "2", "--warmup_start_lr", "0.01", "--min_lr", "0.001"])

    def rates(total_steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = Schedule(optimizer, 1.0, 10, args.warmup_epochs, args.warmup_start_lr, args.min_lr)
        schedule.fit(total_steps, done_steps=0)
        lrs = []
        for _ in range(total_steps):
            lrs.append(schedule.scheduler.get_last_lr()[0])
            optimizer.step()
            schedule.scheduler.step()
        return lrs

    lr = rates(100)
    assert lr[0] == pytest.approx(0.01)
    assert lr[10] == pytest.approx(0.505)
    assert lr[20] == pytest.approx(1.0)
    assert lr[59] == pytest.approx(0.001 + 0.5 * 0.999 * (1 + math.cos(math.pi * 39 / 79)))
    assert lr[99] == pytest.approx(0.001)  # the last of the 100 steps runs at --min_lr
    short = rates(10)
    assert short[5] == pytest.approx(1.0) and short[9] == pytest.approx(0.001)  # warm-up: half a short run


# --------------------------------------------------------------------------------------------------- runs


def test_small_run_writes_a_loadable_model_and_all_outputs(tmp_path):
    out = tmp_path / "run"
    result = run_train(
        [
            *SMALL,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "3",
            "--do_eval",
            "--no-eval_baselines",
            "--max_eval_train_samples",
            "200",
            "--backbone",  # the demo recipe would pick ResNet-10-T in fp32
            "resnet18",
            "--mixed_precision",  # fp32, as the recomputation below: bf16 features flip a few kNN votes
            "no",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_corinfomax.py",
        "training_args.json",
        "training_log.json",
        "training.png",
        "eval_results.json",
    ):
        assert (out / name).exists(), name
    results = json.loads((out / "eval_results.json").read_text())
    assert results["global_step"] == 3 and results["protocols"]["knn"]["k"] == 20
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["images_per_second"] > 0 and 1 <= r["effective_rank_R1"] <= 16 for r in log)
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())

    from transformers import AutoModel, AutoModelForPreTraining

    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "CorInfoMaxModel"
    pretraining = AutoModelForPreTraining.from_pretrained(out)
    assert int(pretraining.loss_fn.num_updates) == 3  # the loss state travels with the weights

    # The reported accuracies are the saved encoder's, recomputed here: the kNN bank and the probe's
    # training set are the first 200 training images, the test set is the whole test split, all in the
    # evaluation view (short side to 8/7 of the size, bicubic; centre crop; normalise).
    expected = evaluate_saved_encoder(model.eval(), bank_size=200, cache_dir=tmp_path / "cache")
    for key in ("knn_top1", "linear_top1"):  # within 2 of the 5,000 test images (float rounding)
        assert results[key] == pytest.approx(expected[key], abs=2 * 100 / 5000), key
    assert results["knn_top1"] > 20.0  # 10 classes: well above chance even after 3 steps


def evaluate_saved_encoder(model, bank_size: int, cache_dir) -> dict[str, float]:
    """kNN (k=20, T=0.07) and linear-probe top-1 of `model` on the bundled data, computed from scratch."""
    import torch  # noqa: PLC0415
    from datasets import load_dataset  # noqa: PLC0415
    from torchvision.transforms import v2  # noqa: PLC0415

    from modeling_corinfomax.data import BUNDLED_DATA_DIR  # noqa: PLC0415
    from modeling_corinfomax.evaluation import knn_accuracy, linear_probe  # noqa: PLC0415

    config = model.config
    view = v2.Compose(
        [
            v2.Lambda(lambda image: image.convert("RGB")),
            v2.PILToTensor(),
            v2.Resize(int(config.image_size * 8 / 7), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(config.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(config.image_mean, config.image_std),
        ]
    )
    files = {split: str(BUNDLED_DATA_DIR / f"{split}.parquet") for split in ("train", "test")}
    data = load_dataset("parquet", data_files=files, cache_dir=str(cache_dir))

    def features(rows) -> tuple[torch.Tensor, torch.Tensor]:
        images = rows["image"]
        with torch.no_grad():
            pooled = [
                model(pixel_values=torch.stack([view(image) for image in images[i : i + 500]])).pooler_output
                for i in range(0, len(images), 500)
            ]
        return torch.cat(pooled), torch.tensor(rows["label"])

    (x_train, y_train), (x_test, y_test) = (
        features(data["train"].select(range(bank_size))),
        features(data["test"]),
    )
    knn = knn_accuracy(x_train, y_train, x_test, y_test, 10, k=20, temperature=0.07)
    linear = linear_probe(x_train, y_train, x_test, y_test, 10)
    return {"knn_top1": knn["top1"], "linear_top1": linear["top1"]}


# What train.py logs for each --image_cache setting: batched crops of decoded images, per-image crops.
IMAGE_CACHE_PATHS = {"on": "crops are made a batch at a time", "off": "decoding and cropping per image"}


@pytest.mark.parametrize("image_cache", ["on", "off"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(image_cache, tmp_path):
    # A 4-step warm-up, then the peak rate to the end (--min_lr = the peak, 0.0625 at batch 32): the
    # schedule does not depend on --max_train_steps, so the signalled run is given 10,000 steps (it cannot
    # end before the signal) and still follows the 8-step run.
    common = [*SMALL, "--checkpointing_steps", "2", "--dataloader_num_workers", "1", "--warmup_epochs", "0.5"]
    common += ["--learning_rate", "0.0625", "--lr_reference_batch_size", "32", "--min_lr", "0.0625"]
    common += ["--image_cache", image_cache]
    straight = tmp_path / "straight"
    result = run_train([*common, "--max_train_steps", "8", "--output_dir", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert IMAGE_CACHE_PATHS[image_cache] in result.stdout + result.stderr  # the flag chose the data path

    # SIGTERM once the first checkpoint is complete: the run saves the current step and exits cleanly.
    resumed = tmp_path / "resumed"
    with TrainInBackground([*common, "--max_train_steps", "10000", "--output_dir", str(resumed)]) as run:
        run.wait_until(lambda: (resumed / "checkpoints" / "step_2" / "trainer_state.json").exists(), "step_2")
        run.send(signal.SIGTERM, group=False)
        returncode, output = run.finish()
    assert returncode == 0, output[-3000:]
    steps = sorted(int(p.name.split("_")[1]) for p in (resumed / "checkpoints").glob("step_*"))
    assert f"received SIGTERM: saved {resumed / 'checkpoints' / f'step_{steps[-1]}'}" in output
    assert steps[-1] < 8, "the signal should stop the run before the end"
    assert not (resumed / "model.safetensors").exists()

    resume = ["--resume_from_checkpoint", "latest"]
    result = run_train([*common, "--max_train_steps", "8", "--output_dir", str(resumed), *resume])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / f'step_{steps[-1]}'}" in result.stdout
    assert_same_weights(straight, resumed)
    log = json.loads((resumed / "training_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 9))


def test_two_processes_see_different_data_share_the_global_loss_and_stay_identical(tmp_path):
    worker = REPO_ROOT / "tests" / "train_distributed_worker.py"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["overlap"] == 0 and report["indices_per_rank"] == 16
    assert report["loss_rel_err"] < 1e-10 and report["loss_equal_across_ranks"]
    assert report["params_identical"] and report["state_identical"]

    # train.main on the 2 processes: 2 steps of the global batch of 2 x 16 images, one saved model whose
    # loss state was updated once per step (not once per process), the same results on both ranks.
    results = [json.loads((tmp_path / f"results_rank{rank}.json").read_text()) for rank in range(2)]
    for rank_results in results:  # each process times itself
        rank_results.pop("train_runtime_seconds")
    assert results[0] == results[1] and results[0]["global_step"] == 2
    run = tmp_path / "run"
    assert json.loads((run / "training_args.json").read_text())["total_batch_size"] == 32
    assert [r["step"] for r in json.loads((run / "training_log.json").read_text())] == [1, 2]
    from transformers import AutoModelForPreTraining  # noqa: PLC0415

    assert int(AutoModelForPreTraining.from_pretrained(run).loss_fn.num_updates) == 2


def test_gradient_accumulation_counts_the_last_short_window_and_draws_views_per_micro_batch(tmp_path):
    # 40 images in micro-batches of 4 (global batch 16 = 4 x 4 accumulation): 10 batches per epoch, and
    # Accelerate steps after batches 4, 8 and 10 (the end of the loader). One epoch is 3 steps, not 2.
    flags = [*SMALL, "--backbone", "test_resnet", "--max_train_samples", "40", "--total_batch_size", "16",
             "--gradient_accumulation_steps", "4", "--num_train_epochs", "1", "--mixed_precision", "no",
             "--output_dir", str(tmp_path)]  # fmt: skip
    results = train.main(flags)
    assert results["global_step"] == 3
    assert [r["step"] for r in json.loads((tmp_path / "training_log.json").read_text())] == [1, 2, 3]

    from modeling_corinfomax.data import TwoViewAugmentation  # noqa: PLC0415
    from modeling_corinfomax.training import TwoViews  # noqa: PLC0415

    views = TwoViews(TwoViewAugmentation(), [0.5] * 3, [0.25] * 3, torch.device("cpu"))
    crops = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    drawn = {micro: views.make(crops, crops, step=5, micro_batch=micro)[1] for micro in (0, 1, 2)}
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])  # its own draws
    assert torch.equal(drawn[1], views.make(crops, crops, step=5, micro_batch=1)[1])  # seeded: resumable
