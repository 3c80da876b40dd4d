"""Benchmark loading from the slices in tests/data: fields, gold normalisation, splits, bad input."""

from pathlib import Path

import pytest

from pipeline.data import benchmarks, testbed
from pipeline.data.benchmarks import load_benchmark, load_prompts_file
from pipeline.data.rows import read_rows
from pipeline.engine.errors import InputError

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
    assert [p.answer for p in problems] == [
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "p - q",
        "\\frac{14}{3}",
        "9",
        "\\text{Evelyn}",
    ]
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


@pytest.mark.parametrize(
    "kwargs, where, text",
    [
        ({"name": "gsm9k"}, "bench", "unknown benchmark 'gsm9k'"),
        ({"name": "math500", "split": "train"}, "split", "math500 has no 'train' split"),
        ({"name": "gsm8k", "limit": 0}, "limit", "must be >= 1"),
    ],
)
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
    path.write_text('{"question": "1+1?"}\n\n{"answer": 2}\n')
    with pytest.raises(InputError, match=f"{path}:3: no `question`, `problem` or `prompt`$"):
        load_prompts_file(path)


# (file name, content, the message after "data_dir: <tmp>/"): every bad file names itself and its line
BAD_FILES = [
    (
        "gsm8k_test.jsonl",
        '{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n',
        "gsm8k_test.jsonl:2: no `answer`",
    ),
    ("gsm8k_test.jsonl", '{"question": "q", "answer": 18}\n', "gsm8k_test.jsonl:1: `answer` must be a string, got 18"),
    (
        "gsm8k_test.jsonl",
        '{"question": "q", "answer": "so 18"}\n',
        "gsm8k_test.jsonl:1: `answer` does not end in `#### <final answer>`",
    ),
    (
        "gsm8k_test.jsonl",
        '{"question": ["q"], "answer": "#### 1"}\n',
        'gsm8k_test.jsonl:1: `question` must be a string, got ["q"]',
    ),
    (
        "math500_test.jsonl",
        '{"problem": "p", "answer": {"x": 1}, "solution": "s"}\n',
        'math500_test.jsonl:1: `answer` must be a string or a number, got {"x": 1}',
    ),
    (
        "math500_test.jsonl",
        '{"problem": "p", "answer": " ", "solution": "s"}\n',
        "math500_test.jsonl:1: `answer` is empty",
    ),
    (
        "amc23_test.jsonl",
        '{"id": 0, "problem": "p", "answer": true}\n',
        "amc23_test.jsonl:1: `answer` must be a string or a number, got true",
    ),
    (
        "amc23_test.jsonl",
        '{"id": 0, "problem": "p", "answer": NaN}\n',
        "amc23_test.jsonl:1: `answer` must be a string or a number, got NaN",
    ),
    ("aime24_test.jsonl", '{"problem": "p", "answer": 3}\n', "aime24_test.jsonl:1: no `id`"),
    ("aime24_test.jsonl", "[1, 2]\n", "aime24_test.jsonl:1: expected a JSON object, got [1, 2]"),
    ("aime24_test.jsonl", "\n\n", "aime24_test.jsonl: no problems in it"),
    (
        "aime24_test.jsonl",
        b'{"id": 1}\n\x1f\x8b\x08\x00\xff\n',
        "aime24_test.jsonl:2: not UTF-8 text (is it a jsonl file?)",
    ),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[m for _, _, m in BAD_FILES])
def test_bad_benchmark_file_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(InputError) as err:
        load_benchmark(name.split("_")[0], data_dir=tmp_path)
    assert str(err.value) == f"data_dir: {tmp_path}/{message}"


def test_limit_is_bounded():
    with pytest.raises(InputError, match=f"must be <= {testbed.MAX_PROBLEMS}, got 1000000000000000"):
        load_benchmark("testbed", limit=10**15)


@pytest.mark.skipif(not hasattr(testbed, "make_problems"), reason="the testbed generator has not landed yet")
def test_testbed_benchmark_is_the_test_split():
    spec = testbed.TestbedSpec(test_size=7)
    problems = load_benchmark("testbed", testbed=spec)
    assert [p.id for p in problems] == [p.id for p in testbed.make_problems(spec, "test")]
    assert len(load_benchmark("testbed", testbed=spec, limit=3)) == 3


# -- sources: parquet files, hub datasets (through `datasets`, here a local copy), no default directory --


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_files_load_like_jsonl(tmp_path):
    rows = read_rows(DATA / "math500_test.jsonl", "x")
    _write_parquet(rows, tmp_path / "math500_test.parquet")
    assert load_benchmark("math500", data_dir=tmp_path) == load_benchmark("math500", data_dir=DATA)


@pytest.fixture
def hub_copies(tmp_path, monkeypatch):
    """Local copies of openai/gsm8k (config `main`, parquet shards, a card declaring them) and
    HuggingFaceH4/MATH-500 (one test.jsonl), laid out as the hub stores them; datasets' cache in tmp."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    gsm8k = tmp_path / "gsm8k"
    for split in ("train", "test"):
        _write_parquet(
            read_rows(DATA / f"gsm8k_{split}.jsonl", "x"), gsm8k / "main" / f"{split}-00000-of-00001.parquet"
        )
    (gsm8k / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
        "    path: main/train-*\n  - split: test\n    path: main/test-*\n---\n"
    )
    math500 = tmp_path / "math500"
    math500.mkdir()
    (math500 / "test.jsonl").write_text((DATA / "math500_test.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return gsm8k, math500


def test_hub_datasets_through_datasets(hub_copies, tmp_path):
    gsm8k, math500 = hub_copies
    hub = {"gsm8k": str(gsm8k), "math500": str(math500)}
    assert load_benchmark("gsm8k", limit=5, hub=hub) == load_benchmark("gsm8k", limit=5, data_dir=DATA)
    assert load_benchmark("gsm8k", split="train", hub=hub) == load_benchmark("gsm8k", split="train", data_dir=DATA)
    assert load_benchmark("math500", hub=hub) == load_benchmark("math500", data_dir=DATA)


def test_hub_source_that_cannot_load(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as err:
        load_benchmark("gsm8k", hub={"gsm8k": "openai/gsm8k"})
    assert err.value.where == "data.hub.gsm8k"
    assert err.value.message.startswith("openai/gsm8k: cannot load its 'test' split (")
    assert err.value.message.endswith("without a network, point data.benchmarks_dir at local files instead")
    assert "\n" not in str(err.value)


NO_DIRECTORY = (
    "no benchmark directory is set, where the benchmarks not read from the hub are files "
    "(<dir>/<bench>_<split>.jsonl or .parquet; the testbed needs none): "
)


def test_no_benchmark_directory_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv("REASONING_QAT_BENCHMARKS", raising=False)
    assert benchmarks.benchmarks_dir() is None
    with pytest.raises(InputError) as err:
        load_benchmark("gsm8k")
    assert str(err.value) == (
        f"data.benchmarks_dir: {NO_DIRECTORY}set data.benchmarks_dir (--set data.benchmarks_dir=DIR) or "
        "$REASONING_QAT_BENCHMARKS, or read gsm8k / math500 through data.hub (openai/gsm8k, HuggingFaceH4/MATH-500)"
    )


def test_a_missing_benchmark_directory_is_one_line_naming_the_commands_ways_out(monkeypatch, run_cli, tmp_path):
    """Every stage that reads a benchmark needs the same directory: one line however many stages and benchmarks
    (the shipped recipe's evals read gsm8k and math500, its traces gsm8k train); `--set` only where the command has
    it, `--data-dir` only for `eval`."""
    monkeypatch.delenv("REASONING_QAT_BENCHMARKS", raising=False)
    code, stdout, stderr = run_cli("validate", "qwen3-0.6b-w3g128")
    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        f"data.benchmarks_dir: {NO_DIRECTORY}set data.benchmarks_dir (--set data.benchmarks_dir=DIR) or "
        "$REASONING_QAT_BENCHMARKS, or read gsm8k / math500 through data.hub (openai/gsm8k, HuggingFaceH4/MATH-500)"
    ]
    code, stdout, stderr = run_cli("eval", tmp_path, "--bench", "gsm8k")
    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        f"--data-dir: {NO_DIRECTORY}pass --data-dir DIR or set $REASONING_QAT_BENCHMARKS, "
        "or read gsm8k / math500 with --hub (openai/gsm8k, HuggingFaceH4/MATH-500)"
    ]
    code, stdout, stderr = run_cli("eval", tmp_path, "--bench", "gsm8k", "--recipe", "qwen3-0.6b-w3g128")
    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        f"data.benchmarks_dir: {NO_DIRECTORY}set it in the recipe or set $REASONING_QAT_BENCHMARKS"
    ]


def test_validation_finds_missing_sources(monkeypatch, tmp_path):
    from pipeline.data.benchmarks import check_bench, check_training_data
    from pipeline.data.spec import DataSpec

    monkeypatch.delenv("REASONING_QAT_BENCHMARKS", raising=False)
    assert check_bench("gsm8k", DataSpec(benchmarks_dir=str(DATA))) == []
    [(where, message)] = check_bench("aime24", DataSpec(benchmarks_dir=str(tmp_path)), "stages.e.bench")
    assert where == "stages.e.bench" and message == (
        f"no such file: {tmp_path}/aime24_test.jsonl (nor .parquet); point data.benchmarks_dir (eval: --data-dir) "
        "or $REASONING_QAT_BENCHMARKS at a directory that has it"
    )
    assert check_bench("math500", DataSpec(hub={"math500": "HuggingFaceH4/MATH-500"})) == []  # loaded at run time
    assert check_bench("math500", DataSpec(hub={"math500": str(tmp_path / "nope")})) == [
        ("data.hub.math500", f"no such directory: {tmp_path / 'nope'}")
    ]
    [(where, message)] = check_training_data(DataSpec(task="gsm8k"))
    assert where == "data.benchmarks_dir" and message.startswith(NO_DIRECTORY)
    assert check_training_data(DataSpec(task="jsonl", prompts_file=str(tmp_path / "p.jsonl"))) == [
        ("data.prompts_file", f"no such file: {tmp_path / 'p.jsonl'}")
    ]


def test_prompts_file_parquet(tmp_path):
    _write_parquet([{"problem": "1+1?", "answer": 2.0}, {"problem": "2+2?", "answer": None}], tmp_path / "p.parquet")
    problems = load_prompts_file(tmp_path / "p.parquet")
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "")]
