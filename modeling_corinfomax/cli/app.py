"""Serve the retrieval app: drop an image, see the bank images nearest to it (cosine similarity of the
model's features, `pooler_output`) and where it falls on the bank's 2-D map.

    corinfomax-app MODEL --bank FOLDER_OR_PARQUET [--k 8] [--host 127.0.0.1] [--port 7860] [--share]

MODEL is a CorInfoMax save_pretrained folder or Hub id. The bank is a folder of images (class sub-folders
give labels), embedded at start, or the parquet file `corinfomax-embed` wrote (its `path` column names
the images, which must still be there). The app's search is also an API: `gradio_client.Client(URL)
.predict(handle_file(IMAGE), api_name="/search")`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from modeling_corinfomax.cli.flags import BooleanFlag, HelpFormatter, OneLineErrorParser, exits_on_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="corinfomax-app", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("model_name_or_path", metavar="MODEL", help="a CorInfoMax folder or Hub id")
    parser.add_argument(
        "--bank", required=True, help="a folder of images, or the parquet file written by corinfomax-embed"
    )
    parser.add_argument("--k", type=int, default=8, help="how many neighbours to show")
    parser.add_argument("--revision", help="the model's Hub revision (branch, tag or commit)")
    parser.add_argument(
        "--trust_remote_code",
        action=BooleanFlag,
        default=False,
        help="load a model whose code lives in its repo (not needed with this package installed)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch when embedding the bank")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cuda, cuda:1, mps, ...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--share", action=BooleanFlag, default=False, help="also serve on a public gradio.live link"
    )
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    return args


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    logging.getLogger("modeling_corinfomax").setLevel(logging.INFO)  # the bank's progress, not httpx's calls
    # gradio reads this at import: the app sends no usage statistics unless the user asks for them.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from modeling_corinfomax.app import build_app  # noqa: PLC0415  (gradio and torch: after --help)

    demo = build_app(
        args.model_name_or_path,
        args.bank,
        k=args.k,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        device=args.device,
        batch_size=args.batch_size,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
