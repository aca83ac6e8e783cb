#!/usr/bin/env python
"""Embed a folder, dataset or stream with a pretrained encoder (checkout entry point of `corinfomax-embed`).

The code lives in `modeling_corinfomax/cli/embed.py`; `python embed.py --help` lists the flags.
"""

from modeling_corinfomax.cli.embed import main

if __name__ == "__main__":
    main()
