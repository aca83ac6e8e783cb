#!/usr/bin/env python
"""One row of the demo study: train the bundled demo with some flags, then score it independently.

Runs `accelerate launch train.py <flags> --no-eval_baselines --output_dir <dir>` exactly as a user would
(`common.user_launch`), then `bench/independent_eval.py <dir> --encoders pretrained --bank_per_class 1000`
(full Fashion-MNIST test set; its own kNN and L-BFGS probe), and appends one JSON line (flags, wall time,
steps, kNN, linear) to `bench/results/demo_study.jsonl`. The baselines depend only on the architecture and
the image size, so they are scored once: `python bench/independent_eval.py <dir> --bank_per_class 1000`.

    python bench/demo_study.py batch128_e8 -- --total_batch_size 128 --num_train_epochs 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import RESULTS_DIR, ROOT, user_launch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="the row's name; the model goes to bench/results/demo_study/<name>")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="train.py flags after --")
    args = p.parse_args()
    flags = [f for f in args.flags if f != "--"]
    out = RESULTS_DIR / "demo_study" / args.name
    if out.exists():
        sys.exit(f"{out} exists: pick another name or move it away (the study never overwrites a row).")
    start = time.perf_counter()
    user_launch([*flags, "--no-eval_baselines", "--output_dir", str(out)])
    train_minutes = (time.perf_counter() - start) / 60
    scores = out / "independent_eval.json"
    command = [sys.executable, str(ROOT / "bench" / "independent_eval.py"), str(out), "--encoders", "pretrained",
               "--bank_per_class", "1000", "--output", str(scores)]  # fmt: skip
    subprocess.run(command, check=True)
    result = json.loads(scores.read_text())
    log = json.loads((out / "training_log.json").read_text())
    row = {
        "name": args.name,
        "flags": flags,
        "train_minutes": round(train_minutes, 2),
        "steps": log[-1]["step"],
        "independent": result,
    }
    with (RESULTS_DIR / "demo_study.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
