"""Logging for runs: INFO lines on the console (through the rich Console the progress bars use, so the
two do not garble each other), everything (DEBUG, tracebacks, warnings) in `<artifacts>/<recipe>/run.log`.

Stage code logs through `ctx.log` (the logger `stages.<stage name>`); library code through
`logging.getLogger(__name__)`. Other libraries' chatter is off unless the CLI gets `--verbose`
(`quiet_libraries`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipeline.engine.progress import console

OURS = ("pipeline", "stages")
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _ConsoleHandler(logging.Handler):
    """One line per record on the shared rich Console; tracebacks stay in run.log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            # the engine's lines keep their short names (`progress: ...`, `runner: ...`): users grep for them
            name = record.name.removeprefix("pipeline.").removeprefix("engine.")
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            style = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}.get(record.levelno)
            console.print(f"{name}: {level}{message}", markup=False, highlight=False, soft_wrap=True, style=style)
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def format_number(value: float) -> str:
    """A metric as people read it: counts as integers (20,000, never 2e+04), large values without an exponent,
    the rest to 4 significant digits."""
    if float(value).is_integer() and abs(value) < 1e18:
        return f"{int(value):,}"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


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


# Switches the libraries read when they are imported (and that accelerate launch's processes inherit)
QUIET_ENV = {
    # its loguru lines: "No accelerator available!" (WARNING), a GPTQ METRIC line (level 38) per module; not
    # LLM_COMPRESSOR_LOG_DISABLED, which skips defining METRIC, and GPTQ then fails logging at it
    "LLM_COMPRESSOR_LOG_LEVEL": "ERROR",
    "TQDM_DISABLE": "1",  # tqdm's bars in processes this one starts without running the CLI (_no_tqdm_bars)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight loading / shard writing bars follow this one
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
QUIET_LOGGERS = ("torch.fx._symbolic_trace",)  # "is_fx_tracing will return true ..." at each llmcompressor trace


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_libraries(verbose: bool = False) -> None:
    """Silence third-party progress bars and info / warning lines (errors still show): our own progress lines
    say what is happening. `verbose` leaves every library as it sets itself up (and gives tqdm its bars back if
    an earlier call in this process took them)."""
    if verbose:
        _tqdm_bars_back()
        return
    user_tqdm = "TQDM_DISABLE" in os.environ
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # the user's own setting wins
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed ("Setting accelerator to CPU" on runs that never use it) sets its logger's level and handler when
    # imported; a filter on the logger outlives that
    deepspeed = logging.getLogger("DeepSpeed")
    if _errors_only not in deepspeed.filters:
        deepspeed.addFilter(_errors_only)
    if not user_tqdm:  # the user's own TQDM_DISABLE wins here too
        _no_tqdm_bars()
    _quiet_imported()


def _no_tqdm_bars() -> None:
    """Every tqdm bar of this process off, whatever its caller passes. TQDM_DISABLE alone misses them: tqdm
    reads it once, when imported, and torch imports tqdm before this runs (export's and eval's arguments import
    torch; so may an earlier call in the same process); and compressed-tensors passes `disable=False` itself
    ("Applying quantization config", "Dispatching model" when transformers loads an export), which the variable
    does not override. Transformers' own switch (disable_progress_bar) covers only the bars it draws through its
    logging module, not "Converting and de-quantizing GGUF tensors" nor "Compressing / Decompressing model"."""
    from tqdm import std

    init = std.tqdm.__init__
    if hasattr(init, "original"):  # already replaced (the CLI called twice in one process)
        return

    def quiet(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "disable": True})

    quiet.original = init
    std.tqdm.__init__ = quiet


def _tqdm_bars_back() -> None:
    """Undo _no_tqdm_bars (a --verbose call after a quiet one in the same process)."""
    import sys

    std = sys.modules.get("tqdm.std")
    if std is not None and hasattr(std.tqdm.__init__, "original"):
        std.tqdm.__init__ = std.tqdm.__init__.original


def _quiet_imported() -> None:
    """The same for libraries this process imported already (the CLI called in-process), whose import-time
    switches were read before."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "llmcompressor" in sys.modules:
        from loguru import logger

        logger.disable("llmcompressor")
