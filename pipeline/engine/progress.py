"""Progress of long work, the one mechanism every stage uses: a rich bar on a terminal, log lines elsewhere.

    from pipeline.engine.progress import progress
    with progress("sft: train", total=steps, unit="step") as bar:
        for step in ...:
            bar.advance(1, tokens=n, loss=f"{loss:.3f}")

On a terminal the bar is live. When stderr is not one (nohup, slurm, CI) a line like

    sft: train: step 120/500, loss 0.4123, 3,210 tokens/s, 2m01s elapsed, ETA 6m24s

goes to the log every `REASONING_QAT_PROGRESS_EVERY` seconds (default 30; 0: at every advance) and once at
the end, so a piped run is never silent for long. Only the first process of a multi-process run reports;
`bar.advance` stays cheap either way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
log = logging.getLogger(__name__)

EVERY_ENV = "REASONING_QAT_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def is_main_process() -> bool:
    """Rank 0 of `accelerate launch` / torchrun (RANK), or of an accelerate state this process already made."""
    if os.environ.get("RANK", "0") != "0":
        return False
    state = sys.modules.get("accelerate.state")  # not imported: no accelerate process group here
    if state is not None and state.PartialState._shared_state:
        return state.PartialState().is_main_process
    return True


def log_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal."""
    return max(0.0, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)))


def duration(seconds: float) -> str:
    """3725 -> "1h02m05s", 65 -> "1m05s", 4.2 -> "4s"."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Bar:
    """Counts work done (`unit`s, and tokens for a rate) and shows it: on a rich display, or as log lines
    every `every` seconds, or (other ranks) not at all (`display` and `every` both None)."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str,
        done: int,
        display: Progress | None = None,
        every: float | None = None,
    ):
        self.description, self.total, self.unit, self.done = description, total, unit, done
        self._display, self._every = display, every
        self._task = display.add_task(description, total=total, completed=done, info="") if display else None
        self._first = done  # work resumed from a checkpoint does not count towards the rate
        self._start = self._last_line = time.perf_counter()
        self._logged = done
        self.tokens = 0
        self.fields: dict[str, object] = {}

    def advance(self, n: int = 1, tokens: int = 0, **fields: object) -> None:
        """`n` more units done, `tokens` more tokens processed; `fields` (name -> shown value) replace the last."""
        self.done += n
        self.tokens += tokens
        self.fields.update(fields)
        if self._display is not None:
            info = "  ".join(self._shown())
            self._display.update(self._task, advance=n, info=info)
        elif self._every is not None and time.perf_counter() - self._last_line >= self._every:
            self._line()

    def line(self) -> str:
        """The progress line: "<description>: <unit> done/total, fields, tokens/s, elapsed, ETA"."""
        elapsed = time.perf_counter() - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [f"{self.description}: {self.unit} {count}", *self._shown(), f"{duration(elapsed)} elapsed"]
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        if self.total is not None and self.done < self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def finish(self) -> None:
        """The closing line (log lines only), unless the last line already said it all."""
        if self._every is not None and self.done != self._logged:
            self._line()

    def _shown(self) -> list[str]:
        shown = [f"{k} {v}" for k, v in self.fields.items()]
        elapsed = time.perf_counter() - self._start
        if self.tokens and elapsed > 0:
            shown.append(f"{self.tokens / elapsed:,.0f} tokens/s")
        return shown

    def _line(self) -> None:
        self._last_line, self._logged = time.perf_counter(), self.done
        log.info("%s", self.line())


_open_line_bars = 0


def _lines(bar: Bar) -> Iterator[Bar]:
    """Log-line mode. A bar inside another (generation in a training step: held-out eval, rollouts) prints
    interval lines only: a closing line per evaluation or rollout would bury the training's own lines."""
    global _open_line_bars
    nested = _open_line_bars > 0
    _open_line_bars += 1
    try:
        yield bar
    finally:
        _open_line_bars -= 1
    if not nested:
        bar.finish()


@contextmanager
def progress(description: str, total: int | None, unit: str = "step", done: int = 0) -> Iterator[Bar]:
    """A Bar for `total` `unit`s of work, `done` of them already done (a resumed run)."""
    if not is_main_process():
        yield Bar(description, total, unit, done)
        return
    if not console.is_terminal:
        yield from _lines(Bar(description, total, unit, done, every=log_interval()))
        return
    display = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )
    with display:
        yield Bar(description, total, unit, done, display=display)
