"""Stage traces (and eval) on a tiny model: rows written, only_correct, recipe checks, a run through the runner;
traces.jsonl's one reader (pipeline.data.traces) as sft, kd_qat and ptq use it."""

import json
import logging
from pathlib import Path

import pytest
import yaml

import tiny_lm
from pipeline import evaluation as evaluate_module
from pipeline.data.rows import read_jsonl
from pipeline.data.testbed import TestbedSpec, make_problems
from pipeline.engine.errors import InputError
from pipeline.engine.recipe import RecipeError, parse_recipe
from pipeline.engine.stage_api import StageContext
from pipeline.generate import Completion
from pipeline.models import save_model
from stages import traces as traces_stage

DATA = Path(__file__).parent / "data"
KEYS = {"id", "question", "instruction", "answer", "completion", "correct", "num_tokens", "sample", "truncated"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), out / "model")
    return out


def recipe_for(model_dir, stage: dict, **data):
    return parse_recipe(
        {
            "name": "t",
            "seed": 0,
            "model": {"path": str(model_dir), "dtype": "float32"},
            "data": data,
            "stages": {"traces": stage},
        }
    )


def run_stage(recipe, model_dir, out_dir) -> dict:
    out_dir.mkdir()
    ctx = StageContext(
        name="traces",
        config=recipe.stages["traces"],
        recipe=recipe,
        out_dir=out_dir,
        inputs={"model": Path(model_dir)},
        input_manifests={"model": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    return traces_stage.run(ctx)


def read_rows(path):
    return read_jsonl(path, "test")


def test_testbed_traces_on_tiny_model(model_dir, tmp_path):
    stage = {
        "type": "traces",
        "model": "model",
        "count": 3,
        "generation": {"max_new_tokens": 4, "temperature": 1.0, "num_samples": 2},
    }
    recipe = recipe_for(model_dir, stage)
    metrics = run_stage(recipe, model_dir, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "traces.jsonl")
    problems = make_problems(recipe.data.testbed, "train", n=3, seed=0)
    assert [(r["id"], r["sample"]) for r in rows] == [(p.id, k) for p in problems for k in (0, 1)]
    assert all(set(r) == KEYS for r in rows)
    assert [r["answer"] for r in rows[::2]] == [p.answer for p in problems]
    assert all(r["num_tokens"] <= 4 for r in rows)
    assert metrics["count"] == 3 and metrics["generated"] == metrics["kept"] == 6
    assert metrics["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in rows) / 6)


def test_gsm8k_train_prompts(model_dir, tmp_path):
    stage = {"type": "traces", "model": "model", "count": 2, "generation": {"max_new_tokens": 3}}
    recipe = recipe_for(model_dir, stage, task="gsm8k", benchmarks_dir=str(DATA))
    run_stage(recipe, model_dir, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "traces.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("gsm8k-train-0", "72"), ("gsm8k-train-1", "10")]


def test_reference_source_writes_each_reference_solution_as_a_trace_and_generates_nothing(
    model_dir, tmp_path, monkeypatch
):
    """source: reference: GSM8K train's worked answers become the traces (the same chat the perplexity eval reads),
    graded correct, counted in the teacher's tokens; no decoding."""
    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: pytest.fail("reference traces generate nothing"))
    stage = {"type": "traces", "model": "model", "count": 2, "source": "reference"}
    recipe = recipe_for(model_dir, stage, task="gsm8k", benchmarks_dir=str(DATA))
    metrics = run_stage(recipe, model_dir, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "traces.jsonl")
    gold = [json.loads(line) for line in open(DATA / "gsm8k_train.jsonl")][:2]
    assert [r["completion"] for r in rows] == [g["answer"] for g in gold]
    assert [(r["id"], r["answer"], r["correct"]) for r in rows] == [
        ("gsm8k-train-0", "72", True),
        ("gsm8k-train-1", "10", True),
    ]
    tok = tiny_lm.tokenizer()
    assert [r["num_tokens"] for r in rows] == [
        len(tok(g["answer"], add_special_tokens=False)["input_ids"]) for g in gold
    ]
    assert metrics == {"count": 2, "generated": 0, "kept": 2, "mean_tokens": sum(r["num_tokens"] for r in rows) / 2}


def test_reference_source_without_reference_solutions_is_one_clear_error(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    stage = {"type": "traces", "model": "model", "count": 1, "source": "reference"}
    recipe = recipe_for(model_dir, stage, task="jsonl", prompts_file=str(prompts))
    with pytest.raises(InputError, match=r"stages.traces.source: reference: 1 of 1 jsonl prompts have no reference"):
        run_stage(recipe, model_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "traces.jsonl").exists()


def test_only_correct_keeps_graded_correct(model_dir, tmp_path, monkeypatch):
    problems = make_problems(TestbedSpec(), "train", n=4, seed=0)  # the recipe's default data.testbed
    solutions = {p.question: p.solution for p in problems}

    def fake_generate(
        model, tokenizer, questions, spec, instruction
    ):  # right on the 1st and 3rd prompt, wrong elsewhere
        texts = [solutions[q] if i % 2 == 0 else "\\boxed{-1}" for i, q in enumerate(questions)]
        return [[Completion(text=t, token_ids=[1, 2], num_tokens=2, truncated=False)] for t in texts]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    stage = {"type": "traces", "model": "model", "count": 4, "only_correct": True}
    metrics = run_stage(recipe_for(model_dir, stage), model_dir, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "traces.jsonl")
    assert [r["id"] for r in rows] == [problems[0].id, problems[2].id]
    assert all(r["correct"] for r in rows) and rows[0]["completion"] == problems[0].solution
    assert (metrics["generated"], metrics["kept"], metrics["accuracy"]) == (4, 2, 0.5)


@pytest.mark.parametrize(
    "stage, data, where, text",
    [
        ({"model": "model"}, {"task": "math500"}, "data.task", "no train split"),
        ({"model": "model"}, {"task": "jsonl"}, "data.prompts_file", "must be set when data.task is jsonl"),
        (
            {"model": "model"},
            {"task": "gsm8k", "benchmarks_dir": "/nonexistent"},
            "data.benchmarks_dir",
            "no such file: /nonexistent/gsm8k_train.jsonl",
        ),
        ({"model": "model", "generation": {"num_samples": 2}}, {}, "stages.traces.generation", "needs temperature > 0"),
    ],
)
def test_recipe_checks(model_dir, stage, data, where, text):
    with pytest.raises(RecipeError) as err:
        recipe_for(model_dir, {"type": "traces", **stage}, **data)
    assert any(w == where and text in m for w, m in err.value.errors), err.value.errors


def test_traces_then_eval_through_the_runner(model_dir, tmp_path, run_cli):
    recipe = {
        "name": "evalrun",
        "seed": 0,
        "model": {"path": str(model_dir), "dtype": "float32"},
        "stages": {
            "traces": {"type": "traces", "model": "model", "count": 2, "generation": {"max_new_tokens": 3}},
            "eval": {
                "type": "eval",
                "model": "model",
                "bench": "testbed",
                "limit": 2,
                "generation": {"max_new_tokens": 3},
            },
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_cli("run", path, "--artifacts", tmp_path / "art")
    assert code == 0, stderr
    assert len(read_rows(tmp_path / "art" / "evalrun" / "traces" / "traces.jsonl")) == 2
    samples = read_rows(tmp_path / "art" / "evalrun" / "eval" / "samples.jsonl")
    assert len(samples) == 2 and all(r["num_tokens"] <= 3 for r in samples)
    manifest = json.loads((tmp_path / "art" / "evalrun" / "eval" / "manifest.json").read_text())
    assert set(manifest["metrics"]) >= {"accuracy", "pass_at_k", "truncation_rate", "mean_tokens", "tokens_per_s"}


def test_only_correct_with_nothing_correct_fails_the_run(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(
        evaluate_module,
        "generate",
        lambda model, tokenizer, questions, spec, instruction: [
            [Completion(text="\\boxed{-1}", token_ids=[1], num_tokens=1, truncated=False)] for _ in questions
        ],
    )
    stage = {"type": "traces", "model": "model", "count": 2, "only_correct": True}
    with pytest.raises(RuntimeError, match="no completion was graded correct"):
        run_stage(recipe_for(model_dir, stage), model_dir, tmp_path / "out")


# -- pipeline.data.traces: the one reader of traces.jsonl --------------------------------------------------

# str.splitlines() breaks lines at each of these; a teacher can write any of them
BREAKERS = "\u2028\u2029\u0085\x1c"


@pytest.fixture
def odd_traces(model_dir, tmp_path, monkeypatch):
    """A traces stage's output whose completions hold U+2028, U+2029, U+0085 and \\x1c (the real-model crash)."""
    problems = make_problems(TestbedSpec(), "train", n=4, seed=0)
    solutions = {p.question: p.solution for p in problems}

    def fake_generate(model, tokenizer, questions, spec, instruction):  # right on the 1st and 3rd prompt
        texts = [
            f"{c}{solutions[q]}{c}" if i % 2 == 0 else f"{c}wrong \\boxed{{-1}}"
            for (i, q), c in zip(enumerate(questions), BREAKERS)
        ]
        return [[Completion(text=t, token_ids=[1, 2], num_tokens=2, truncated=False)] for t in texts]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    recipe = recipe_for(model_dir, {"type": "traces", "model": "model", "count": 4}, instruction="Answer in \\boxed{}.")
    run_stage(recipe, model_dir, tmp_path / "traces")
    return tmp_path / "traces", problems


def test_traces_with_line_separators_read_back(odd_traces, caplog):
    from pipeline.data.traces import read_traces, training_traces
    from pipeline.quant.calibration import traces_samples

    out, problems = odd_traces
    assert len((out / "traces.jsonl").read_text(encoding="utf-8").splitlines()) > 4  # what broke the old reader
    traces = read_traces(out, "stages.ptq.calibration")
    assert [t.completion[0] for t in traces] == list(BREAKERS)
    assert traces[0].completion == f"\u2028{problems[0].solution}\u2028"
    assert [t.correct for t in traces] == [True, False, True, False]
    assert {t.instruction for t in traces} == {"Answer in \\boxed{}."}
    # ptq's calibration (it crashed with JSONDecodeError here) and sft / kd_qat's training data
    tokenizer = tiny_lm.tokenizer()
    samples = traces_samples(tokenizer, out, nsamples=4, seqlen=10_000, seed=0)
    assert sorted(samples) == sorted(t.example(tokenizer)[0] for t in traces)
    with caplog.at_level(logging.INFO):
        kept = training_traces(out, only_correct=True, stage="kd_qat", log=logging.getLogger("test"))
    assert kept == [traces[0], traces[2]]
    assert "kd_qat: 2 of 4 traces kept (only_correct: true)" in caplog.text
    # the prompt a trace is trained on is the one the teacher answered
    ids, start = kept[0].example(tokenizer)
    assert "Answer in \\boxed{}." in tokenizer.decode(ids[:start]) and "Please reason" not in tokenizer.decode(ids)


def test_training_traces_with_none_correct_names_only_correct(tmp_path):
    from pipeline.data.traces import Trace, training_traces, write_traces

    write_traces(
        [
            Trace(
                id=f"p{i}",
                question="q",
                answer="1",
                completion="2",
                correct=False,
                num_tokens=1,
                sample=0,
                truncated=False,
            )
            for i in range(3)
        ],
        tmp_path,
    )
    with pytest.raises(RuntimeError) as err:
        training_traces(tmp_path, only_correct=True, stage="kd_qat", log=logging.getLogger("test"))
    assert str(err.value).startswith("stages.kd_qat.only_correct: none of the 3 traces was graded correct")
    assert "set only_correct: false" in str(err.value)
    assert len(training_traces(tmp_path, only_correct=False, stage="kd_qat", log=logging.getLogger("test"))) == 3


def test_traces_of_an_older_version_and_bad_rows(tmp_path):
    from pipeline.data.chat import BOXED_INSTRUCTION
    from pipeline.data.traces import read_traces
    from pipeline.engine.errors import InputError

    row = {
        "id": "a",
        "question": "q",
        "answer": "1",
        "completion": "c",
        "correct": True,
        "num_tokens": 1,
        "sample": 0,
        "truncated": False,
    }  # written before traces recorded their instruction
    (tmp_path / "traces.jsonl").write_text(json.dumps(row) + "\n")
    assert read_traces(tmp_path, "x")[0].instruction == BOXED_INSTRUCTION
    (tmp_path / "traces.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "correct": "maybe"}) + "\n")
    with pytest.raises(InputError, match="traces.jsonl: row 2: correct: input should be a valid boolean"):
        read_traces(tmp_path, "stages.sft.data")
    with pytest.raises(InputError, match="not found \\(is it a traces stage\\?\\)"):
        read_traces(tmp_path / "elsewhere", "stages.sft.data")
