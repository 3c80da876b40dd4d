"""SIGINT and SIGTERM during a run: one owner (the runner), one rule.

The runner owns both signals for the length of a run (`owned()`, around every stage in `stage()`).
What the first signal does depends on what the main thread is doing:

- a training loop (inside `stop_at_safe_points()`), or the runner committing a finished stage: it
  only asks to stop. The loop sees the request (`requested()`, `Checkpointer.stop_requested`) after
  its step, saves a checkpoint and raises StageInterrupted; a re-run resumes there. A loop that finishes
  first leaves the request waiting until its stage ends, since what follows a loop is saving what it
  trained; the runner then stops.
- anything else (generating traces, evaluating, PTQ, planning): what it was doing is lost either way,
  so it stops at once, by raising `Stopped` wherever the main thread is. Nothing half-done can look
  complete: a stage is written in `.partial/` and renamed into place only when whole.

A second signal always stops at once. `Stopped` derives from BaseException, like KeyboardInterrupt,
so that the `except Exception` of stage code does not swallow it. The CLI exits with 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process a signal ended.

Only the main thread can receive signals in Python: elsewhere (a run started from another thread)
`owned()` leaves the handlers as they are.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_previous: dict[int, object] | None = None
"""The handlers `owned()` replaced, while it owns the signals."""
_requested: int | None = None
"""The first signal received while owned."""
_deferred = False
"""A training loop of the current stage polls `requested()`: a first signal is a request."""


class Stopped(BaseException):
    """A signal stopped the run where it was."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal that asked the run to stop, if one did."""
    return _requested


def _handle(signum: int, frame) -> None:  # noqa: ARG001
    global _requested
    first = _requested is None
    if first:
        _requested = signum
    # said at once, in the run's log: a step may take minutes, and a second signal would lose the checkpoint
    if first and _deferred:
        log.warning(
            "%s: stopping at the next safe point (after this training step, with a checkpoint, or at "
            "the end of this stage); send it again to stop at once",
            signal_name(signum),
        )
        return
    log.warning("%s: stopping now", signal_name(signum))
    raise Stopped(signum)


@contextmanager
def owned() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as the module docstring says, inside this block (nested blocks share the
    outermost one's handlers); the previous handlers come back at its end."""
    global _previous, _requested, _deferred
    if _previous is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested, _deferred = None, False
    _previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in _previous.items():
            signal.signal(sig, handler)
        _previous, _requested, _deferred = None, None, False


@contextmanager
def stage() -> Iterator[None]:
    """One stage's run: signals stop it at once, unless a training loop in it says otherwise."""
    global _deferred
    _deferred = False
    try:
        yield
    finally:
        _deferred = False


@contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Code that checks `requested()` at its safe points (a training loop, after every step; the runner's
    commit of a stage, at its end): from here to the end of the stage, a first signal is a request.
    Leaving the block does not undo that: what follows a training loop is saving what it trained."""
    global _deferred
    _deferred = True
    yield
