"""Benchmarks as lists of `Problem`: the testbed, GSM8K, MATH-500, AIME-2024, AMC-2023.

    from pipeline.data.benchmarks import load_benchmark
    problems = load_benchmark("gsm8k", limit=200, data_dir="data/benchmarks")    # test split
    problems = load_benchmark("gsm8k", split="train", data_dir=...)               # the traces stage's prompts
    problems = load_benchmark("math500", hub={"math500": "HuggingFaceH4/MATH-500"})  # through `datasets`
    problems = load_benchmark("testbed", testbed=TestbedSpec())                   # generated, no files

Where a benchmark's rows come from, first found:
- `hub` (recipe `data.hub`): benchmark -> a hub id or the local directory of a downloaded copy of
  one, read with `datasets.load_dataset(source, config, split=split)`: openai/gsm8k (config `main`,
  splits train / test), HuggingFaceH4/MATH-500 (split test). Needs the network or the datasets cache.
- files `<dir>/<bench>_<split>.jsonl` or `.parquet`, dir = the `data_dir` argument (recipe
  `data.benchmarks_dir`, CLI `--data-dir`), else $REASONING_QAT_BENCHMARKS. There is no default
  directory: without one, a benchmark other than the testbed is an error that says how to give one.
The fields each benchmark's rows need (those of the hub datasets above, and of the files the
project's maintainers keep, MIT / public competition problems):
  gsm8k     question, answer (the worked solution, ending `#### N`)
  math500   problem, solution, answer
  aime24    id, problem, answer (solution optional)
  amc23     id, problem or question, answer (solution optional)

Gold answers are normalised once here, so that grading compares like with like: GSM8K's `#### N`
without thousands separators, AMC's floats as integers, AIME's zero-padded integers without padding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

from pipeline.data.problem import Problem
from pipeline.data.rows import read_located, short_json
from pipeline.data.testbed import MAX_PROBLEMS, TestbedSpec, make_problems
from pipeline.engine.errors import InputError

BENCHMARKS = ("testbed", "gsm8k", "math500", "aime24", "amc23")
_SPLITS = {
    "testbed": ("train", "test"),
    "gsm8k": ("train", "test"),
    "math500": ("test",),
    "aime24": ("test",),
    "amc23": ("test",),
}
HUB_IDS = {"gsm8k": "openai/gsm8k", "math500": "HuggingFaceH4/MATH-500"}
"""The hub datasets `data.hub` may name per benchmark (or a local copy of them)."""
_HUB_CONFIGS = {"gsm8k": "main"}
"""The dataset configuration a benchmark reads from its hub dataset (None: the only one)."""
_FORMATS = (".jsonl", ".parquet")


def benchmarks_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the benchmark files are: `data_dir`, else $REASONING_QAT_BENCHMARKS, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("REASONING_QAT_BENCHMARKS"):
        return Path(os.environ["REASONING_QAT_BENCHMARKS"]).expanduser()
    return None


def _field(row: dict, key: str, at: str, where: str, numbers: bool = False) -> str | int | float:
    """row[key]: a non-empty string, or with `numbers` also a finite JSON number (AMC's 27.0, an id 60)."""
    value = row.get(key)
    if value is None:
        raise InputError(where, f"{at}: no `{key}`")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (isinstance(value, str) or (numbers and number)):
        kind = "a string or a number" if numbers else "a string"
        raise InputError(where, f"{at}: `{key}` must be {kind}, got {short_json(value)}")
    if isinstance(value, str) and not value.strip():
        raise InputError(where, f"{at}: `{key}` is empty")
    return value


RECIPE_WAYS_OUT = (
    "set data.benchmarks_dir (--set data.benchmarks_dir=DIR) or "
    f"$REASONING_QAT_BENCHMARKS, or read {' / '.join(HUB_IDS)} through data.hub ({', '.join(HUB_IDS.values())})"
)
"""How a recipe names its benchmark directory, for the commands that load one with --set."""


class NoBenchmarkDir(InputError):
    """No directory to read benchmark files from. Its line is the same whichever benchmark or stage needs one, so a
    recipe's validation says it once; `where` and `ways_out` are those of the command at hand."""

    def __init__(self, where: str = "data.benchmarks_dir", ways_out: str = RECIPE_WAYS_OUT):
        super().__init__(
            where,
            "no benchmark directory is set, where the benchmarks not read from the hub are files "
            f"(<dir>/<bench>_<split>.jsonl or .parquet; the testbed needs none): {ways_out}",
        )


def naming_ways_out(error, where: str, ways_out: str):
    """The RecipeError `error` with its missing-directory line (NoBenchmarkDir's) blaming `where` and naming
    `ways_out`: for a command that validates a recipe but takes no --set (init, eval --recipe)."""
    from pipeline.engine.recipe import RecipeError

    default = NoBenchmarkDir()
    ours = NoBenchmarkDir(where, ways_out)
    return RecipeError(
        [(ours.where, ours.message) if e == (default.where, default.message) else e for e in error.errors]
    )


def benchmark_file(name: str, split: str, data_dir: str | os.PathLike | None, where: str = "data_dir") -> Path:
    """`<dir>/<name>_<split>.jsonl` (or `.parquet`); InputError, blamed on `where`, naming the file
    looked for and how to point at another when there is none (NoBenchmarkDir when no directory is set)."""
    directory = benchmarks_dir(data_dir)
    if directory is None:
        raise NoBenchmarkDir()
    hub = f", or name a hub dataset (data.hub.{name}: {HUB_IDS[name]})" if name in HUB_IDS else ""
    for suffix in _FORMATS:
        if (directory / f"{name}_{split}{suffix}").is_file():
            return directory / f"{name}_{split}{suffix}"
    raise InputError(
        where,
        f"no such file: {directory / f'{name}_{split}.jsonl'} (nor .parquet); point "
        f"data.benchmarks_dir (eval: --data-dir) or $REASONING_QAT_BENCHMARKS at a directory that has it{hub}",
    )


def hub_rows(name: str, split: str, source: str) -> list[tuple[str, dict]]:
    """("<source>[<split>] row N", row) for benchmark `name`'s `split` from a hub dataset or a local copy
    of one, through `datasets`."""
    import datasets

    try:
        dataset = datasets.load_dataset(source, _HUB_CONFIGS.get(name), split=split)
    # load_dataset raises a dozen types (no network, no such repo, config or split, a bad file), all
    # meaning that this source cannot give these rows: one line naming it, whatever the cause
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"data.hub.{name}",
            f"{source}: cannot load its {split!r} split ({reason}); without a "
            "network, point data.benchmarks_dir at local files instead",
        ) from None
    return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(dataset.to_list(), 1)]


def _check_hub_source(name: str, source: str) -> None:
    """A source that is clearly a local path must exist; `org/name` ids are left to the hub."""
    path = Path(source).expanduser()
    if (path.is_absolute() or source.startswith(("./", "../", "~"))) and not path.is_dir():
        raise InputError(f"data.hub.{name}", f"no such directory: {source}")


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
        problems.append(
            Problem(
                id=f"gsm8k-{split}-{i}", question=_field(row, "question", at, where), answer=gold, solution=solution
            )
        )
    return problems


def _math500(rows: list[tuple[str, dict]], split: str, where: str) -> list[Problem]:
    return [
        Problem(
            id=f"math500-{i}",
            question=_field(row, "problem", at, where),
            answer=str(_field(row, "answer", at, where, numbers=True)).strip(),
            solution=_field(row, "solution", at, where),
        )
        for i, (at, row) in enumerate(rows)
    ]


def _competition(name: str) -> Callable[[list[tuple[str, dict]], str, str], list[Problem]]:
    def load(rows: list[tuple[str, dict]], split: str, where: str) -> list[Problem]:
        return [
            Problem(
                id=f"{name}-{_field(row, 'id', at, where, numbers=True)}",
                question=_field(row, "problem" if "problem" in row else "question", at, where),
                answer=_integer_text(_field(row, "answer", at, where, numbers=True)),
                solution=row.get("solution"),
            )
            for at, row in rows
        ]

    return load


_FILE_LOADERS = {"gsm8k": _gsm8k, "math500": _math500, "aime24": _competition("aime24"), "amc23": _competition("amc23")}


def load_benchmark(
    name: str,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    testbed=None,
    split: str = "test",
    hub: Mapping[str, str] | None = None,
) -> list[Problem]:
    """The first `limit` problems (all when None) of benchmark `name`, split `split`.

    `testbed` is the recipe's TestbedSpec for the testbed benchmark (default TestbedSpec()); `hub` the
    recipe's `data.hub` (see the module docstring for the order of sources).
    Raises InputError for an unknown benchmark or split, a missing / unreadable / empty data source or
    a row without the fields the benchmark needs (naming the file and line).
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
    if hub and name in hub:
        rows = hub_rows(name, split, hub[name])
        source = hub[name]
    else:
        source = benchmark_file(name, split, data_dir)
        rows = read_located(source, "data_dir")
    if not rows:
        raise InputError("data_dir", f"{source}: no problems in it")
    return _FILE_LOADERS[name](rows[:limit], split, "data_dir")


def load_prompts_file(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Problems from a user's .jsonl or .parquet (recipe `data.prompts_file`): `question` (or `problem`
    / `prompt`), optional `answer` and `id`. Without an answer the problem cannot be graded."""
    where = "data.prompts_file"
    rows = read_located(Path(path).expanduser(), where)
    if not rows:
        raise InputError(where, f"{path}: no prompts in it")
    problems = []
    for i, (at, row) in enumerate(rows[:limit]):
        key = next((k for k in ("question", "problem", "prompt") if k in row), None)
        if key is None:
            raise InputError(where, f"{at}: no `question`, `problem` or `prompt`")
        answer = None if row.get("answer") in (None, "") else _field(row, "answer", at, where, numbers=True)
        problems.append(
            Problem(
                id=str(row.get("id", f"prompt-{i}")),
                question=_field(row, key, at, where),
                answer="" if answer is None else _integer_text(answer),
            )
        )
    return problems


def training_problems(data, count: int | None, seed: int, need_answers: bool, where: str) -> list[Problem]:
    """The training-domain problems of a recipe's `data` section (DataSpec): what `traces` samples
    and `rl` rewards. `need_answers`: every problem must carry a gold answer to grade against;
    `where` is the key path blamed when one does not."""
    if data.task == "testbed":
        return make_problems(data.testbed, "train", n=count, seed=seed)
    if data.task == "gsm8k":
        return load_benchmark("gsm8k", split="train", limit=count, data_dir=data.benchmarks_dir, hub=data.hub)
    if data.task == "jsonl":
        problems = load_prompts_file(data.prompts_file, limit=count)
        unanswered = next((p for p in problems if not p.answer), None)
        if need_answers and unanswered is not None:
            raise InputError(
                where, f"{data.prompts_file}: prompt {unanswered.id!r} has no `answer`, so it cannot be graded"
            )
        return problems
    raise InputError("data.task", f"{data.task} has no training split in the benchmarks")


def check_training_data(data, need_answers: bool = False, where: str = "data.prompts_file") -> list[tuple[str, str]]:
    """What `training_problems` would refuse, found at validation time: (key path, message) pairs.
    The files are read whole (a few MB at most); the testbed's spec was checked by its schema."""
    if data.task == "math500":
        return [("data.task", "math500 is a test set with no train split here; use gsm8k, testbed or jsonl")]
    if data.task == "gsm8k":
        return _check_source("gsm8k", "train", data, "data.benchmarks_dir")
    if data.task == "jsonl" and data.prompts_file is None:
        return [("data.prompts_file", "must be set when data.task is jsonl")]
    if data.task == "jsonl":
        try:
            training_problems(data, None, seed=0, need_answers=need_answers, where=where)
        except InputError as e:
            return [(e.where, e.message)]
    return []


def check_bench(bench: str, data, where: str = "bench", limit: int | None = None) -> list[tuple[str, str]]:
    """What `load_benchmark(bench, limit, ...)` would refuse, found at validation time: (key, message) pairs."""
    if bench not in BENCHMARKS:
        return [(where, f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")]
    return [] if bench == "testbed" else _check_source(bench, "test", data, where, limit)


def _check_source(name: str, split: str, data, where: str, limit: int | None = None) -> list[tuple[str, str]]:
    """A benchmark file that is missing or has a bad row, or a local hub copy that is missing, found at
    validation time (`where` blamed); a hub id is checked when loaded (it needs the network)."""
    try:
        if name in data.hub:
            _check_hub_source(name, data.hub[name])
        else:
            load_benchmark(name, split=split, limit=limit, data_dir=data.benchmarks_dir)
    except InputError as e:
        return [(where if e.where == "data_dir" else e.where, e.message)]
    return []
