"""Publish a CorInfoMax checkpoint to the Hugging Face Hub as two repos.

    python hub/push.py <checkpoint> --repo_id org/name [--backbone_repo_id org/name-timm] [--private]
                       [--revision BRANCH] [--dry_run DIR] [--token ...]

`org/name` gets the full model (backbone, projector, loss state; transformers with remote code),
`org/name-timm` the backbone alone in timm format. The model cards carry the run's `training_args.json`,
`eval_results.json` and `training.png` when the checkpoint folder has them. The token comes from
`--token`, else `HF_TOKEN`, else the stored `hf auth login`; prefer the environment variable, since a
command line is visible to other users of the machine. It is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from modeling_corinfomax.cli.flags import BooleanFlag, HelpFormatter, exits_on_error
from modeling_corinfomax.errors import CheckpointError
from modeling_corinfomax.export import publish


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="a CorInfoMax save_pretrained folder (train.py's --output_dir)")
    parser.add_argument(
        "--repo_id", "--hub_model_id", dest="repo_id", required=True, help="org/name of the full model"
    )
    parser.add_argument(
        "--backbone_repo_id", help="org/name of the timm-format backbone (default: <repo_id>-timm)"
    )
    parser.add_argument(
        "--private",
        "--hub_private_repo",
        dest="private",
        action=BooleanFlag,
        default=False,
        help="create the repos as private",
    )
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--commit_message", default="Upload CorInfoMax checkpoint")
    parser.add_argument(
        "--dry_run", metavar="DIR", help="write the two repo folders to DIR instead of uploading"
    )
    parser.add_argument(
        "--token",
        "--hub_token",
        dest="token",
        help="Hub token with write access (default: $HF_TOKEN or the stored login)",
    )
    return parser.parse_args(argv)


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} is not a folder; pass a save_pretrained folder."
        )
    result = publish(
        args.checkpoint,
        args.repo_id,
        backbone_repo_id=args.backbone_repo_id,
        private=args.private,
        token=args.token or os.environ.get("HF_TOKEN"),
        dry_run_dir=args.dry_run,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
