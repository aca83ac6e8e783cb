"""Worker for `tests/test_loss.py::test_two_processes_match_one_process`; run it under
`torchrun --standalone --nproc_per_node 2 tests/loss_distributed_worker.py OUT_DIR`.

Every rank builds the same float64 global batches, feeds its own slice through `CorInfoMaxLoss` (which
all-gathers), and compares with a single-process loss on the whole batch computed locally:
loss values, the running state, input gradients (which are world_size x the single-process slice by
design) and the parameter gradients of a small `nn.Linear` wrapped in DDP. Writes
`OUT_DIR/rank{r}.json` with the maximum relative errors.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modeling_corinfomax import CorInfoMaxLoss, gather_with_grad

STEPS, IN_DIM, DIM = 5, 6, 8
# Per-step (rank 0, rank 1) batch sizes; the uneven ones exercise the padded all-gather.
SPLITS = [(12, 12), (12, 12), (12, 12), (13, 11), (9, 15)]
LOSS_KWARGS = dict(alpha=25.0, lambda_R=0.3, lambda_mu=0.2, eps=1e-8)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach() - expected.detach()).abs().max() / expected.detach().abs().max()).item()


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 2, world_size

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(IN_DIM, IN_DIM, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(STEPS):
        x1 = torch.randn(sum(SPLITS[0]), IN_DIM, generator=g, dtype=torch.float64) @ mix + 0.2
        batches.append((x1, x1 + 0.3 * torch.randn(x1.shape, generator=g, dtype=torch.float64)))

    torch.manual_seed(1)
    single_linear = nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    ddp_linear = DistributedDataParallel(copy.deepcopy(single_linear))
    single_opt = torch.optim.SGD(single_linear.parameters(), lr=0.05)
    ddp_opt = torch.optim.SGD(ddp_linear.parameters(), lr=0.05)

    # Three losses per rank: distributed on raw inputs, distributed behind DDP, and the single-process
    # reference on the full batch (no gather). The first two see the same inputs as the reference.
    dist_loss = CorInfoMaxLoss(IN_DIM, **LOSS_KWARGS)
    single_raw_loss = CorInfoMaxLoss(IN_DIM, **LOSS_KWARGS, gather_distributed=False)
    ddp_loss = CorInfoMaxLoss(DIM, **LOSS_KWARGS)
    single_loss = CorInfoMaxLoss(DIM, **LOSS_KWARGS, gather_distributed=False)

    errors = {
        k: 0.0 for k in ("loss", "state", "input_grad", "ddp_loss", "ddp_state", "param_grad", "params")
    }
    global_sizes = []
    for step, (x1, x2) in enumerate(batches):
        sizes = SPLITS[step]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])

        # 1. Raw inputs (z = x, D = IN_DIM), each rank feeds its slice.
        full1, full2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        ref = single_raw_loss(full1, full2)
        ref.loss.backward()
        part1, part2 = x1[lo:hi].clone().requires_grad_(), x2[lo:hi].clone().requires_grad_()
        global_sizes.append(int(gather_with_grad(part1.detach()).shape[0]))
        out = dist_loss(part1, part2)
        out.loss.backward()
        errors["loss"] = max(
            errors["loss"], rel_err(out.loss, ref.loss), rel_err(out.covariance_loss, ref.covariance_loss)
        )
        errors["state"] = max(
            errors["state"],
            *(
                rel_err(getattr(dist_loss, k), getattr(single_raw_loss, k))
                for k in ("R1", "R2", "mu1", "mu2")
            ),
        )
        # Designed semantics: the input gradient is world_size x the single-process gradient slice.
        errors["input_grad"] = max(
            errors["input_grad"],
            rel_err(part1.grad / world_size, full1.grad[lo:hi]),
            rel_err(part2.grad / world_size, full2.grad[lo:hi]),
        )

        # 2. A Linear in DDP in front of the loss vs the same Linear on the whole batch in one process.
        ref = single_loss(single_linear(x1), single_linear(x2))
        ref.loss.backward()
        out = ddp_loss(ddp_linear(x1[lo:hi]), ddp_linear(x2[lo:hi]))
        out.loss.backward()
        errors["ddp_loss"] = max(errors["ddp_loss"], rel_err(out.loss, ref.loss))
        errors["ddp_state"] = max(
            errors["ddp_state"],
            *(rel_err(getattr(ddp_loss, k), getattr(single_loss, k)) for k in ("R1", "R2", "mu1", "mu2")),
        )
        for p_ddp, p_single in zip(ddp_linear.module.parameters(), single_linear.parameters()):
            errors["param_grad"] = max(errors["param_grad"], rel_err(p_ddp.grad, p_single.grad))
        ddp_opt.step()
        single_opt.step()
        ddp_opt.zero_grad()
        single_opt.zero_grad()
        for p_ddp, p_single in zip(ddp_linear.module.parameters(), single_linear.parameters()):
            errors["params"] = max(errors["params"], rel_err(p_ddp, p_single))

    report = {
        "rank": rank,
        "world_size": world_size,
        "backend": dist.get_backend(),
        "steps": int(dist_loss.num_updates),
        "global_batch_sizes": global_sizes,
        "errors": errors,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
