"""`Problem`: one verifiable problem (question, gold answer, optional reference solution), the record the
testbed, the benchmarks, generation, grading and RL all pass around."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One verifiable problem, from the testbed or a benchmark."""

    id: str
    question: str
    """The problem statement, without the instruction."""
    answer: str
    """Gold final answer (a number or a LaTeX expression), what `pipeline.data.grading.grade` compares to."""
    solution: str | None = None
    """Reference solution: for the testbed, the assistant text to train on (`<think>…</think>` + boxed)."""
