#!/usr/bin/env python
"""Pretrain CorInfoMax (checkout entry point of `corinfomax-train`; `accelerate launch train.py ...`).

The code lives in `modeling_corinfomax/cli/train.py`; `accelerate launch -m modeling_corinfomax.cli.train` is
the same command from an installed wheel. `python train.py --help` lists the flags.
"""

from modeling_corinfomax.cli.train import main

if __name__ == "__main__":
    main()
