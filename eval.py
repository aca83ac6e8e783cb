#!/usr/bin/env python
"""Evaluate a CorInfoMax encoder (checkout entry point of `corinfomax-eval`).

The code lives in `modeling_corinfomax/cli/eval.py`; `python eval.py --help` lists the flags.
"""

from modeling_corinfomax.cli.eval import main

if __name__ == "__main__":
    main()
