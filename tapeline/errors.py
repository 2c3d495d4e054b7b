"""What can go wrong that a user can act on: each error's message is one line, fit for a terminal."""

from __future__ import annotations


class TapelineError(Exception):
    """An error the user can act on; its message is one line, fit for a terminal."""


class ConfigError(TapelineError, ValueError):
    """A run parameter is invalid."""


class CorruptFileError(TapelineError):
    """A file is there but cannot be read: truncated or corrupt."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or Ctrl-C, raised in the main thread (tapeline/cli.py): a KeyboardInterrupt, so everything that
    unwinds on Ctrl-C (Prefect's crash report, `finally`, context managers) unwinds on SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class NonFiniteError(TapelineError):
    """Training produced a NaN or Inf; `trained` (a TrainedModel) says where that step's gradients are."""

    def __init__(self, message: str, trained):
        super().__init__(message)
        self.trained = trained

    def __reduce__(self):  # Prefect may pickle a task's exception with its state
        return type(self), (str(self), self.trained)
