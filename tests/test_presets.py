"""The original runs' presets: the settings they all share and their linear evaluations."""

import pytest

from modeling_corinfomax.presets import LINEAR_EVAL_PRESETS, PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_batchnorm_over_the_global_batch(name):
    # Official CIFAR/Tiny runs used one GPU (BN saw the whole batch), ImageNet runs SyncBatchNorm.
    assert PRESETS[name]["sync_bn"] is True


def test_every_preset_has_its_official_linear_evaluation():
    assert set(LINEAR_EVAL_PRESETS) == set(PRESETS)
    for name, protocol in LINEAR_EVAL_PRESETS.items():
        assert protocol["linear_epochs"] == 100 and protocol["total_batch_size"] == 256, name
        if name == "imagenet1k-r50":
            assert (protocol["linear_lr"], protocol["linear_lr_schedule"]) == (25.0, "step")
            assert (protocol["linear_lr_step_size"], protocol["linear_lr_gamma"]) == (20, 0.1)
        else:
            assert (protocol["linear_lr"], protocol["linear_lr_schedule"], protocol["linear_min_lr"]) == (
                0.2,
                "cosine",
                2e-3,
            ), name
