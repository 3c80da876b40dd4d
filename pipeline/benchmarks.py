"""Benchmarks as lists of `Problem`: the testbed, GSM8K, MATH-500, AIME-2024, AMC-2023.

    from pipeline.benchmarks import load_benchmark
    problems = load_benchmark("gsm8k", limit=200)                 # test split
    problems = load_benchmark("gsm8k", split="train")             # the traces stage's prompts
    problems = load_benchmark("testbed", testbed=TestbedSpec())   # generated, no files

Files are the local jsonl copies described in `<data dir>/README.md`; the data dir is, first found:
the `data_dir` argument (recipe `data.benchmarks_dir`, CLI `--data-dir`), $REASONING_QAT_BENCHMARKS,
`<repo root>/../shared/data/benchmarks`. Hub datasets (openai/gsm8k, HuggingFaceH4/MATH-500, ...)
would be the natural source where a network exists, but these machines have none, so nothing here
loads from the hub: a loader we cannot run in a test would be a loader we cannot trust.

Gold answers are normalised once here, so that grading compares like with like: GSM8K's `#### N`
without thousands separators, AMC's floats as integers, AIME's zero-padded integers without padding.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from pipeline.data import Problem
from pipeline.errors import InputError
from pipeline.tasks.testbed import MAX_PROBLEMS, TestbedSpec, make_problems

BENCHMARKS = ("testbed", "gsm8k", "math500", "aime24", "amc23")
_SPLITS = {"testbed": ("train", "test"), "gsm8k": ("train", "test"), "math500": ("test",),
           "aime24": ("test",), "amc23": ("test",)}
_REPO_ROOT = Path(__file__).resolve().parents[1]


def benchmarks_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where the benchmark jsonl files are (see the module docstring for the order)."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("REASONING_QAT_BENCHMARKS"):
        return Path(os.environ["REASONING_QAT_BENCHMARKS"])
    return _REPO_ROOT.parent / "shared" / "data" / "benchmarks"


def read_jsonl(path: Path, where: str) -> list[dict]:
    """Rows of a jsonl file; see `read_jsonl_lines`."""
    return [row for _, row in read_jsonl_lines(path, where)]


def read_jsonl_lines(path: Path, where: str) -> list[tuple[str, dict]]:
    """("<file>:<line>", row) for each non-blank line of a jsonl file. A missing file, or a line that is
    not UTF-8, not JSON or not a JSON object, is an InputError blaming `where` and naming file and line."""
    if not path.is_file():
        raise InputError(where, f"no such file: {path}")
    rows = []
    with path.open("rb") as f:  # bytes, so that a line that is not UTF-8 is reported with its number
        for line_no, line in enumerate(f, 1):
            at = f"{path}:{line_no}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(where, f"{at}: not UTF-8 text (is it a jsonl file?)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(where, f"{at}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(where, f"{at}: expected a JSON object, got {_json(row)}")
            rows.append((at, row))
    return rows


def _json(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(row: dict, key: str, at: str, where: str, numbers: bool = False) -> str | int | float:
    """row[key]: a non-empty string, or with `numbers` also a finite JSON number (AMC's 27.0, an id 60)."""
    value = row.get(key)
    if value is None:
        raise InputError(where, f"{at}: no `{key}`")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (isinstance(value, str) or (numbers and number)):
        kind = "a string or a number" if numbers else "a string"
        raise InputError(where, f"{at}: `{key}` must be {kind}, got {_json(value)}")
    if isinstance(value, str) and not value.strip():
        raise InputError(where, f"{at}: `{key}` is empty")
    return value


def _integer_text(value) -> str:
    """27.0 -> "27", "025" -> "25"; anything not an integer is returned as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if text.lstrip("-").isdigit() else text


def _gsm8k(rows: list[tuple[str, dict]], split: str, where: str) -> list[Problem]:
    problems = []
    for i, (at, row) in enumerate(rows):
        solution = _field(row, "answer", at, where)
        gold = solution.rsplit("####", 1)[-1].strip().replace(",", "")
        if "####" not in solution or not gold:
            raise InputError(where, f"{at}: `answer` does not end in `#### <final answer>`")
        problems.append(Problem(id=f"gsm8k-{split}-{i}", question=_field(row, "question", at, where), answer=gold,
                                solution=solution))
    return problems


def _math500(rows: list[tuple[str, dict]], split: str, where: str) -> list[Problem]:
    return [Problem(id=f"math500-{i}", question=_field(row, "problem", at, where),
                    answer=str(_field(row, "answer", at, where, numbers=True)).strip(),
                    solution=_field(row, "solution", at, where)) for i, (at, row) in enumerate(rows)]


def _competition(name: str) -> Callable[[list[tuple[str, dict]], str, str], list[Problem]]:
    def load(rows: list[tuple[str, dict]], split: str, where: str) -> list[Problem]:
        return [Problem(id=f"{name}-{_field(row, 'id', at, where, numbers=True)}",
                        question=_field(row, "problem" if "problem" in row else "question", at, where),
                        answer=_integer_text(_field(row, "answer", at, where, numbers=True)),
                        solution=row.get("solution"))
                for at, row in rows]
    return load


_FILE_LOADERS = {"gsm8k": _gsm8k, "math500": _math500, "aime24": _competition("aime24"),
                 "amc23": _competition("amc23")}


def load_benchmark(name: str, limit: int | None = None, data_dir: str | os.PathLike | None = None,
                   testbed=None, split: str = "test") -> list[Problem]:
    """The first `limit` problems (all when None) of benchmark `name`, split `split`.

    `testbed` is the recipe's TestbedSpec for the testbed benchmark (default TestbedSpec()).
    Raises InputError for an unknown benchmark or split, or a missing / unreadable / empty data file
    or a row without the fields the benchmark needs (naming the file and line).
    """
    if name not in BENCHMARKS:
        raise InputError("bench", f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if split not in _SPLITS[name]:
        raise InputError("split", f"{name} has no {split!r} split; it has {', '.join(_SPLITS[name])}")
    if limit is not None and limit < 1:
        raise InputError("limit", f"must be >= 1, got {limit}")
    if limit is not None and limit > MAX_PROBLEMS:
        raise InputError("limit", f"must be <= {MAX_PROBLEMS}, got {limit}")
    if name == "testbed":
        return make_problems(testbed or TestbedSpec(), split, n=limit)
    path = benchmarks_dir(data_dir) / f"{name}_{split}.jsonl"
    rows = read_jsonl_lines(path, "data_dir")
    if not rows:
        raise InputError("data_dir", f"{path}: no problems in it")
    return _FILE_LOADERS[name](rows[:limit], split, "data_dir")


def load_prompts_file(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Problems from a user's jsonl (recipe `data.prompts_file`): `question` (or `problem` /
    `prompt`), optional `answer` and `id`. Without an answer the problem cannot be graded."""
    where = "data.prompts_file"
    rows = read_jsonl_lines(Path(path), where)
    if not rows:
        raise InputError(where, f"{path}: no prompts in it")
    problems = []
    for i, (at, row) in enumerate(rows[:limit]):
        key = next((k for k in ("question", "problem", "prompt") if k in row), None)
        if key is None:
            raise InputError(where, f"{at}: no `question`, `problem` or `prompt`")
        answer = None if row.get("answer") in (None, "") else _field(row, "answer", at, where, numbers=True)
        problems.append(Problem(id=str(row.get("id", f"prompt-{i}")), question=_field(row, key, at, where),
                                answer="" if answer is None else _integer_text(answer)))
    return problems


def training_problems(data, count: int | None, seed: int, need_answers: bool, where: str) -> list[Problem]:
    """The training-domain problems of a recipe's `data` section (DataSpec): what `traces` samples
    and `rl` rewards. `need_answers`: every problem must carry a gold answer to grade against;
    `where` is the key path blamed when one does not."""
    if data.task == "testbed":
        return make_problems(data.testbed, "train", n=count, seed=seed)
    if data.task == "gsm8k":
        return load_benchmark("gsm8k", split="train", limit=count, data_dir=data.benchmarks_dir)
    if data.task == "jsonl":
        problems = load_prompts_file(data.prompts_file, limit=count)
        unanswered = next((p for p in problems if not p.answer), None)
        if need_answers and unanswered is not None:
            raise InputError(where, f"{data.prompts_file}: prompt {unanswered.id!r} has no `answer`, so it cannot "
                                    "be graded")
        return problems
    raise InputError("data.task", f"{data.task} has no training split in the benchmarks")


def check_training_data(data, need_answers: bool = False, where: str = "data.prompts_file") -> list[tuple[str, str]]:
    """What `training_problems` would refuse, found at validation time: (key path, message) pairs.
    The files are read whole (a few MB at most); the testbed's spec was checked by its schema."""
    if data.task == "math500":
        return [("data.task", "math500 is a test set with no train split here; use gsm8k, testbed or jsonl")]
    if data.task == "gsm8k":
        path = benchmarks_dir(data.benchmarks_dir) / "gsm8k_train.jsonl"
        if not path.is_file():
            return [("data.benchmarks_dir", f"no such file: {path} (data.benchmarks_dir or $REASONING_QAT_BENCHMARKS)")]
    if data.task == "jsonl" and data.prompts_file is None:
        return [("data.prompts_file", "must be set when data.task is jsonl")]
    if data.task in ("gsm8k", "jsonl"):
        try:
            training_problems(data, None, seed=0, need_answers=need_answers, where=where)
        except InputError as e:
            return [("data.benchmarks_dir" if e.where == "data_dir" else e.where, e.message)]
    return []


def check_bench(bench: str, data, where: str = "bench", limit: int | None = None) -> list[tuple[str, str]]:
    """What `load_benchmark(bench, limit, ...)` would refuse, found at validation time: (key, message) pairs."""
    if bench not in BENCHMARKS:
        return [(where, f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")]
    if bench != "testbed":
        path = benchmarks_dir(data.benchmarks_dir) / f"{bench}_test.jsonl"
        if not path.is_file():
            return [(where, f"no such file: {path} (set data.benchmarks_dir or $REASONING_QAT_BENCHMARKS)")]
        try:
            load_benchmark(bench, limit=limit, data_dir=data.benchmarks_dir)
        except InputError as e:
            return [(where, e.message)]
    return []

