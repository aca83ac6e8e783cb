#!/usr/bin/env python
"""Fine-tune a CorInfoMax encoder with the transformers Trainer (checkout entry point of
`corinfomax-finetune`).

The code lives in `modeling_corinfomax/cli/finetune.py`; `python finetune.py --help` lists the flags.
"""

from modeling_corinfomax.cli.finetune import main

if __name__ == "__main__":
    main()
