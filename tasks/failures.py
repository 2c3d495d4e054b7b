"""Expected failures without tracebacks, in the terminal and in the Prefect API."""

from __future__ import annotations

import logging

from tapeline.errors import TapelineError


class _WithoutTraceback(logging.Filter):
    """Drops the traceback from a log record of a TapelineError: its message says all the user needs.

    Any other exception keeps its traceback: that one is a bug to report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TapelineError):
            record.exc_info = record.exc_text = None
        return True


# Where Prefect logs a failed task run, a failed flow run, and a deployment's run that raised.
PREFECT_FAILURE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")
_WITHOUT_TRACEBACK = _WithoutTraceback()


def log_expected_failures_without_traceback() -> None:
    """Prefect logs every failure with its traceback, in the terminal and in its API; keep that for bugs only."""
    for name in PREFECT_FAILURE_LOGGERS:
        logging.getLogger(name).addFilter(_WITHOUT_TRACEBACK)  # the same filter twice is a no-op
