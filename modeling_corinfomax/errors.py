"""The package's exceptions: library code raises these; only `cli/` turns them into a one-line `error:` exit.

CorInfoMaxError          any problem the user can fix; the message names the fix
├── ConfigurationError   settings that do not fit together or do not fit the machine
├── DataError            a dataset that cannot serve (also a `ValueError`)
├── CheckpointError      an output folder or checkpoint that cannot be used or written
├── TrainingFault        a numerical fault that ended a run (its last good step is checkpointed)
└── PublishError         an upload refused or failed (also a `RuntimeError`); the saved model is intact

Interrupted, a `KeyboardInterrupt` (so that no `except Exception` on the way swallows it): a second stop
signal ends the run at once, without saving.
"""

from __future__ import annotations


class CorInfoMaxError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigurationError(CorInfoMaxError, ValueError):
    """Settings that do not fit together, or do not fit this machine or launcher."""


class DataError(CorInfoMaxError, ValueError):
    """A dataset problem, reported before (or instead of) a stack trace from a DataLoader worker."""


class CheckpointError(CorInfoMaxError):
    """An output folder or checkpoint that cannot be used, or a save that failed."""


class TrainingFault(CorInfoMaxError):
    """A numerical fault that ended a run after its last good step was checkpointed; the message holds
    the advice."""


class PublishError(CorInfoMaxError, RuntimeError):
    """A model that could not be published (a token in a file, a failed upload); nothing saved is lost."""


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM while the run was stopping cleanly: it ends at once, without saving."""


def error_message(error: BaseException) -> str:
    """The one-line message of an error, also of a `DataError` raised in a DataLoader worker (which the
    DataLoader re-raises with the worker's whole traceback as its message)."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text
