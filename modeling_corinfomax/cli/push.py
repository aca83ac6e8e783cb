"""Publish a CorInfoMax checkpoint to the Hugging Face Hub as two repos.

    python hub/push.py <checkpoint> --repo_id org/name [--backbone_repo_id org/name-timm] [--private]
                       [--revision BRANCH] [--onnx] [--space org/name-demo --space_bank FOLDER]
                       [--dry_run DIR] [--token ...]

`org/name` gets the full model (backbone, projector, loss state; transformers with remote code),
`org/name-timm` the backbone alone in timm format. The model cards carry the run's `training_args.json`,
`eval_results.json` and `training.png` when the checkpoint folder has them; with `--onnx` the full model's
repo also gets the encoder as `onnx/model.onnx` (`pip install 'corinfomax[onnx]'`). With `--space`, a
gradio Space next to them serves the model as the retrieval app (`corinfomax-app`) on a copy of the
`--space_bank` images (at most 200; `pip install 'corinfomax[app]'`). The token comes from
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
from modeling_corinfomax.export.space import MAX_BANK_IMAGES, bank_images, publish_space


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
        "--onnx",
        action=BooleanFlag,
        default=False,
        help="also upload the encoder as onnx/model.onnx (pixel_values -> embedding, dynamic batch)",
    )
    parser.add_argument(
        "--space", metavar="ORG/NAME", help="also publish the retrieval app on the model as this gradio Space"
    )
    parser.add_argument(
        "--space_bank",
        metavar="FOLDER",
        help=f"the Space's images to search (at most {MAX_BANK_IMAGES} copied)",
    )
    parser.add_argument(
        "--dry_run",
        metavar="DIR",
        help="write the repo folders (and the Space's) to DIR instead of uploading",
    )
    parser.add_argument(
        "--token",
        "--hub_token",
        dest="token",
        help="Hub token with write access (default: $HF_TOKEN or the stored login)",
    )
    args = parser.parse_args(argv)
    if (args.space is None) != (args.space_bank is None):
        parser.error("--space and --space_bank go together: the Space's name and the images it searches")
    return args


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} is not a folder; pass a save_pretrained folder."
        )
    if args.space:
        bank_images(args.space_bank)  # a bad bank is said before the model is uploaded
    result = publish(
        args.checkpoint,
        args.repo_id,
        backbone_repo_id=args.backbone_repo_id,
        private=args.private,
        token=args.token or os.environ.get("HF_TOKEN"),
        dry_run_dir=args.dry_run,
        revision=args.revision,
        commit_message=args.commit_message,
        onnx=args.onnx,
    )
    if args.space:
        result |= publish_space(
            args.space,
            args.repo_id,
            args.space_bank,
            private=args.private,
            token=args.token or os.environ.get("HF_TOKEN"),
            dry_run_dir=args.dry_run,
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
