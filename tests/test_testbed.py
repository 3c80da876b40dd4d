"""The testbed: deterministic, disjoint splits, correct chains of thought, difficulty knobs that bite."""

import re
import time

import pytest
from pydantic import ValidationError

from pipeline.data.testbed import MAX_PROBLEMS, TestbedSpec, make_problems

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
HARD = TestbedSpec(min_steps=6, max_steps=10, max_number=999, max_factor=9)


def test_same_arguments_same_problems_and_seed_changes_them():
    a = make_problems(TestbedSpec(), "train", n=50, seed=3)
    assert a == make_problems(TestbedSpec(), "train", n=50, seed=3)
    assert [p.question for p in a] != [p.question for p in make_problems(TestbedSpec(), "train", n=50, seed=4)]
    assert len(make_problems(TestbedSpec(test_size=7), "test")) == 7


def test_splits_are_disjoint_across_seeds_and_unique_within():
    train = {p.question for seed in (0, 1) for p in make_problems(TestbedSpec(), "train", n=3000, seed=seed)}
    test = [p.question for seed in (0, 1) for p in make_problems(TestbedSpec(), "test", n=300, seed=seed)]
    assert len(train) > 5000 and not train & set(test)
    one = make_problems(TestbedSpec(), "test", n=300)
    assert len({p.question for p in one}) == 300


@pytest.mark.parametrize("spec", [TestbedSpec(), HARD])
def test_every_step_of_every_solution_is_right(spec):
    for p in make_problems(spec, "test", n=200):
        think, _, final = p.solution.partition("\n</think>\n\n")
        assert think.startswith("<think>\n") and final.endswith(f"\\boxed{{{p.answer}}}.")
        equations = [EQUATION.search(line) for line in think.splitlines()]
        equations = [m for m in equations if m]
        assert spec.min_steps <= len(equations) <= spec.max_steps
        for m in equations:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == c and 1 <= c <= spec.max_number
            if op == "/":
                assert a % b == 0 and b <= spec.max_factor
        assert int(equations[-1][4]) == int(p.answer)
        # the chain is a chain: each step starts from a value stated before it
        stated = {int(n) for n in re.findall(r"\d+", p.question)}
        for m in equations:
            assert int(m[1]) in stated
            stated.add(int(m[4]))


def test_difficulty_knobs_lengthen_the_chain():
    def mean_steps(spec):
        problems = make_problems(spec, "train", n=300)
        return sum(p.solution.count(" = ") for p in problems) / len(problems)

    assert mean_steps(TestbedSpec(min_steps=1, max_steps=2)) < 2.01 < 6 <= mean_steps(HARD)
    long = make_problems(HARD, "test", n=50)
    assert max(int(a) for p in long for a in re.findall(r"= (\d+)", p.solution)) > 100


def test_bad_specs_are_rejected():
    with pytest.raises(ValidationError, match="min_steps"):
        TestbedSpec(min_steps=3, max_steps=2)
    with pytest.raises(ValidationError, match="besides"):
        TestbedSpec(operations=("total",))
    with pytest.raises(ValueError, match="too few distinct"):
        make_problems(TestbedSpec(max_number=2, max_steps=1, operations=("add",)), "test", n=50)
    # giving up takes misses in proportion to the questions found, not to the n asked for
    start = time.monotonic()
    with pytest.raises(ValueError, match="too few distinct"):
        make_problems(TestbedSpec(max_number=3, max_steps=1, operations=("add",)), "train", n=MAX_PROBLEMS)
    assert time.monotonic() - start < 10
    with pytest.raises(ValidationError, match="less than or equal to 1000000"):
        TestbedSpec(train_size=10**15)
