"""The errors a user can fix, each reported as one line naming the remedy (exit status 2).

``ExperimentError`` is the base; ``CLIError`` (a bad flag), ``CheckpointError`` (no usable or a
mismatching checkpoint) and the data loaders' ``DataUnavailableError`` are what the runner turns
into one stderr line instead of a traceback (:func:`experiments.cli.run_main`).
"""

from __future__ import annotations

from experiments.data import DataUnavailableError

__all__ = ["ExperimentError", "HarnessError", "CLIError", "CheckpointError", "DataUnavailableError",
           "one_line"]


class ExperimentError(RuntimeError):
    """An error the user can fix (bad flag, missing data, unusable checkpoint): one line, exit 2."""


HarnessError = ExperimentError  # the name before the experiment suite was split up


class CLIError(ExperimentError):
    """A bad command-line flag."""


class CheckpointError(ExperimentError):
    """No usable checkpoint, or a checkpoint written by a different configuration."""


def one_line(text: object) -> str:
    """``text`` squeezed onto one line (newlines and runs of spaces become single spaces)."""
    return " ".join(str(text).split())
