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
import os
from pathlib import Path
from typing import Callable

from pipeline.data import Problem
from pipeline.errors import InputError

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
    """Rows of a jsonl file; a missing file or a bad line is an InputError naming the file."""
    if not path.is_file():
        raise InputError(where, f"no such file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(where, f"{path}:{line_no}: not JSON ({e.msg})") from None
    return rows


def _integer_text(value) -> str:
    """27.0 -> "27", "025" -> "25"; anything not an integer is returned as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if text.lstrip("-").isdigit() else text


def _gsm8k(rows: list[dict], split: str) -> list[Problem]:
    problems = []
    for i, row in enumerate(rows):
        solution = row["answer"]
        gold = solution.rsplit("####", 1)[-1].strip().replace(",", "")
        problems.append(Problem(id=f"gsm8k-{split}-{i}", question=row["question"], answer=gold,
                                solution=solution))
    return problems


def _math500(rows: list[dict], split: str) -> list[Problem]:
    return [Problem(id=f"math500-{i}", question=row["problem"], answer=str(row["answer"]).strip(),
                    solution=row["solution"]) for i, row in enumerate(rows)]


def _competition(name: str) -> Callable[[list[dict], str], list[Problem]]:
    def load(rows: list[dict], split: str) -> list[Problem]:
        return [Problem(id=f"{name}-{row['id']}", question=row.get("problem") or row["question"],
                        answer=_integer_text(row["answer"]), solution=row.get("solution"))
                for row in rows]
    return load


_FILE_LOADERS = {"gsm8k": _gsm8k, "math500": _math500, "aime24": _competition("aime24"),
                 "amc23": _competition("amc23")}


def load_benchmark(name: str, limit: int | None = None, data_dir: str | os.PathLike | None = None,
                   testbed=None, split: str = "test") -> list[Problem]:
    """The first `limit` problems (all when None) of benchmark `name`, split `split`.

    `testbed` is the recipe's TestbedSpec for the testbed benchmark (default TestbedSpec()).
    Raises InputError for an unknown benchmark or split, or a missing / unreadable data file.
    """
    if name not in BENCHMARKS:
        raise InputError("bench", f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if split not in _SPLITS[name]:
        raise InputError("split", f"{name} has no {split!r} split; it has {', '.join(_SPLITS[name])}")
    if limit is not None and limit < 1:
        raise InputError("limit", f"must be >= 1, got {limit}")
    if name == "testbed":
        from pipeline.tasks.testbed import TestbedSpec, make_problems
        return make_problems(testbed or TestbedSpec(), split, n=limit)
    path = benchmarks_dir(data_dir) / f"{name}_{split}.jsonl"
    rows = read_jsonl(path, "data_dir")
    return _FILE_LOADERS[name](rows[:limit], split)


def load_prompts_file(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Problems from a user's jsonl (recipe `data.prompts_file`): `question` (or `problem` /
    `prompt`), optional `answer` and `id`. Without an answer the problem cannot be graded."""
    rows = read_jsonl(Path(path), "data.prompts_file")
    problems = []
    for i, row in enumerate(rows[:limit]):
        question = row.get("question") or row.get("problem") or row.get("prompt")
        if not isinstance(question, str) or not question:
            raise InputError("data.prompts_file", f"{path}: row {i + 1} has no `question`, `problem` or `prompt`")
        answer = row.get("answer")
        problems.append(Problem(id=str(row.get("id", f"prompt-{i}")), question=question,
                                answer="" if answer is None else _integer_text(answer)))
    return problems


def training_problems(data, count: int | None, seed: int, need_answers: bool, where: str) -> list[Problem]:
    """The training-domain problems of a recipe's `data` section (DataSpec): what `traces` samples
    and `rl` rewards. `need_answers`: every problem must carry a gold answer to grade against;
    `where` is the key path blamed when one does not."""
    if data.task == "testbed":
        from pipeline.tasks.testbed import make_problems

        return make_problems(data.testbed, "train", n=count, seed=seed)
    if data.task == "gsm8k":
        return load_benchmark("gsm8k", split="train", limit=count, data_dir=data.benchmarks_dir)
    if data.task == "jsonl":
        problems = load_prompts_file(data.prompts_file, limit=count)
        if need_answers and any(not p.answer for p in problems):
            raise InputError(where, f"{data.prompts_file} has prompts without an `answer`, which cannot be graded")
        return problems
    raise InputError("data.task", f"{data.task} has no training split in the benchmarks")


def check_training_data(data) -> list[tuple[str, str]]:
    """What `training_problems` would refuse, found at validation time: (key path, message) pairs."""
    if data.task == "math500":
        return [("data.task", "math500 is a test set with no train split here; use gsm8k, testbed or jsonl")]
    if data.task == "gsm8k":
        path = benchmarks_dir(data.benchmarks_dir) / "gsm8k_train.jsonl"
        if not path.is_file():
            return [("data.benchmarks_dir", f"no such file: {path} (data.benchmarks_dir or $REASONING_QAT_BENCHMARKS)")]
    if data.task == "jsonl" and data.prompts_file is None:
        return [("data.prompts_file", "must be set when data.task is jsonl")]
    return []


def check_bench(bench: str, data, where: str = "bench") -> list[tuple[str, str]]:
    """What `load_benchmark(bench, ...)` would refuse, found at validation time: (key, message) pairs."""
    if bench not in BENCHMARKS:
        return [(where, f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")]
    if bench != "testbed":
        path = benchmarks_dir(data.benchmarks_dir) / f"{bench}_test.jsonl"
        if not path.is_file():
            return [(where, f"no such file: {path} (set data.benchmarks_dir or $REASONING_QAT_BENCHMARKS)")]
    return []

