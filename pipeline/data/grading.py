"""Grading: is a completion's final answer equal to the gold answer? (math-verify, in worker processes)

    from pipeline.data.grading import grade, grade_many
    grade("<think>…</think> so the total is \\boxed{18}.", "18")             # True
    grade_many([(completion, gold), ...], timeout=5, workers=4)               # [bool, ...]

What is compared: only the text after the last `</think>` (a reasoning model's answer, not its
musings), and in it, in this order, the first that exists:
  1. a `\\boxed{…}` answer (math-verify's LaTeX extraction, boxed at top priority);
  2. GSM8K's `#### N`;
  3. the last number in the text.
The fallbacks after the box follow Qwen2.5-Math's evaluation harness (`use_last_number`), which is
how the Qwen3 numbers we compare against were produced; a completion that boxes its answer is
never judged on anything but the box. Equivalence is math-verify's `verify` (numeric within
precision, symbolic, sets, intervals, matrices).

Why processes: math-verify bounds each parse/verify with `signal.alarm`, which only works in the main
thread of a process, and some inputs hang inside C code where no alarm reaches (huge powers).
`GradingPool` keeps N worker processes alive across calls (start-up is paid once per pool, not per
item), sends one item at a time to each idle worker and kills a worker that overruns its deadline:
that item counts as wrong and a fresh worker takes its place. A plain ProcessPoolExecutor cannot
kill one stuck task, which is why the pool is written here.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import os
import re
import sys
import time
import types
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from typing import Iterable, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

DEFAULT_TIMEOUT = 5.0
"""Seconds math-verify may spend on each parse / verify of one item."""

_START_TIMEOUT = 120.0
"""Seconds a new worker may take to import math-verify and say ready."""
_THINK_END = "</think>"
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
_LATEX = LatexExtractionConfig(boxed_match_priority=0)


def answer_text(completion: str) -> str:
    """The part of a completion that holds the answer: everything after the last `</think>`."""
    return completion.rsplit(_THINK_END, 1)[-1]


def _number(text: str) -> str:
    return text.replace(",", "")


def _parse_prediction(completion: str, timeout: int) -> list:
    text = answer_text(completion)
    if "\\boxed" in text:
        parsed = parse(text, [_BOXED], parsing_timeout=timeout)
        if parsed:
            return parsed
    found = _GSM8K_ANSWER.findall(text)
    if not found:
        found = _NUMBER.findall(text)
    if not found:
        return []
    return parse(_number(found[-1]), [ExprExtractionConfig()], parsing_timeout=timeout)


def _parse_gold(gold: str, timeout: int) -> list:
    # Golds are bare answers ("18", "\frac{14}{3}", "\text{Evelyn}"); boxing them makes math-verify
    # read the whole string as one LaTeX answer instead of hunting for numbers inside it.
    return parse(f"\\boxed{{{gold}}}", [_LATEX, ExprExtractionConfig()], parsing_timeout=timeout)


def verify_answer(completion: str, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """The grading rule itself, in this process. Must run in a main thread (math-verify's alarm).

    Use `grade` / `grade_many` everywhere else: they run this in workers that cannot hang the caller.
    """
    seconds = max(1, math.ceil(timeout))  # signal.alarm counts whole seconds
    gold_parsed = _parse_gold(gold, seconds)
    pred_parsed = _parse_prediction(completion, seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def _worker_main(conn: Connection) -> None:
    """Worker loop: say ready, then receive (completion, gold, timeout), answer a bool; None ends it."""
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        completion, gold, timeout = item
        try:
            ok = verify_answer(completion, gold, timeout)
        except Exception:  # a grader failure on one odd input is a wrong answer, not a crashed run
            ok = False
        conn.send(ok)


class GradingPool:
    """Worker processes that run `verify_answer`, each item under a hard deadline.

    An item's deadline is 3 × timeout + 1 s: math-verify may use `timeout` on each of its three calls
    (parse gold, parse prediction, verify); anything longer is a hang its alarm could not stop.
    """

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        # forkserver: workers never inherit the parent's threads (torch, tokenizers) or CUDA state,
        # and a replacement for a killed worker forks from a small server instead of re-importing.
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["pipeline.data.grading"])
        started = [self._start() for _ in range(workers)]  # all start at once, then wait for each
        self._workers: list[tuple[mp.Process, Connection]] = [self._ready(*w) for w in started]

    def _start(self) -> tuple[mp.Process, Connection]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        with _main_module_hidden():
            proc.start()
        child.close()
        return proc, parent

    @staticmethod
    def _ready(proc: mp.Process, conn: Connection) -> tuple[mp.Process, Connection]:
        # A worker that cannot start must fail loudly here, not grade every item False.
        try:
            if conn.poll(_START_TIMEOUT) and conn.recv() == "ready":
                return proc, conn
        except (EOFError, OSError):
            pass
        proc.kill()
        proc.join()
        raise RuntimeError(f"a grading worker did not start (exit code {proc.exitcode}); see its error above")

    def _spawn(self) -> tuple[mp.Process, Connection]:
        return self._ready(*self._start())

    @property
    def size(self) -> int:
        return len(self._workers)

    def grade_many(self, pairs: Sequence[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
        results: list[bool] = [False] * len(pairs)
        deadline_s = 3 * timeout + 1
        pending = iter(range(len(pairs)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item index, deadline)

        def dispatch(slot: int) -> None:
            index = next(pending, None)
            if index is None:
                return
            completion, gold = pairs[index]
            try:
                self._workers[slot][1].send((completion, gold, timeout))
            except (BrokenPipeError, OSError):  # the worker died while idle
                self._replace(slot)
                self._workers[slot][1].send((completion, gold, timeout))
            busy[slot] = (index, time.monotonic() + deadline_s)

        for slot in range(self.size):
            dispatch(slot)
        while busy:
            now = time.monotonic()
            wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - now)
            conns = {self._workers[slot][1]: slot for slot in busy}
            for conn in wait(list(conns), timeout=wait_s):
                slot = conns[conn]
                index, _ = busy.pop(slot)
                try:
                    results[index] = bool(conn.recv())
                except (EOFError, OSError):  # the worker died on this item: wrong, and replace it
                    self._replace(slot)
                dispatch(slot)
            now = time.monotonic()
            for slot, (_index, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(slot)
                    self._replace(slot)  # results[index] stays False
                    dispatch(slot)
        return results

    def _replace(self, slot: int) -> None:
        proc, conn = self._workers[slot]
        proc.kill()
        proc.join()
        conn.close()
        self._workers[slot] = self._spawn()

    def close(self) -> None:
        for _proc, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self._workers:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self._workers = []


@contextmanager
def _main_module_hidden():
    """While a worker starts, show multiprocessing an empty `__main__`.

    A forkserver (or spawn) child first re-runs the parent's main module, to find functions defined
    there. A worker runs only this module, so that is at best wasted imports, and impossible when the
    parent's script came from stdin (`python - <<EOF`: `__main__.__file__` is "<stdin>", no file). An
    interactive session starts its children the same way, with no main file to re-run.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


_pools: dict[int, GradingPool] = {}


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def get_pool(workers: int | None = None) -> GradingPool:
    """The process-wide pool with this many workers, started on first use and kept until exit."""
    workers = workers or default_workers()
    if workers not in _pools:
        _pools[workers] = GradingPool(workers)
    return _pools[workers]


def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


atexit.register(_close_pools)


def grade_many(
    pairs: Iterable[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT, workers: int | None = None
) -> list[bool]:
    """Grade (completion, gold) pairs in the shared worker pool; a hung or crashed item is False."""
    pairs = list(pairs)
    if not pairs:
        return []
    return get_pool(workers).grade_many(pairs, timeout=timeout)


def grade(completion: str, gold: str) -> bool:
    """Is the completion's final answer equivalent to `gold`? (See the module docstring for the rule.)"""
    return grade_many([(completion, gold)])[0]
