"""`reasoning-qat init`: the starting recipe for a tiny random-weight model folder validates, names the lowered
group sizes and caps completions by the model's context; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from quant_tiny import save_tiny

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Qwen3 (every width a multiple of 128) and Llama (widths 192 and 320) model folders."""
    root = tmp_path_factory.mktemp("models")
    return {"qwen3": save_tiny(root / "Tiny Qwen3"), "llama": save_tiny(root / "tiny_llama", family="llama")}


@pytest.fixture(autouse=True)
def benchmarks(monkeypatch):
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(DATA))  # the recipe's evals and gsm8k prompts read them


@pytest.mark.parametrize("family, scheme", [("qwen3", "w3g128"), ("llama", "w3g128"), ("qwen3", "w4a4kv4")])
def test_the_written_recipe_validates(models, family, scheme, tmp_path, run_cli):
    out = tmp_path / "r.yaml"
    code, stdout, stderr = run_cli("init", "--model", models[family], "--scheme", scheme, "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == f"wrote {out}; next: reasoning-qat validate {out}"
    code, stdout, stderr = run_cli("validate", out)
    assert code == 0 and stdout.startswith(f"{out}: ok: "), stderr
    recipe = yaml.safe_load(out.read_text())
    assert recipe["model"] == {"path": str(models[family]), "dtype": "float32"}  # as config.json stores them
    assert recipe["quant"]["preset"] == scheme
    # the tiny models' context is 512 tokens: completions get half of it, not the shipped 32k
    generations = [s["generation"] for s in recipe["stages"].values() if "generation" in s]
    assert generations and all(g["max_new_tokens"] == 256 for g in generations)


def test_name_default_out_and_group_note(models, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    assert run_cli("init", "--model", models["llama"], "--scheme", "w3g128")[0] == 0
    text = (tmp_path / "tiny_llama-w3g128.yaml").read_text()
    assert yaml.safe_load(text)["name"] == "tiny_llama-w3g128"
    assert yaml.safe_load(text)["quant"]["weights"] == {"group_size_policy": "largest_divisor"}
    assert "(192 -> 96, 320 -> 64)" in text
    assert run_cli("init", "--model", models["qwen3"], "--scheme", "w3g128")[0] == 0
    text = (tmp_path / "tiny-qwen3-w3g128.yaml").read_text()  # "Tiny Qwen3" made a recipe name
    assert "groups of 128 throughout" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/nope", "--scheme", "w3g128"], "--model: no such directory: {tmp}/nope"),
        (["--model", "{tmp}/empty", "--scheme", "w3g128"], "--model: {tmp}/empty holds no model (no config.json"),
        (["--model", "{tmp}/custom", "--scheme", "w3g128"], "--model: {tmp}/custom needs custom code (auto_map)"),
        (["--model", "{qwen3}", "--scheme", "w2g64"], "--scheme: unknown scheme 'w2g64'; known: w3g128, w4a4kv4"),
        (["--model", "{qwen3}", "--scheme", "w3g128", "--out", "{tmp}/taken.yaml"], "--out: {tmp}/taken.yaml exists"),
        (
            ["--model", "{qwen3}", "--scheme", "w3g128", "--out", "{tmp}/no/r.yaml"],
            "--out: no such directory: {tmp}/no",
        ),
        (  # root passes the permission bits, yet can create nothing here
            ["--model", "{qwen3}", "--scheme", "w3g128", "--out", "/proc/r.yaml"],
            "--out: /proc/r.yaml cannot be created (",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, args, message, tmp_path, monkeypatch, run_cli, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.yaml").write_text("mine")
    custom = save_tiny(tmp_path / "custom")
    config = {
        **json.loads((custom / "config.json").read_text()),
        "model_type": "my_model",
        "auto_map": {"AutoConfig": "my_code.MyConfig"},
    }  # a type only its own code defines
    (custom / "config.json").write_text(json.dumps(config))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # saving the model's progress bar

    code, stdout, stderr = run_cli("init", *[a.format(tmp=tmp_path, qwen3=models["qwen3"]) for a in args])
    assert code == 2 and stdout == ""
    assert stderr.strip().startswith(message.format(tmp=tmp_path)) and len(stderr.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "taken.yaml").read_text() == "mine"


def test_a_scheme_that_fits_no_layer_is_refused_with_the_validation_line(tmp_path, run_cli, capsys):
    odd = save_tiny(tmp_path / "odd", family="qwen2", hidden_size=100, intermediate_size=200, num_attention_heads=2)
    capsys.readouterr()
    code, _, stderr = run_cli("init", "--model", odd, "--scheme", "w3g128", "--out", tmp_path / "r.yaml")
    assert code == 2 and stderr.startswith("quant.weights.group_size: ") and "does not divide in_features 100" in stderr
    assert not (tmp_path / "r.yaml").exists()


def test_without_a_benchmark_directory_the_model_comes_first_and_the_directory_once(
    models, tmp_path, monkeypatch, run_cli, capsys
):
    """A base model (no chat template) and no benchmark directory: the model's line first, then one line for the
    directory naming the way out `init` has (the environment: its recipe is not written yet)."""
    import chat_tokenizers
    import tiny_lm
    from pipeline.models import save_model

    monkeypatch.delenv("REASONING_QAT_BENCHMARKS")
    save_model(tiny_lm.model(), chat_tokenizers.plain(None), tmp_path / "base")
    capsys.readouterr()
    code, stdout, stderr = run_cli(
        "init", "--model", tmp_path / "base", "--scheme", "w3g128", "--out", tmp_path / "r.yaml"
    )
    assert (code, stdout) == (2, "")
    lines = stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"model.path: {tmp_path / 'base'} has no chat template")
    assert lines[1] == (
        "data.benchmarks_dir: no benchmark directory is set, where the benchmarks not read from the hub are files "
        "(<dir>/<bench>_<split>.jsonl or .parquet; the testbed needs none): export REASONING_QAT_BENCHMARKS=DIR and "
        "run init again"
    )
    assert not (tmp_path / "r.yaml").exists()
