"""Benchmark loading from the slices in tests/data: fields, gold normalisation, splits, bad input."""
from pathlib import Path

import pytest

from pipeline import benchmarks
from pipeline.benchmarks import load_benchmark, load_prompts_file
from pipeline.errors import InputError
from pipeline.tasks import testbed

DATA = Path(__file__).parent / "data"


def test_gsm8k_test_and_train():
    test = load_benchmark("gsm8k", data_dir=DATA)
    assert len(test) == 25
    assert test[0].id == "gsm8k-test-0"
    assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs")
    assert test[0].answer == "18"
    assert test[0].solution.endswith("#### 18")
    train = load_benchmark("gsm8k", split="train", limit=3, data_dir=DATA)
    assert [p.id for p in train] == ["gsm8k-train-0", "gsm8k-train-1", "gsm8k-train-2"]
    assert train[0].answer == "72"


def test_math500_fields():
    problems = load_benchmark("math500", limit=5, data_dir=DATA)
    assert [p.answer for p in problems] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}",
                                            "9", "\\text{Evelyn}"]
    assert problems[0].question.startswith("Convert the point $(0,3)$")
    assert "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}" in problems[0].solution


def test_competition_answers_normalised():
    aime = load_benchmark("aime24", data_dir=DATA)
    assert [p.id for p in aime] == ["aime24-60", "aime24-61", "aime24-62", "aime24-63", "aime24-64"]
    assert [p.answer for p in aime] == ["204", "113", "371", "385", "110"]
    amc = load_benchmark("amc23", data_dir=DATA)
    assert [p.answer for p in amc] == ["27", "36", "45", "3159", "36"]  # floats 27.0 in the file
    assert amc[0].question.startswith("Cities $A$ and $B$")
    assert amc[0].solution is None


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(DATA))
    assert benchmarks.benchmarks_dir() == DATA
    assert len(load_benchmark("amc23")) == 5


@pytest.mark.parametrize("kwargs, where, text", [
    ({"name": "gsm9k"}, "bench", "unknown benchmark 'gsm9k'"),
    ({"name": "math500", "split": "train"}, "split", "math500 has no 'train' split"),
    ({"name": "gsm8k", "limit": 0}, "limit", "must be >= 1"),
])
def test_bad_arguments(kwargs, where, text):
    with pytest.raises(InputError) as err:
        load_benchmark(data_dir=DATA, **kwargs)
    assert err.value.where == where and text in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=f"no such file: {tmp_path}/gsm8k_test.jsonl"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def test_bad_json_line(tmp_path):
    (tmp_path / "amc23_test.jsonl").write_text('{"id": 0, "problem": "p", "answer": 1}\n{oops\n')
    with pytest.raises(InputError, match="amc23_test.jsonl:2: not JSON"):
        load_benchmark("amc23", data_dir=tmp_path)


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "1+1?", "answer": 2}\n{"id": "q7", "problem": "2+2?"}\n')
    problems = load_prompts_file(path)
    assert [(p.id, p.question, p.answer) for p in problems] == [("prompt-0", "1+1?", "2"), ("q7", "2+2?", "")]
    path.write_text('{"answer": 2}\n')
    with pytest.raises(InputError, match="row 1 has no `question`"):
        load_prompts_file(path)


@pytest.mark.skipif(not hasattr(testbed, "make_problems"), reason="the testbed generator has not landed yet")
def test_testbed_benchmark_is_the_test_split():
    spec = testbed.TestbedSpec(test_size=7)
    problems = load_benchmark("testbed", testbed=spec)
    assert [p.id for p in problems] == [p.id for p in testbed.make_problems(spec, "test")]
    assert len(load_benchmark("testbed", testbed=spec, limit=3)) == 3
