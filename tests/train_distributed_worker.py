"""Launched by tests/test_train.py with `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=1).

Builds the training data and model exactly as train.py does, runs one step on 2 processes, checks that
the ranks see disjoint images, that the loss is the global-batch loss and that parameters and the loss
state stay identical; rank 0 writes <out>/report.json. Then runs train.main() for 2 steps into <out>/run;
each rank writes what it returned to <out>/results_rank<N>.json.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_corinfomax import CorInfoMaxForPreTraining, CorInfoMaxLoss  # noqa: E402
from modeling_corinfomax.cli import train  # noqa: E402
from modeling_corinfomax.data import BatchViewAugment  # noqa: E402

SMALL = [
    "--max_train_samples",
    "256",
    "--per_device_train_batch_size",
    "16",
    "--projector_dims",
    "64",
    "64",
    "16",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
    "--no-do_eval",
    # One AcceleratorState per process: the same precision as the Accelerator built below.
    "--mixed_precision",
    "no",
]


def main() -> None:
    out_dir = Path(sys.argv[1])
    args = train.parse_args(SMALL)
    accelerator = Accelerator(cpu=True)
    rows, sampler, loader, _, _ = train.build_dataloaders(args, accelerator)
    torch.manual_seed(0)
    model = CorInfoMaxForPreTraining(args.model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batch = next(iter(loader))
    indices = accelerator.gather(batch["index"]).tolist()
    augment = [
        BatchViewAugment(v, args.image_mean, args.image_std)
        for v in (args.two_view_augmentation.view1, args.two_view_augmentation.view2)
    ]
    generator = torch.Generator().manual_seed(accelerator.process_index)
    v1, v2 = augment[0](batch["view1"], generator), augment[1](batch["view2"], generator)
    out = model(pixel_values=v1, pixel_values_2=v2)
    # The same loss computed by one process on the concatenated projections of both ranks.
    z1, z2 = accelerator.gather(out.projections.detach()), accelerator.gather(out.projections_2.detach())
    cfg = args.model_config
    reference = CorInfoMaxLoss(
        cfg.embedding_dim,
        cfg.alpha,
        cfg.lambda_R,
        cfg.lambda_mu,
        cfg.R_init,
        cfg.eps,
        cfg.normalize,
        gather_distributed=False,
    )(z1.double(), z2.double()).loss
    losses = accelerator.gather(out.loss.detach().reshape(1))
    accelerator.backward(out.loss)
    optimizer.step()
    unwrapped = accelerator.unwrap_model(model)
    flat = torch.cat([p.detach().flatten() for p in unwrapped.parameters()])
    flats = accelerator.gather(flat.unsqueeze(0))
    states = accelerator.gather(unwrapped.loss_fn.R1.reshape(1, -1))
    report = {
        "world_size": accelerator.num_processes,
        "indices_per_rank": len(batch["index"]),
        "overlap": len(indices) - len(set(indices)),
        "loss_rel_err": abs(out.loss.item() - reference.item()) / abs(reference.item()),
        "loss_equal_across_ranks": bool(losses[0] == losses[1]),
        "params_identical": bool(torch.equal(flats[0], flats[1])),
        "state_identical": bool(torch.equal(states[0], states[1])),
    }
    if accelerator.is_main_process:
        (out_dir / "report.json").write_text(json.dumps(report))
    results = train.main([*SMALL, "--max_train_steps", "2", "--output_dir", str(out_dir / "run")])
    (out_dir / f"results_rank{accelerator.process_index}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
