"""Where a generated sequence ends: the one rule every decoding path cuts by (pipeline.generate's backends,
pipeline.refill's slots, the RL rollouts). Its own module so that refill, which generate imports, can use
it without a cycle."""

from __future__ import annotations

from typing import Iterable


def first_stop_end(ids: Iterable[int], stops: set[int] | frozenset[int]) -> int | None:
    """Index just past the first stop token of `ids`, None when none is there (truncated)."""
    return next((i + 1 for i, t in enumerate(ids) if t in stops), None)
