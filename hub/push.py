#!/usr/bin/env python
"""Publish a CorInfoMax checkpoint to the Hub (checkout entry point of `corinfomax-push`).

The code lives in `modeling_corinfomax/cli/push.py`; `python hub/push.py --help` lists the flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one

from modeling_corinfomax.cli.push import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
