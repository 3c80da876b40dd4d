"""Evaluator: avg@K / pass@K / truncation / token arithmetic on controlled completions; the eval CLI."""

import json
from pathlib import Path

import pytest

import tiny_lm
from pipeline import evaluation as evaluate_module
from pipeline.data.problem import Problem
from pipeline.evaluation import evaluate
from pipeline.generate import Completion, GenerationSpec
from pipeline.models import save_model

DATA = Path(__file__).parent / "data"

PROBLEMS = [
    Problem(id="a", question="1+1?", answer="2"),
    Problem(id="b", question="2+2?", answer="4"),
    Problem(id="c", question="3+3?", answer="6"),
]
# K = 3 completions per problem, as (text, num_tokens, truncated): a has 2/3 right, b 1/3, c 0/3
SCRIPT = {
    "1+1?": [("<think>1+1</think> \\boxed{2}", 10, False), ("\\boxed{2}", 4, False), ("\\boxed{3}", 6, False)],
    "2+2?": [("<think>\\boxed{4}</think> so 5", 20, True), ("#### 4", 8, False), ("it is 5", 12, True)],
    "3+3?": [("\\boxed{7}", 5, False), ("", 30, True), ("6 or 7", 5, False)],
}


@pytest.fixture
def scripted(monkeypatch):
    def fake_generate(model, tokenizer, questions, spec, instruction):
        return [
            [Completion(text=t, token_ids=[0] * n, num_tokens=n, truncated=tr) for t, n, tr in SCRIPT[q]]
            for q in questions
        ]

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
        ("a", 0, True),
        ("a", 1, True),
        ("a", 2, False),
        ("b", 0, False),
        ("b", 1, True),
        ("b", 2, False),
        ("c", 0, False),
        ("c", 1, False),
        ("c", 2, False),
    ]
    assert rows[3] == {
        "id": "b",
        "question": "2+2?",
        "gold": "4",
        "sample": 0,
        "completion": "<think>\\boxed{4}</think> so 5",
        "num_tokens": 20,
        "truncated": True,
        "correct": False,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), out)
    return out.parent  # a stage directory: the model is in its model/ folder


def test_cli_eval_on_tiny_model(run_cli, model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, stderr = run_cli(
        "eval", model_dir, "--bench", "gsm8k", "--data-dir", DATA, "--limit", "3", "--max-new-tokens", "5", "--out", out
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert all(r["num_tokens"] <= 5 and isinstance(r["correct"], bool) for r in rows)
    assert "accuracy" in stdout and "pass@1" in stdout and "tokens/s" in stdout


def test_cli_eval_testbed_k_samples(run_cli, model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    code, stdout, stderr = run_cli(
        "eval", model_dir, "--limit", "2", "--samples", "2", "--temperature", "1", "--max-new-tokens", "4", "--out", out
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 0, 1]
    assert "avg@2" in stdout and "pass@2" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bench", "gsm9k"], "bench: unknown benchmark 'gsm9k'"),
        (["--bench", "math500", "--data-dir", "{tmp}"], "data_dir: no such file: {tmp}/math500_test.jsonl"),
        (["--samples", "4"], "--samples: num_samples > 1 needs temperature > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens:"),
        (["--limit", "0"], "limit: must be >= 1"),
        (["--limit", "1000000000000000"], "limit: must be <= 1000000"),
        (["--out", "{tmp}"], "--out: {tmp} is a directory; give a file name"),
        (
            ["--out", "{tmp}/a_file/samples.jsonl"],
            "--out: {tmp}/a_file is a file, so {tmp}/a_file/samples.jsonl cannot",
        ),
        (["--out", "{tmp}/a_file/x/samples.jsonl"], "--out: {tmp}/a_file is a file"),
        (["--out", "/proc/samples.jsonl"], "--out: /proc/samples.jsonl cannot be created ("),  # root too
    ],
)
def test_cli_eval_bad_input_exit_2(run_cli, model_dir, tmp_path, args, message, monkeypatch):
    (tmp_path / "a_file").write_text("")
    # bad input is found before the model is loaded or anything is generated
    monkeypatch.setattr("pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, stdout, stderr = run_cli("eval", model_dir, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert message.format(tmp=tmp_path) in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-length", "16"], "--max-length: sets the windows of --text, which is not given; drop it or add --text"),
        (
            ["--perplexity", "--max-new-tokens", "4"],
            "--max-new-tokens: perplexity is teacher-forced, nothing is generated; "
            "drop --max-new-tokens or --perplexity",
        ),
        (
            ["--text", "{tmp}/t.jsonl", "--samples", "3", "--temperature", "0.5"],
            "--temperature: perplexity is teacher-forced, nothing is generated; drop --temperature or --text",
        ),
        (
            ["--text", "{tmp}/t.jsonl", "--bench", "math500", "--limit", "1"],
            "--bench: --text measures its own file, not a benchmark; drop --bench or --text",
        ),
        (
            ["--text", "{tmp}/t.jsonl", "--limit", "1"],
            "--limit: --text measures its own file, not a benchmark; drop --limit or --text",
        ),
        (
            ["--text", "{tmp}/t.jsonl", "--out", "{tmp}/s.jsonl"],
            "--out: perplexity generates no samples to write; drop --out or --text",
        ),
        (
            ["--bench", "gsm8k", "--hub", "openai/gsm8k", "--data-dir", str(DATA)],
            "--hub: reads --bench from the hub, --data-dir from files; give one of them",
        ),
    ],
)
def test_cli_eval_refuses_flags_its_measurement_ignores(run_cli, model_dir, tmp_path, args, message, monkeypatch):
    """A flag the chosen measurement would ignore: exit 2, one line naming it and the flag that makes it moot,
    before anything is read, loaded or written."""
    monkeypatch.setattr("pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, stdout, stderr = run_cli("eval", model_dir, *[a.format(tmp=tmp_path) for a in args])
    assert (code, stdout, stderr) == (2, "", message.format(tmp=tmp_path) + "\n")
    assert list(tmp_path.iterdir()) == []


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

    from pipeline.data.chat import chat_example
    from pipeline.data.testbed import TestbedSpec, make_problems
    from pipeline.evaluation import solution_perplexity

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
    from pipeline.engine.errors import InputError
    from pipeline.evaluation import solution_perplexity

    with pytest.raises(InputError, match="3 problems have no reference solution"):
        solution_perplexity(tiny_lm.model(), tiny_lm.tokenizer(), PROBLEMS)


# -- perplexity and KL to a teacher on any text ---------------------------------------------------------

TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting.\u2028Yesterday, she just did 50 minutes of babysitting.",
    "x",
]


def test_text_perplexity_matches_the_models_own_loss():
    """Windows of max_length tokens, each measured on all but its first token, as transformers' loss is."""
    import math

    import torch

    from pipeline.evaluation import perplexity, text_examples

    model, tokenizer = tiny_lm.model().eval(), tiny_lm.tokenizer()
    examples = text_examples(tokenizer, TEXTS, max_length=16)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    windows = [i[s : s + 16] for i in ids for s in range(0, len(i), 16) if len(i) - s > 1]
    assert [e[0] for e in examples] == windows and len(windows) > len(TEXTS)  # cut into windows; "x" has 1 token
    nll, count = 0.0, 0
    for window in windows:
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([window]), labels=torch.tensor([window])).loss.item()
        nll, count = nll + loss * (len(window) - 1), count + len(window) - 1
    result = perplexity(model, examples, tokenizer.pad_token_id, batch_size=3)
    assert result == {"perplexity": pytest.approx(math.exp(nll / count), rel=1e-5), "perplexity_tokens": count}


def test_kl_to_teacher_matches_full_logits():
    import torch
    import torch.nn.functional as F

    from pipeline.data.testbed import TestbedSpec, make_problems
    from pipeline.evaluation import perplexity, solution_examples

    student, teacher, tokenizer = tiny_lm.model(0), tiny_lm.model(1), tiny_lm.tokenizer()
    examples = solution_examples(tokenizer, make_problems(TestbedSpec(), "test", n=3))
    kl, count = 0.0, 0
    for ids, start in examples:
        with torch.no_grad():
            s, t = (m(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1] for m in (student, teacher))
        kl += F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum").item()
        count += len(ids) - start
    result = perplexity(student, examples, tokenizer.pad_token_id, teacher=teacher, batch_size=2, chunk_size=7)
    assert result["perplexity_tokens"] == count
    assert result["kl_to_teacher"] == pytest.approx(kl / count, rel=1e-5)
    assert perplexity(student, examples, tokenizer.pad_token_id, teacher=student)["kl_to_teacher"] == 0.0


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    save_model(tiny_lm.model(1), tiny_lm.tokenizer(), out)
    return out


def test_cli_perplexity_of_reference_solutions(run_cli, model_dir, teacher_dir):
    from pipeline.data.benchmarks import load_benchmark
    from pipeline.evaluation import solution_perplexity

    code, stdout, stderr = run_cli(
        "eval",
        model_dir,
        "--perplexity",
        "--bench",
        "gsm8k",
        "--data-dir",
        DATA,
        "--limit",
        "3",
        "--teacher",
        teacher_dir,
    )
    assert code == 0, stderr
    expected = solution_perplexity(
        tiny_lm.model(), tiny_lm.tokenizer(), load_benchmark("gsm8k", 3, DATA), teacher=tiny_lm.model(1)
    )
    assert "reference solutions" in stdout
    assert f"{expected['perplexity']:.4f}" in stdout and str(expected["perplexity_tokens"]) in stdout
    assert f"{expected['kl_to_teacher']:.4f}" in stdout and "accuracy" not in stdout


def test_cli_perplexity_of_text(run_cli, model_dir, tmp_path):
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    code, stdout, stderr = run_cli("eval", model_dir, "--text", text, "--max-length", "16", "--batch-size", "2")
    assert code == 0, stderr
    assert "perplexity" in stdout and "KL" not in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--perplexity", "--out", "{tmp}/s.jsonl"], "--out: perplexity generates no samples to write"),
        (["--teacher", "{tmp}/nope"], "--teacher: no such directory: {tmp}/nope"),
        (["--text", "{tmp}/nope.jsonl"], "--text: no such file: {tmp}/nope.jsonl"),
        (["--text", "{tmp}", "--max-length", "1"], "--max-length: must be >= 2, got 1"),
        (
            ["--perplexity", "--bench", "amc23", "--data-dir", str(DATA)],
            "perplexity: 5 problems have no reference solution",
        ),
        (["--hub", "x/y"], "--hub: testbed is not read from the hub here; --hub serves gsm8k, math500"),
    ],
)
def test_cli_perplexity_bad_input_exit_2(run_cli, model_dir, tmp_path, args, message):
    code, stdout, stderr = run_cli("eval", model_dir, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(message.format(tmp=tmp_path))


@pytest.fixture
def base_model_dir(tmp_path):
    """A tiny model saved with a tokenizer that has no chat template (a base model)."""
    import chat_tokenizers

    save_model(tiny_lm.model(), chat_tokenizers.plain(None), tmp_path / "base")
    return tmp_path / "base"


def test_cli_eval_of_a_model_without_chat_template(base_model_dir, run_cli, tmp_path):  # saved before capture
    """Generation and solution perplexity need the chat template (exit 2, one line); text perplexity does not."""
    base = base_model_dir
    code, _, stderr = run_cli("eval", base, "--limit", "1")
    assert code == 2 and stderr.strip().startswith(f"MODEL_DIR: {base} has no chat template")
    assert len(stderr.strip().splitlines()) == 1
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "What is 2 + 3?"}) + "\n")
    code, stdout, stderr = run_cli("eval", base, "--text", text)
    assert code == 0, stderr


def test_eval_stage_perplexity_only(model_dir, teacher_dir, tmp_path, run_cli):
    """`generate: false`: no samples, perplexity of GSM8K solutions and of a text file, KL to a teacher."""
    import yaml

    from pipeline.data.benchmarks import load_benchmark
    from pipeline.evaluation import solution_perplexity

    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    recipe = {
        "name": "ppl",
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"benchmarks_dir": str(DATA)},
        "stages": {
            "teacher": {
                "type": "eval",
                "model": "model",
                "bench": "gsm8k",
                "limit": 3,
                "generate": False,
                "perplexity": True,
            },
            "text_kl": {
                "type": "eval",
                "model": "model",
                "generate": False,
                "perplexity": True,
                "text": str(text),
                "max_length": 16,
                "teacher": "model",
            },
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = run_cli("run", path, "--artifacts", tmp_path / "art")
    assert code == 0, stderr
    read = lambda stage: json.loads((tmp_path / "art" / "ppl" / stage / "manifest.json").read_text())["metrics"]  # noqa: E731
    expected = solution_perplexity(tiny_lm.model(), tiny_lm.tokenizer(), load_benchmark("gsm8k", 3, DATA))
    assert read("teacher") == pytest.approx(expected, rel=1e-6)
    assert set(read("text_kl")) == {"perplexity", "perplexity_tokens", "kl_to_teacher"}
    assert read("text_kl")["kl_to_teacher"] == 0.0  # the model against itself
    assert not (tmp_path / "art" / "ppl" / "teacher" / "samples.jsonl").exists()


@pytest.mark.parametrize(
    "stage, where, message",
    [
        ({"generate": False}, "stages.e", "generate and perplexity are both false: nothing to evaluate"),
        ({"teacher": "model"}, "stages.e", "text and teacher apply to the perplexity: set perplexity: true"),
        ({"perplexity": True, "text": "/nonexistent.jsonl"}, "stages.e.text", "no such file: /nonexistent.jsonl"),
    ],
)
def test_eval_stage_recipe_errors(model_dir, stage, where, message):
    from pipeline.engine.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                "name": "t",
                "model": {"path": str(model_dir)},
                "stages": {"e": {"type": "eval", "model": "model", **stage}},
            }
        )
    assert (where, message) in err.value.errors
