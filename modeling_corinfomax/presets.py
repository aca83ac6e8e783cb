"""Hyperparameters of the original CorInfoMax runs (official README commands), as data.

Each preset sets every hyperparameter of a run in `train.py` flag names; any flag given on the
command line overrides the preset. Sources: the official README commands and code
(github.com/serdarozsoy/corinfomax-ssl at c0b917e). `learning_rate` is the official absolute rate at the official global batch
(`lr_reference_batch_size`); train.py scales it linearly when the global batch differs.
`LINEAR_EVAL_PRESETS` holds each run's linear evaluation, in `eval.py` flag names. `DEFAULTS` is the
base every preset overrides; the no-argument run of train.py (the bundled demo) is `DEFAULTS` + `BUNDLED_DEMO`.
"""

from __future__ import annotations

from .configuration_corinfomax import IMAGENET_MEAN, IMAGENET_STD

# The base of every run (train.py flag names; a --preset, a --config file and flags override them). The
# no-argument run, the bundled Fashion-MNIST demo, adds BUNDLED_DEMO on top, sized for 10 minutes on 2 cores.
DEFAULTS: dict = {
    # data
    "dataset_name": None,
    "dataset_config_name": None,
    "train_dir": None,
    "train_split": "train",
    "validation_split": "test",
    "image_column": None,
    "label_column": None,
    "max_train_samples": None,
    "max_eval_samples": 2000,
    "streaming": False,
    "cache_dir": None,
    "skip_bad_images": False,
    "augmentation": {
        "view1": {
            "crop_scale": [0.4, 1.0],
            "hue": 0.0,
            "saturation": 0.0,
            "blur_p": 0.5,
            "blur_sigma": [0.1, 1.0],
        },
        "view2": {
            "crop_scale": [0.4, 1.0],
            "hue": 0.0,
            "saturation": 0.0,
            "blur_p": 0.1,
            "blur_sigma": [0.1, 1.0],
            "solarize_p": 0.2,
        },
    },
    # model (CorInfoMaxConfig fields), and the weights it starts from (random without a checkpoint)
    "model_name_or_path": None,
    "resume_loss_state": False,
    "backbone": "resnet18",
    "backbone_kwargs": {},
    "cifar_stem": False,
    "projector_dims": [1024, 1024, 64],
    "projector_batchnorm": False,
    "normalize": True,
    "alpha": 250.0,
    "lambda_R": 0.01,
    "lambda_mu": 0.01,
    "R_init": 1.0,
    "eps": 1e-8,
    "image_size": None,  # from the training images' sizes (data/resolution.py) unless a preset or flag sets it
    "image_mean": [0.2860, 0.2860, 0.2860],
    "image_std": [0.3530, 0.3530, 0.3530],
    # optimisation
    "optimizer": "sgd",
    "learning_rate": 0.5,
    "lr_reference_batch_size": 256,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "exclude_bias_and_norm_from_wd": False,
    "per_device_train_batch_size": None,
    "total_batch_size": 256,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 8,
    "min_train_steps": 700,
    "max_train_steps": None,
    "time_budget_minutes": None,
    "warmup_epochs": 1.0,
    "warmup_start_lr": 3e-3,
    "min_lr": 1e-6,
    "seed": 0,
    # speed and distribution
    "mixed_precision": "auto",
    "num_threads": None,
    "channels_last": True,
    "torch_compile": False,
    "reuse_host_memory": True,
    "dataloader_num_workers": None,
    "image_cache": "auto",
    "image_cache_max_gb": 2.0,
    "decode_on_device": False,
    "sync_bn": False,
    # checkpoints, monitoring, output
    "output_dir": "outputs/corinfomax-demo",
    "checkpointing_steps": None,
    "resume_from_checkpoint": None,
    "save_total_limit": None,
    "report_to": "none",
    "logging_steps": 10,
    "eval_steps": None,
    "on_nan": "stop",
    "rankme_samples": 256,
    "collapse_window": 5,
    "collapse_rank_drop": 0.5,
    "collapse_min_rank": 0.05,
    "collapse_patience": 5,
    "save_best_by": "none",
    "do_eval": True,
    "eval_baselines": True,
    "max_eval_train_samples": None,
    "push_to_hub": False,
    "hub_model_id": None,
    "hub_token": None,
    "hub_private_repo": False,
}

# The bundled demo's own recipe, over DEFAULTS when the run uses the bundled data (no --preset, no
# --dataset_name/--train_dir): batch 128 and 5 epochs (935 steps) at the 40 px that the resolution rule picks for
# its 28 px images, within a 9.5-minute budget that the epochs cap (the budget counts start-up, training and the
# final evaluation; a length set by the user replaces it). The kNN bank of its report is 10,000 training images.
# ResNet-10-T (one block per stage, a 3-layer stem) on every machine: about half ResNet-18's step, and at the
# same 935 steps a better encoder (bench/RESULTS.md, "The demo on any CPU": 82.71 / 86.98 independent kNN /
# linear against ResNet-18's 82.11 / 86.15), so the 5 epochs fit the budget where bf16 is native (about
# 6.5 minutes on 2 cores) and the budget stops a CPU without it (fp32, 2-3x slower per step) in time.
BUNDLED_DEMO: dict = {
    "backbone": "resnet10t",
    "total_batch_size": 128,
    "num_train_epochs": 5,
    "time_budget_minutes": 9.5,
    "max_eval_train_samples": 10_000,
}

CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]

_COMMON = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "exclude_bias_and_norm_from_wd": False,  # the official runs decay every parameter
    "warmup_start_lr": 3e-3,
    "R_init": 1.0,
    "eps": 1e-8,
    "normalize": True,
    "augmentation": None,  # the paper's asymmetric pipeline (blur 1.0/0.1, solarize 0/0.2)
    # BatchNorm over the global batch on several processes, as the official runs: one GPU (CIFAR, Tiny
    # ImageNet) or SyncBatchNorm (ImageNet); train.py converts only when there is more than one process.
    "sync_bn": True,
}

# The two ImageNet-100 runs share everything but the backbone and the length.
_IMAGENET100 = {
    **_COMMON,
    "dataset_name": "clane9/imagenet-100",
    "validation_split": "validation",
    "cifar_stem": False,
    "projector_dims": [4096, 4096, 128],
    "projector_batchnorm": False,
    "alpha": 500.0,
    "lambda_R": 0.01,
    "lambda_mu": 0.01,
    "image_size": 224,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "total_batch_size": 1024,
    "learning_rate": 1.0,
    "lr_reference_batch_size": 1024,
    "min_lr": 5e-3,
}

PRESETS: dict[str, dict] = {
    "cifar10": {
        **_COMMON,
        "dataset_name": "uoft-cs/cifar10",
        "image_column": "img",
        "label_column": "label",
        "validation_split": "test",
        "backbone": "resnet18",
        "cifar_stem": True,
        "projector_dims": [2048, 2048, 64],
        "projector_batchnorm": False,
        "alpha": 250.0,
        "lambda_R": 0.01,
        "lambda_mu": 0.01,
        "image_size": 32,
        "image_mean": CIFAR10_MEAN,
        "image_std": CIFAR10_STD,
        "total_batch_size": 512,
        "learning_rate": 0.5,
        "lr_reference_batch_size": 512,
        "num_train_epochs": 1000,
        "warmup_epochs": 10,
        "min_lr": 1e-6,
    },
    "cifar100": {
        **_COMMON,
        "dataset_name": "uoft-cs/cifar100",
        "image_column": "img",
        "label_column": "fine_label",
        "validation_split": "test",
        "backbone": "resnet18",
        "cifar_stem": True,
        "projector_dims": [4096, 4096, 128],
        "projector_batchnorm": False,
        "alpha": 1000.0,
        "lambda_R": 0.01,
        "lambda_mu": 0.01,
        "image_size": 32,
        "image_mean": CIFAR100_MEAN,
        "image_std": CIFAR100_STD,
        "total_batch_size": 512,
        "learning_rate": 0.5,
        "lr_reference_batch_size": 512,
        "num_train_epochs": 1000,
        "warmup_epochs": 10,
        "min_lr": 1e-6,
    },
    "tiny-imagenet": {
        **_COMMON,
        "dataset_name": "zh-plus/tiny-imagenet",
        "validation_split": "valid",
        "backbone": "resnet50",
        "cifar_stem": False,  # the official Tiny run keeps the 7x7 stem and max-pool at 64 px
        "projector_dims": [4096, 4096, 128],
        "projector_batchnorm": False,
        "alpha": 500.0,
        "lambda_R": 0.1,
        "lambda_mu": 0.1,
        "image_size": 64,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "total_batch_size": 1024,
        "learning_rate": 0.5,
        "lr_reference_batch_size": 1024,
        "num_train_epochs": 800,
        "warmup_epochs": 10,
        "min_lr": 1e-6,
    },
    "imagenet100-r18": {
        **_IMAGENET100,
        "backbone": "resnet18",
        "num_train_epochs": 400,
        "warmup_epochs": 10,
    },
    "imagenet100-r50": {
        **_IMAGENET100,
        "backbone": "resnet50",
        "num_train_epochs": 200,
        "warmup_epochs": 5,
    },
    "imagenet1k-r50": {
        **_COMMON,
        "dataset_name": "ILSVRC/imagenet-1k",
        "validation_split": "validation",
        "backbone": "resnet50",
        "cifar_stem": False,
        "projector_dims": [8192, 8192, 512],
        "projector_batchnorm": True,
        "alpha": 2000.0,
        "lambda_R": 0.1,
        "lambda_mu": 0.1,
        "image_size": 224,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "total_batch_size": 1536,
        "learning_rate": 0.2,
        "lr_reference_batch_size": 1536,
        "num_train_epochs": 100,
        "warmup_epochs": 10,
        "min_lr": 1e-6,
        "mixed_precision": "bf16",  # the official run used CUDA AMP; the loss stays float64 either way
    },
}

# The official linear evaluation of each run (the official README and linear-evaluation code) in eval.py flag names:
# a frozen eval-mode backbone, SGD momentum 0.9 without weight decay, 100 epochs at a global batch of
# 256, the schedule stepped per epoch. `eval.py --preset NAME` applies it; explicit flags override it.
_LINEAR_COSINE = {
    "linear_epochs": 100,
    "linear_lr": 0.2,
    "linear_lr_schedule": "cosine",
    "linear_min_lr": 2e-3,
    "total_batch_size": 256,
}
_LINEAR_STEP = {
    "linear_epochs": 100,
    "linear_lr": 25.0,  # absolute, at batch 256
    "linear_lr_schedule": "step",
    "linear_lr_step_size": 20,
    "linear_lr_gamma": 0.1,
    "total_batch_size": 256,
}
LINEAR_EVAL_PRESETS: dict[str, dict] = {
    "cifar10": _LINEAR_COSINE,
    "cifar100": _LINEAR_COSINE,
    "tiny-imagenet": _LINEAR_COSINE,
    "imagenet100-r18": _LINEAR_COSINE,
    "imagenet100-r50": _LINEAR_COSINE,
    "imagenet1k-r50": _LINEAR_STEP,
}

__all__ = ["LINEAR_EVAL_PRESETS", "PRESETS"]
