"""What every command shares: one negation style, defaults in `--help`, and one-line `error:` exits for a
bad flag (`OneLineErrorParser`) and for a problem found while running (`exits_on_error`)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from modeling_corinfomax.errors import CorInfoMaxError, Interrupted, error_message

P = ParamSpec("P")
R = TypeVar("R")


class BooleanFlag(argparse.BooleanOptionalAction):
    """A switch `--x` with both negations: `--no_x` (transformers' `HfArgumentParser`, finetune.py) and
    `--no-x` (argparse's), so one spelling works in every command."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.option_strings += [f"--no_{option[2:]}" for option in option_strings if option.startswith("--")]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, not option_string.startswith(("--no-", "--no_")))


def add_dataset_flags(group, label_help: str = "default: the ClassLabel column, if there is one") -> None:
    """`--dataset_name`, `--dataset_config_name` and the columns, the same in every command that reads a
    `datasets` corpus (the HF examples' `--image_column_name` / `--label_column_name` are accepted too). No
    default is given here: the parser's own applies (None, or train.py's SUPPRESS that lets presets tell
    what was set)."""
    group.add_argument("--dataset_name", help="a Hub dataset id or anything `load_dataset` takes")
    group.add_argument("--dataset_config_name")
    group.add_argument("--image_column", "--image_column_name", dest="image_column",
                       help="default: the Image column, if there is one")  # fmt: skip
    group.add_argument("--label_column", "--label_column_name", dest="label_column", help=label_help)


def add_host_memory_flag(group, default: bool | None = True) -> None:
    """`--reuse_host_memory` (`hardware.reuse_host_memory`), the same in every command that runs a model."""
    group.add_argument(
        "--reuse_host_memory",
        action=BooleanFlag,
        **({} if default is None else {"default": default}),
        help="on a CPU under Linux (glibc): keep the memory freed by a batch for the next one instead of "
        "returning each large activation to the kernel and faulting it in again (training: 1.2-1.3x per "
        "step at batch 512; embedding: 1.3x at 224 px; peak RSS about 25%% higher); "
        "--no-reuse_host_memory for the system's default",
    )


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the problem and where to look), not usage + error."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""


def exits_on_error(main: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command's `main` so that a problem the user can fix (a `CorInfoMaxError`, also one re-raised
    from a DataLoader worker) or a second stop signal (`Interrupted`) ends it with one `error: ...` line and
    exit status 1, instead of a traceback. Other exceptions (bugs) keep theirs.

        @exits_on_error
        def main(argv: list[str] | None = None) -> dict: ...
    """

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except (CorInfoMaxError, Interrupted) as error:
            message = error_message(error)
        # Raised outside the handler, so that the error's traceback (and a failed DataLoader it holds, with
        # its workers) is freed now rather than kept alive by the exit.
        raise SystemExit(f"error: {message}")

    return run
