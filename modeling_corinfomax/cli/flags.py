"""What every command's flags share: one negation style, defaults in `--help`, one-line errors."""

from __future__ import annotations

import argparse


class BooleanFlag(argparse.BooleanOptionalAction):
    """A switch `--x` with both negations: `--no_x` (transformers' `HfArgumentParser`, finetune.py) and
    `--no-x` (argparse's), so one spelling works in every command."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.option_strings += [f"--no_{option[2:]}" for option in option_strings if option.startswith("--")]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, not option_string.startswith(("--no-", "--no_")))


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the problem and where to look), not usage + error."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""
