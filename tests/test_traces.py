"""Stage traces (and eval) on a tiny model: rows written, only_correct, recipe checks, a run through the runner."""
import json
import logging
from pathlib import Path

import pytest
import yaml

import tiny_lm
from pipeline import evaluate as evaluate_module
from pipeline.generate import Completion
from pipeline.models import save_model
from pipeline.recipe import RecipeError, parse_recipe
from pipeline.stage_api import StageContext
from pipeline.tasks.testbed import TestbedSpec, make_problems
from stages import traces as traces_stage

DATA = Path(__file__).parent / "data"
KEYS = {"id", "question", "answer", "completion", "correct", "num_tokens", "sample", "truncated"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), out / "model")
    return out


def recipe_for(model_dir, stage: dict, **data):
    return parse_recipe({"name": "t", "seed": 0, "model": {"path": str(model_dir), "dtype": "float32"},
                         "data": data, "stages": {"traces": stage}})


def run_stage(recipe, model_dir, out_dir) -> dict:
    out_dir.mkdir()
    ctx = StageContext(name="traces", config=recipe.stages["traces"], recipe=recipe, out_dir=out_dir,
                       inputs={"model": Path(model_dir)}, input_manifests={"model": {}}, checkpointer=None,
                       log=logging.getLogger("test"))
    return traces_stage.run(ctx)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_testbed_traces_on_tiny_model(model_dir, tmp_path):
    stage = {"type": "traces", "model": "model", "count": 3,
             "generation": {"max_new_tokens": 4, "temperature": 1.0, "num_samples": 2}}
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


def test_only_correct_keeps_graded_correct(model_dir, tmp_path, monkeypatch):
    problems = make_problems(TestbedSpec(), "train", n=4, seed=0)  # the recipe's default data.testbed
    solutions = {p.question: p.solution for p in problems}

    def fake_generate(model, tokenizer, questions, spec):  # right on the 1st and 3rd prompt, wrong elsewhere
        texts = [solutions[q] if i % 2 == 0 else "\\boxed{-1}" for i, q in enumerate(questions)]
        return [[Completion(text=t, token_ids=[1, 2], num_tokens=2, truncated=False)] for t in texts]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)
    stage = {"type": "traces", "model": "model", "count": 4, "only_correct": True}
    metrics = run_stage(recipe_for(model_dir, stage), model_dir, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "traces.jsonl")
    assert [r["id"] for r in rows] == [problems[0].id, problems[2].id]
    assert all(r["correct"] for r in rows) and rows[0]["completion"] == problems[0].solution
    assert (metrics["generated"], metrics["kept"], metrics["accuracy"]) == (4, 2, 0.5)


@pytest.mark.parametrize("stage, data, where, text", [
    ({"model": "model"}, {"task": "math500"}, "data.task", "no train split"),
    ({"model": "model"}, {"task": "jsonl"}, "data.prompts_file", "must be set when data.task is jsonl"),
    ({"model": "model"}, {"task": "gsm8k", "benchmarks_dir": "/nonexistent"}, "data.benchmarks_dir",
     "no such file: /nonexistent/gsm8k_train.jsonl"),
    ({"model": "model", "generation": {"num_samples": 2}}, {}, "stages.traces.generation", "needs temperature > 0"),
])
def test_recipe_checks(model_dir, stage, data, where, text):
    with pytest.raises(RecipeError) as err:
        recipe_for(model_dir, {"type": "traces", **stage}, **data)
    assert any(w == where and text in m for w, m in err.value.errors), err.value.errors


def test_traces_then_eval_through_the_runner(model_dir, tmp_path, run_cli):
    recipe = {"name": "evalrun", "seed": 0, "model": {"path": str(model_dir), "dtype": "float32"},
              "stages": {"traces": {"type": "traces", "model": "model", "count": 2, "generation": {"max_new_tokens": 3}},
                         "eval": {"type": "eval", "model": "model", "bench": "testbed", "limit": 2,
                                  "generation": {"max_new_tokens": 3}}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_cli("run", path, "--artifacts", tmp_path / "art")
    assert code == 0, stderr
    assert len(read_rows(tmp_path / "art" / "evalrun" / "traces" / "traces.jsonl")) == 2
    samples = read_rows(tmp_path / "art" / "evalrun" / "eval" / "samples.jsonl")
    assert len(samples) == 2 and all(r["num_tokens"] <= 3 for r in samples)
    manifest = json.loads((tmp_path / "art" / "evalrun" / "eval" / "manifest.json").read_text())
    assert set(manifest["metrics"]) >= {"accuracy", "pass_at_k", "truncation_rate", "mean_tokens", "tokens_per_s"}
