"""Progress bars for long work: one rich display shared by every stage of a run.

    from pipeline.progress import progress
    with progress("sft: train", total=steps) as bar:
        for step in ...:
            bar.advance(1, loss=f"{loss:.3f}")

When the output is not a terminal (CI, a log file), and on every rank but the first of a
multi-process run, the bar prints nothing and the stage's own log lines carry the story;
`bar.advance` stays cheap either way.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)


class Bar:
    def __init__(self, display: Progress | None, task_id: int | None):
        self._display = display
        self._task_id = task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        if self._display is not None:
            info = "  ".join(f"{k}={v}" for k, v in fields.items())
            self._display.update(self._task_id, advance=n, info=info)


@contextmanager
def progress(description: str, total: float | None) -> Iterator[Bar]:
    if not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0":
        yield Bar(None, None)
        return
    display = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=True,
    )
    with display:
        task_id = display.add_task(description, total=total, info="")
        yield Bar(display, task_id)
