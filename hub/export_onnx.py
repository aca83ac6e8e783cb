#!/usr/bin/env python
"""Export a model's encoder to ONNX (checkout entry point of `corinfomax-export-onnx`).

The code lives in `modeling_corinfomax/cli/export_onnx.py`; `python hub/export_onnx.py --help` lists the flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one

from modeling_corinfomax.cli.export_onnx import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
