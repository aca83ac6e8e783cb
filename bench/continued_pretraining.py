#!/usr/bin/env python
"""Does continuing from a trained encoder beat starting from scratch, for the same training budget?

For each image folder (train/ and test/ class sub-folders, e.g. `bench/small_folder.py --build_only`), two runs
of `accelerate launch train.py --train_dir FOLDER/train` with the same number of steps and every other flag
left to train.py: one from scratch with the source's backbone (`--backbone`), one from the source
(`--model_name_or_path SOURCE`). Both saved encoders are then scored by `bench/independent_eval.py`, which
shares no code with the training run (its own kNN and logistic regression on the folder's train/ bank and
test/ images).

    python bench/continued_pretraining.py --source outputs/corinfomax-demo \\
        --folders /tmp/folders/textures /tmp/folders/fashion4k --steps 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, print_table, user_launch, write_json


def train(source: Path, folder: Path, mode: str, steps: int, out: Path, extra: list[str]) -> float:
    """One run; returns its wall time in seconds."""
    config = json.loads((source / "config.json").read_text())
    start = (
        ["--model_name_or_path", str(source)] if mode == "continued" else ["--backbone", config["backbone"]]
    )
    flags = ["--train_dir", str(folder / "train"), *start, "--max_train_steps", str(steps), "--no-do_eval",
             "--output_dir", str(out), *extra]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        user_launch(flags, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - began


def independent_scores(model: Path, folder: Path) -> dict:
    """bench/independent_eval.py's kNN and linear top-1 of the saved encoder."""
    output = model / "independent_eval.json"
    command = [sys.executable, str(ROOT / "bench" / "independent_eval.py"), str(model), "--folder", str(folder),
               "--encoders", "pretrained", "--output", str(output)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(output.read_text())["pretrained"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source", type=Path, required=True, help="a trained CorInfoMax folder (train.py's output)"
    )
    p.add_argument(
        "--folders", type=Path, nargs="+", required=True, help="image folders with train/ and test/"
    )
    p.add_argument("--steps", type=int, default=300, help="the budget of both runs, in steps")
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/continued_pretraining"))
    p.add_argument("--output", help="JSON path (default bench/results/continued_pretraining.json)")
    p.add_argument("train_flags", nargs="*", help="more train.py flags for both runs (after --)")
    args = p.parse_args()
    rows = []
    for folder in args.folders:
        for mode in ("scratch", "continued"):
            out = args.work_dir / f"{folder.name}_{mode}"
            seconds = train(args.source, folder, mode, args.steps, out, args.train_flags)
            scores = independent_scores(out, folder)
            trained = json.loads((out / "training_args.json").read_text())
            rows.append({"folder": folder.name, "start": mode, "steps": args.steps, "image_size": trained["image_size"],
                         "kNN": scores["knn_top1"], "linear": scores["linear_top1"], "train_s": round(seconds)})  # fmt: skip
            print(rows[-1], flush=True)
    print_table(rows, ["folder", "start", "steps", "image_size", "kNN", "linear", "train_s"],
                f"continued pretraining from {args.source} against scratch (independent evaluation)")  # fmt: skip
    write_json("continued_pretraining", {"source": str(args.source), "rows": rows}, args.output)


if __name__ == "__main__":
    main()
