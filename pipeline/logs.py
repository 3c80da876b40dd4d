"""Logging for runs: INFO lines on the console (through the rich Console the progress bars use, so the
two do not garble each other), everything (DEBUG, tracebacks, warnings) in `<artifacts>/<recipe>/run.log`.

Stage code logs through `ctx.log` (the logger `stages.<stage name>`); library code through
`logging.getLogger(__name__)`.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.progress import console

OURS = ("pipeline", "stages")
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _ConsoleHandler(logging.Handler):
    """One line per record on the shared rich Console; tracebacks stay in run.log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            name = record.name.removeprefix("pipeline.")
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            style = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}.get(record.levelno)
            console.print(f"{name}: {level}{message}", markup=False, highlight=False, soft_wrap=True, style=style)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def setup_console(quiet: bool = False) -> None:
    """Console logging for this process; `quiet` (non-main ranks) shows warnings only."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    handler = _ConsoleHandler(level=logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in OURS:  # our own DEBUG records reach run.log; other libraries' stay out
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.captureWarnings(True)


def attach_run_log(path: Path) -> logging.Handler:
    """Append every record from now on to `path` (the caller detaches it at the end of the run)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def detach(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
