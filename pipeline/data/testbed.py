"""The testbed: procedurally generated, verifiable multi-step word problems in the style of GSM8K.

Each problem is a short story about people and their items; every sentence after the first changes
one quantity (buys more, loses some, multiplies, splits into equal piles, compares with another
person) and the question asks for the last one, or for a sum of two of them. The reference solution
is the chain of thought a reasoning model would write, one equation per step, then the boxed answer:

    <think>
    Mia starts with 12 stickers.
    Mia gets 7 more: 12 + 7 = 19.
    Leo has 3 times as many as Mia: 19 * 3 = 57.
    So Leo has 57 stickers.
    </think>

    Leo has 57 stickers. The answer is \\boxed{57}.

Why this task: the answer depends on every step, each step's digits depend on the previous result,
and a solution is one equation per step, so the length of the chain (`min_steps`..`max_steps`) and the
size of the numbers (`max_number`) set how many tokens must all come out right. That is the way real
reasoning is fragile under quantization: small per-token errors compound over long chains.

Departures from GSM8K: the language is templated (a closed vocabulary, a few phrasings per step
kind) and the arithmetic is integer add/sub/mul/exact div, so difficulty is set by knobs, not by
reading comprehension; every number and result stays in 1..max_number.

Splits: a question belongs to the test split when a hash of its text falls in the first
1/`TEST_BUCKETS` of the hash space, otherwise to train, whatever the seed; so no train question of
any seed equals a test question of any seed. Within a split, questions are unique.

    from pipeline.data.testbed import TestbedSpec, make_problems
    make_problems(TestbedSpec(), "test", n=5)
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.data.problem import Problem

TEST_BUCKETS = 8
"""One question in TEST_BUCKETS (by hash) is reserved for the test split."""
MAX_PROBLEMS = 1_000_000
"""The most problems one call generates (a split's size, a stage's `count` or `limit`): about ten
minutes of generating and tokenizing on one CPU core; a typo such as 1e15 is refused, not waited for."""

NAMES = (
    "Mia",
    "Leo",
    "Ava",
    "Sam",
    "Zoe",
    "Max",
    "Ivy",
    "Ben",
    "Lily",
    "Noah",
    "Emma",
    "Omar",
    "Nina",
    "Ravi",
    "Lucy",
    "Hugo",
    "Rosa",
    "Theo",
    "Ella",
    "Finn",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "coins",
    "books",
    "pencils",
    "cookies",
    "cards",
    "shells",
    "stamps",
    "buttons",
    "flowers",
)
OPERATIONS = ("add", "sub", "mul", "div", "more_than", "fewer_than", "times_as_many", "total")


class TestbedSpec(BaseModel):
    """Difficulty and size of the testbed (the recipe's `data.testbed`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    __test__ = False  # not a pytest test class, whatever its name

    min_steps: int = Field(1, ge=1, le=100)
    """Fewest arithmetic steps (equations) in a solution."""
    max_steps: int = Field(2, ge=1, le=100)
    """Most arithmetic steps in a solution; longer chains compound errors."""
    max_number: int = Field(20, ge=2, le=10**6)
    """Every quantity in a problem (start, intermediate, answer) is in 1..max_number."""
    max_factor: int = Field(5, ge=2, le=1000)
    """Multipliers and divisors are in 2..max_factor."""
    operations: tuple[Literal[OPERATIONS], ...] = OPERATIONS  # type: ignore[valid-type]
    """Step kinds to draw from: add/sub/mul/div change the current person's count; more_than,
    fewer_than, times_as_many introduce a new person relative to the current one; total (only ever
    the last step) adds the current count to one stated earlier, a long-range dependency."""
    train_size: int = Field(20000, ge=1, le=MAX_PROBLEMS)
    """Problems in the train split when `make_problems` is called with n=None."""
    test_size: int = Field(200, ge=1, le=MAX_PROBLEMS)
    """Problems in the test split when `make_problems` is called with n=None."""

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must be <= max_steps")
        if not set(self.operations) - {"total"}:
            raise ValueError("operations needs at least one step kind besides `total`")
        return self


def _split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def _constants(op: str, a: int, spec: TestbedSpec) -> range | list[int]:
    """The constants `op` may apply to the current value `a` keeping the result in 1..max_number."""
    if op in ("add", "more_than"):
        return range(1, spec.max_number - a + 1)
    if op in ("sub", "fewer_than"):
        return range(1, a)
    if op in ("mul", "times_as_many"):
        return [k for k in range(2, spec.max_factor + 1) if a * k <= spec.max_number]
    # div: keep one of k equal piles, so k must divide a
    return [k for k in range(2, spec.max_factor + 1) if a % k == 0]


class _DeadEnd(Exception):
    """No allowed step applies to the current value: the caller draws a fresh problem."""


_RELATIVE = ("more_than", "fewer_than", "times_as_many")
"""Step kinds that introduce a new person (so need a name left)."""


def _generate(rng: random.Random, spec: TestbedSpec) -> tuple[str, str, int]:
    """One problem: (question, solution text, answer)."""
    steps = rng.randint(spec.min_steps, spec.max_steps)
    item = rng.choice(ITEMS)
    names = rng.sample(NAMES, len(NAMES))
    people = [names.pop()]
    value = rng.randint(2, spec.max_number)
    known = {people[0]: value}  # every count stated so far, for `total`
    story = [f"{people[0]} has {value} {item}."]
    chain = [f"{people[0]} starts with {value} {item}."]
    for i in range(steps):
        cur = people[-1]
        if i == steps - 1 and (total := _total_step(rng, spec, item, cur, value, known)):
            asked, worked, summary, result = total
            return " ".join([*story, asked]), _solution([*chain, *worked], summary, result), result
        op, k = _draw_step(rng, spec, value, names)
        new = names.pop() if op in _RELATIVE else None
        value, told, worked_line = _step_text(rng, op, k, value, item, cur, new)
        story.append(told)
        chain.append(worked_line)
        if new is not None:
            people.append(new)
        known[people[-1]] = value
    cur = people[-1]
    story.append(f"How many {item} does {cur} have now?")
    chain.append(f"So {cur} has {value} {item}.")
    return " ".join(story), _solution(chain, f"{cur} has {value} {item}", value), value


def _total_step(
    rng: random.Random, spec: TestbedSpec, item: str, cur: str, value: int, known: dict[str, int]
) -> tuple[str, list[str], str, int] | None:
    """The closing `total` step, summing `cur`'s count with one stated earlier: (question, solution
    lines, summary, answer); None when not drawn (half the time it could be) or when the sum is too large."""
    if "total" not in spec.operations or len(known) <= 1 or not rng.random() < 0.5:
        return None
    other = rng.choice([p for p in known if p != cur])
    if known[other] + value > spec.max_number:
        return None
    result = value + known[other]
    return (
        f"How many {item} do {cur} and {other} have together?",
        [
            f"Together {cur} and {other} have {value} + {known[other]} = {result}.",
            f"So {cur} and {other} have {result} {item} together.",
        ],
        f"{cur} and {other} have {result} {item} together",
        result,
    )


def _draw_step(rng: random.Random, spec: TestbedSpec, value: int, names_left: list[str]) -> tuple[str, int]:
    """The next step's kind and constant, among those keeping the count in range (and, for a step
    that introduces a person, only while names are left); _DeadEnd when none applies."""
    choices = {
        op: ks
        for op in spec.operations
        if op != "total" and (ks := _constants(op, value, spec)) and (names_left or op not in _RELATIVE)
    }
    if not choices:
        raise _DeadEnd
    op = rng.choice(sorted(choices))
    return op, rng.choice(choices[op])


def _step_text(
    rng: random.Random, op: str, k: int, value: int, item: str, cur: str, new: str | None
) -> tuple[int, str, str]:
    """Apply one step to `value`: (result, the story's sentence, the solution's equation line).
    `new` is the person a relative step (more_than, fewer_than, times_as_many) introduces."""
    if op == "add":
        result = value + k
        told = f"{cur} buys {k} more {item}." if rng.random() < 0.5 else f"{cur} finds {k} more {item}."
        return result, told, f"{cur} gets {k} more: {value} + {k} = {result}."
    if op == "sub":
        result = value - k
        told = f"{cur} gives away {k} {item}." if rng.random() < 0.5 else f"{cur} loses {k} {item}."
        return result, told, f"{cur} has {k} fewer: {value} - {k} = {result}."
    if op == "mul":
        result = value * k
        return (
            result,
            f"{cur} ends up with {k} times as many {item} as before.",
            f"{cur} has {k} times as many: {value} * {k} = {result}.",
        )
    if op == "div":
        result = value // k
        return (
            result,
            f"{cur} splits the {item} into {k} equal piles and keeps one pile.",
            f"{cur} keeps one of {k} piles: {value} / {k} = {result}.",
        )
    if op == "more_than":
        result = value + k
        return (
            result,
            f"{new} has {k} more {item} than {cur}.",
            f"{new} has {k} more than {cur}: {value} + {k} = {result}.",
        )
    if op == "fewer_than":
        result = value - k
        return (
            result,
            f"{new} has {k} fewer {item} than {cur}.",
            f"{new} has {k} fewer than {cur}: {value} - {k} = {result}.",
        )
    result = value * k
    return (
        result,
        f"{new} has {k} times as many {item} as {cur}.",
        f"{new} has {k} times as many as {cur}: {value} * {k} = {result}.",
    )


def _solution(chain: list[str], summary: str, answer: int) -> str:
    # Qwen3's thinking format: the reasoning inside <think>, then the answer, boxed
    return "<think>\n" + "\n".join(chain) + "\n</think>\n\n" + f"{summary}. The answer is \\boxed{{{answer}}}."


def make_problems(
    spec: TestbedSpec, split: Literal["train", "test"], n: int | None = None, seed: int = 0
) -> list[Problem]:
    """`n` unique problems of `split` (default: spec.train_size / spec.test_size), the same for the
    same (spec, split, n, seed); no question of one split appears in the other, for any seeds."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if n is None:
        n = spec.train_size if split == "train" else spec.test_size
    rng = random.Random(f"testbed/{split}/{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(problems) < n:
        try:
            question, solution, answer = _generate(rng, spec)
        except _DeadEnd:
            question = None
        if question is None or question in seen or _split_of(question) != split:
            misses += 1
            # a small spec has few distinct questions: fail loudly instead of spinning, after a number
            # of misses bounded by the questions found so far rather than by the n asked for
            if misses > 50 * len(problems) + 10000:
                raise ValueError(
                    f"the testbed spec has too few distinct {split} questions for n={n}; raise max_number or max_steps"
                )
            continue
        seen.add(question)
        problems.append(
            Problem(
                id=f"testbed-{split}-{seed}-{len(problems)}", question=question, answer=str(answer), solution=solution
            )
        )
    return problems
