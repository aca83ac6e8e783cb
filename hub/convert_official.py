#!/usr/bin/env python
"""Convert an official CorInfoMax checkpoint (checkout entry point of `corinfomax-convert-official`).

The code lives in `modeling_corinfomax/cli/convert_official.py`; `python hub/convert_official.py --help`
lists the flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one

from modeling_corinfomax.cli.convert_official import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
