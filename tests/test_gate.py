"""Stage `gate` with the real engine: a failing gate skips the RL stage (exit 0, `skipped` in status,
downstream reads the passthrough), `--force` runs it anyway with a warning; the verdict's numbers."""

import json

import pytest
import yaml

import stages.gate as gate
from pipeline.engine.recipe import RecipeError, parse_recipe
from quant_tiny import one_thread, save_tiny

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_hidden_layers": 1}
SHORT = {"max_new_tokens": 4}
STAGES = {
    "ptq": {
        "type": "ptq",
        "model": "model",
        "method": "rtn",
        "calibration_source": "generic",
        "nsamples": 1,
        "seqlen": 32,
        "sqnr_samples": 1,
    },
    "gate": {
        "type": "gate",
        "model": "ptq",
        "teacher": "model",
        "min_accuracy": 0.5,
        "min_retention": 0.8,
        "limit": 2,
        "generation": SHORT,
    },
    "rl": {
        "type": "rl",
        "init": "ptq",
        "when": "gate",
        "steps": 1,
        "batch_size": 4,
        "num_generations": 2,
        "count": 4,
        "max_completion_length": 4,
        "gradient_checkpointing": False,
        "checkpoint_every": 0,
    },
    "eval": {"type": "eval", "model": "rl", "limit": 2, "generation": SHORT},
}


@pytest.fixture
def recipe(tmp_path):
    model = save_tiny(tmp_path / "base", **SHAPE)
    raw = {
        "name": "g",
        "seed": 0,
        "model": {"path": str(model), "dtype": "float32"},
        "quant": "w3g128",
        "data": {"testbed": {"train_size": 8, "test_size": 2}},
        "stages": STAGES,
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def status(run_cli, recipe, art):
    code, out, err = run_cli("status", recipe, "--artifacts", art, "--json")
    assert code == 0, err
    return {row["name"]: (row["state"], row["reason"]) for row in json.loads(out)["stages"]}


def manifest(art, stage):
    return json.loads((art / "g" / stage / "manifest.json").read_text())


def test_a_failing_gate_skips_rl_and_force_runs_it(recipe, tmp_path, run_cli):
    art = tmp_path / "art"
    with one_thread():
        code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 0, err
    metrics = manifest(art, "gate")["metrics"]
    # a random model solves nothing, nor does its quantized copy
    assert metrics["passed"] == 0.0 and metrics["accuracy"] == 0.0 and metrics["teacher_accuracy"] == 0.0
    assert metrics["retention"] == 0.0
    assert (art / "g" / "gate" / "verdict.txt").read_text() == (
        "failed: accuracy 0.000 < min_accuracy 0.5; the teacher solved none of the problems, so retention is "
        "undefined and min_retention fails\n"
    )
    assert manifest(art, "rl")["status"] == "skipped"
    assert manifest(art, "eval")["input_stages"] == {"model": "ptq"}  # the last stage that ran
    got = status(run_cli, recipe, art)
    assert got["rl"][0] == "skipped" and got["rl"][1].startswith("gate 'gate' did not pass")
    assert got["eval"] == ("complete", "up to date")
    assert (
        "gate: FAILED on testbed (2 problems): accuracy 0.000 < min_accuracy 0.5" in (art / "g" / "run.log").read_text()
    )

    with one_thread():
        code, _, err = run_cli("run", recipe, "--artifacts", art, "--force")
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("stages.rl: warning: "))
    assert "gate 'gate' did not pass" in warning and warning.endswith("; running anyway (--force)")
    rl = manifest(art, "rl")
    assert rl["status"] == "complete" and rl["metrics"]["steps"] == 1
    assert {"model/reasoning_qat_quant.json", "metrics.jsonl"} <= set(rl["files"])
    saved = json.loads((art / "g" / "rl" / "model" / "config.json").read_text())
    assert saved["use_cache"] is True  # TRL turned it off for gradient checkpointing
    assert manifest(art, "eval")["input_stages"] == {"model": "rl"}


def test_status_shows_the_measured_numbers_of_a_failed_gate(recipe, tmp_path, run_cli):
    art = tmp_path / "art"
    with one_thread():
        assert run_cli("run", recipe, "--artifacts", art, "--only", "ptq")[0] == 0
        assert run_cli("run", recipe, "--artifacts", art, "--only", "gate")[0] == 0
    state, reason = status(run_cli, recipe, art)["rl"]
    assert state == "skipped" and "accuracy 0.000 < min_accuracy 0.5" in reason


def config(**fields):
    return gate.Config(type="gate", model="kd", teacher="teacher", **fields)


def test_verdict_and_explain_carry_the_numbers():
    c = config(min_accuracy=0.3, min_retention=0.5)
    m = gate.verdict(c, 0.36, 0.6)
    assert m == {"accuracy": 0.36, "teacher_accuracy": 0.6, "retention": pytest.approx(0.6), "passed": 1.0}
    assert gate.explain(c, m) == (
        "accuracy 0.360 >= min_accuracy 0.3; retention 0.600 (0.360 / 0.600) >= min_retention 0.5"
    )
    m = gate.verdict(c, 0.36, 0.8)  # retention 0.45: one threshold failing fails the gate
    assert m["passed"] == 0.0 and "retention 0.450 (0.360 / 0.800) < min_retention 0.5" in gate.explain(c, m)
    assert gate.verdict(config(min_accuracy=0.3), 0.2, None) == {"accuracy": 0.2, "passed": 0.0}
    assert gate.verdict(config(min_accuracy=0.3), 0.3, 0.9)["passed"] == 1.0  # >= passes; retention only reported


def test_a_gate_needs_a_threshold_and_retention_needs_a_teacher():
    base = {"name": "t", "model": {"path": "org/x"}}
    with pytest.raises(RecipeError, match="stages.g: give min_accuracy, min_retention or both"):
        parse_recipe({**base, "stages": {"g": {"type": "gate", "model": "model"}}})
    with pytest.raises(RecipeError, match="stages.g: min_retention needs `teacher`"):
        parse_recipe({**base, "stages": {"g": {"type": "gate", "model": "model", "min_retention": 0.9}}})
    with pytest.raises(RecipeError, match="stages.g.min_accuracy: must be <= 1"):
        parse_recipe({**base, "stages": {"g": {"type": "gate", "model": "model", "min_accuracy": 2}}})
