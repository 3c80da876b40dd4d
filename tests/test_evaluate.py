"""Evaluator: avg@K / pass@K / truncation / token arithmetic on controlled completions; the eval CLI."""
import json
from pathlib import Path

import pytest

import tiny_lm
from pipeline import evaluate as evaluate_module
from pipeline.data import Problem
from pipeline.evaluate import evaluate
from pipeline.generate import Completion, GenerationSpec
from pipeline.models import save_model

DATA = Path(__file__).parent / "data"

PROBLEMS = [Problem(id="a", question="1+1?", answer="2"), Problem(id="b", question="2+2?", answer="4"),
            Problem(id="c", question="3+3?", answer="6")]
# K = 3 completions per problem, as (text, num_tokens, truncated): a has 2/3 right, b 1/3, c 0/3
SCRIPT = {
    "1+1?": [("<think>1+1</think> \\boxed{2}", 10, False), ("\\boxed{2}", 4, False), ("\\boxed{3}", 6, False)],
    "2+2?": [("<think>\\boxed{4}</think> so 5", 20, True), ("#### 4", 8, False), ("it is 5", 12, True)],
    "3+3?": [("\\boxed{7}", 5, False), ("", 30, True), ("6 or 7", 5, False)],
}


@pytest.fixture
def scripted(monkeypatch):
    def fake_generate(model, tokenizer, questions, spec):
        return [[Completion(text=t, token_ids=[0] * n, num_tokens=n, truncated=tr) for t, n, tr in SCRIPT[q]]
                for q in questions]

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)


def test_metrics_avg_and_pass_at_k(scripted, tmp_path):
    spec = GenerationSpec(temperature=1.0, num_samples=3)
    metrics = evaluate(None, None, PROBLEMS, spec, samples_path=tmp_path / "s.jsonl")
    assert metrics["accuracy"] == pytest.approx(3 / 9)  # avg@3: (2 + 1 + 0) / 9
    assert metrics["pass_at_k"] == pytest.approx(2 / 3)  # a and b have a correct sample
    assert metrics["truncation_rate"] == pytest.approx(3 / 9)
    assert metrics["mean_tokens"] == pytest.approx(100 / 9)
    assert (metrics["num_problems"], metrics["num_samples"]) == (3, 3)
    assert metrics["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"], r["correct"]) for r in rows] == [
        ("a", 0, True), ("a", 1, True), ("a", 2, False), ("b", 0, False), ("b", 1, True), ("b", 2, False),
        ("c", 0, False), ("c", 1, False), ("c", 2, False)]
    assert rows[3] == {"id": "b", "question": "2+2?", "gold": "4", "sample": 0,
                       "completion": "<think>\\boxed{4}</think> so 5", "num_tokens": 20, "truncated": True,
                       "correct": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), out)
    return out.parent  # a stage directory: the model is in its model/ folder


def test_cli_eval_on_tiny_model(run_cli, model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, stderr = run_cli("eval", model_dir, "--bench", "gsm8k", "--data-dir", DATA, "--limit", "3",
                                   "--max-new-tokens", "5", "--out", out)
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert all(r["num_tokens"] <= 5 and isinstance(r["correct"], bool) for r in rows)
    assert "accuracy" in stdout and "pass@1" in stdout and "tokens/s" in stdout


def test_cli_eval_testbed_k_samples(run_cli, model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, stderr = run_cli("eval", model_dir, "--limit", "2", "--samples", "2", "--temperature", "1",
                                   "--max-new-tokens", "4", "--out", out)
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 0, 1]
    assert "avg@2" in stdout and "pass@2" in stdout


@pytest.mark.parametrize("args, message", [
    (["--bench", "gsm9k"], "bench: unknown benchmark 'gsm9k'"),
    (["--bench", "math500", "--data-dir", "{tmp}"], "data_dir: no such file: {tmp}/math500_test.jsonl"),
    (["--samples", "4"], "--samples: num_samples > 1 needs temperature > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens:"),
    (["--limit", "0"], "limit: must be >= 1"),
    (["--limit", "1000000000000000"], "limit: must be <= 1000000"),
    (["--out", "{tmp}"], "--out: {tmp} is a directory; give a file name"),
    (["--out", "{tmp}/a_file/samples.jsonl"], "--out: {tmp}/a_file is a file, so {tmp}/a_file/samples.jsonl cannot"),
    (["--out", "{tmp}/a_file/x/samples.jsonl"], "--out: {tmp}/a_file is a file"),
])
def test_cli_eval_bad_input_exit_2(run_cli, model_dir, tmp_path, args, message, monkeypatch):
    (tmp_path / "a_file").write_text("")
    # bad input is found before the model is loaded or anything is generated
    monkeypatch.setattr("pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, stdout, stderr = run_cli("eval", model_dir, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert message.format(tmp=tmp_path) in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_cli_eval_bad_model_dir_exit_2(run_cli, model_dir, tmp_path):
    code, _, stderr = run_cli("eval", tmp_path / "nope")
    assert code == 2 and f"MODEL_DIR: no such directory: {tmp_path / 'nope'}" in stderr
    code, _, stderr = run_cli("eval", tmp_path)
    assert code == 2 and "holds no model" in stderr
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / "model" / name).read_bytes())
    code, _, stderr = run_cli("eval", no_tokenizer)
    assert code == 2 and "has no tokenizer" in stderr


def test_solution_perplexity_matches_the_models_own_loss():
    """exp of the token-weighted mean of transformers' own per-example loss (labels on the solution)."""
    import math

    import torch

    from pipeline.data import chat_example
    from pipeline.evaluate import solution_perplexity
    from pipeline.tasks.testbed import TestbedSpec, make_problems

    model, tokenizer = tiny_lm.model().eval(), tiny_lm.tokenizer()
    problems = make_problems(TestbedSpec(), "test", n=5)
    nll, count = 0.0, 0
    for p in problems:
        ids, start = chat_example(tokenizer, p.question, p.solution)
        labels = torch.tensor([[-100] * start + ids[start:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        nll, count = nll + loss * (len(ids) - start), count + len(ids) - start
    result = solution_perplexity(model, tokenizer, problems, batch_size=2)  # padded batches, an odd last one
    assert result["perplexity_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_solution_perplexity_needs_reference_solutions():
    from pipeline.errors import InputError
    from pipeline.evaluate import solution_perplexity

    with pytest.raises(InputError, match="3 problems have no reference solution"):
        solution_perplexity(tiny_lm.model(), tiny_lm.tokenizer(), PROBLEMS)
