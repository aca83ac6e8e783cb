"""modeling_corinfomax.training: the trainer state, the optimizer, the schedule and the run length, the
time budget's fit, against values written out by hand."""

from __future__ import annotations

import json
import types

import pytest
import torch

from modeling_corinfomax.training import (
    TimeBudget,
    TrainerState,
    make_lr_lambda,
    make_optimizer,
    make_scheduler,
    peak_learning_rate,
    planned_steps,
)


def test_trainer_state_round_trips_through_json_and_ignores_unknown_keys():
    state = TrainerState(global_step=7, epoch=1, history=[{"step": 5, "loss": 1.5}], best={"step": 5})
    restored = TrainerState.from_dict({**json.loads(json.dumps(state.to_dict())), "from_a_newer_version": 1})
    assert restored == state


def test_the_learning_rate_scales_linearly_with_the_global_batch():
    assert peak_learning_rate(0.5, 512, 256) == 1.0 and peak_learning_rate(0.5, 64, 256) == 0.125


def test_warm_up_then_cosine_ends_at_min_lr_on_the_last_step_and_resumes_where_it_was():
    factor = make_lr_lambda(warmup_steps=4, total_steps=20, peak_lr=2.0, start_lr=0.2, min_lr=0.02)
    lrs = [2.0 * factor(step) for step in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.65, 1.1, 1.55, 2.0])
    assert lrs[-1] == pytest.approx(0.02) and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    resumed = make_scheduler(optimizer, factor, done_steps=10, peak_lr=2.0)  # a run resumed at step 10
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[10])
    optimizer.step()
    resumed.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[11])


def test_planned_steps_explicit_lengths_win_and_small_data_gets_min_steps():
    def steps(max_steps=None, epochs=8, given=False, per_epoch=93, budget=False, min_steps=700):
        return planned_steps(max_steps, epochs, given, per_epoch, budget, min_steps)

    assert steps() == 744 and steps(per_epoch=15) == 700
    assert steps(epochs=2, given=True, per_epoch=15) == 30 and steps(max_steps=5) == 5
    assert steps(budget=True) is None and steps(budget=True, epochs=3, given=True) == 279  # a cap


def test_the_time_budget_leaves_its_reserve_refits_on_the_mean_step_time_and_respects_a_cap(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr("modeling_corinfomax.training.time.time", lambda: now["t"])
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t)

    def run(budget, steps, step_seconds):
        fits = {}
        for step in range(1, steps + 1):
            now["t"] += step_seconds(step)
            fitted = budget.fit(step, accelerator)
            if fitted is not None:
                fits[step] = fitted
        return fits

    # 1 s/step, then 2 s/step from step 30 on; the clock started 10 s before step 1, 5 s are reserved.
    budget = TimeBudget(minutes=2.0, started=-10.0, cap=None, reserve_seconds=lambda step_time: 5.0)
    fits = run(budget, 60, lambda step: 1.0 if step < 30 else 2.0)
    # Step 23 (t=23, 20 timed steps of 1 s): 120 - 33 - 5 = 82 more -> 105. The next fit is a quarter of the
    # remaining 82 steps later, at step 43 (t = 29 + 14*2 = 57; mean (57 - 3) / 40 = 1.35 s/step):
    # (120 - 67 - 5) // 1.35 = 35 more -> 78; then at 43 + 20 = 63, past the 60 steps run here.
    assert fits == {23: 105, 43: 78}
    capped = TimeBudget(minutes=2.0, started=-10.0, cap=30, reserve_seconds=lambda step_time: 5.0)
    now["t"] = 0.0
    assert run(capped, 40, lambda step: 1.0) == {23: 30}  # capped; no refit within the last 20 steps


def test_sgd_is_the_papers_plain_momentum_sgd_and_decay_skips_norms_and_biases():
    import torch  # noqa: PLC0415

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
    optimizer = make_optimizer(model, "sgd", 0.1, 0.9, 1e-4, exclude_bias_and_norm=True)
    assert (
        type(optimizer) is torch.optim.SGD and not optimizer.defaults["nesterov"]
    )  # timm's "sgd" is Nesterov
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 1e-4 and decay[id(model[1].weight)] == decay[id(model[1].bias)] == 0
    # Two steps against the update rule written out: v <- 0.9 v + g + wd w; w <- w - lr v.
    weight, grad = model[0].weight, torch.randn_like(model[0].weight)
    w, v = weight.detach().clone(), torch.zeros_like(weight)
    for _ in range(2):
        weight.grad = grad.clone()
        optimizer.step()
        v = 0.9 * v + grad + 1e-4 * w
        w = w - 0.1 * v
    assert torch.allclose(weight.detach(), w, atol=1e-7)
    assert type(make_optimizer(model, "lars", 0.1, 0.9, 1e-4, True)).__name__ == "Lars"
