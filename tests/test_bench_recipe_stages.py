"""bench/recipe_stages.py on the CPU: a shipped Qwen3 recipe, every stage, on the tiny shape with tiny counts (the GPU
run uses the real shapes and the bench's defaults)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import stages

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "qwen3-0.6b-w3g128.yaml")
TINY_RUN = ["--shape", "tiny", "--traces", "8", "--new-tokens", "32", "--kd-steps", "2", "--eval-limit", "2"]
TINY_RUN += ["--eval-new-tokens", "16"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(ROOT / "tests" / "data"))
    spec = importlib.util.spec_from_file_location("bench_recipe_stages", ROOT / "bench" / "recipe_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_stage_of_the_recipe_gets_a_row_with_its_wall_time(bench, tmp_path, capsys):
    assert bench.main(["--recipe", RECIPE, "--out", str(tmp_path), *TINY_RUN]) == 0
    report = json.loads((tmp_path / "stages.json").read_text())
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == ["teacher_math500", "teacher_aime24", "teacher_amc23", "traces", "gptq", "gptq_math500"] + [
        "kd_qat",
        "kd_qat_math500",
        "gate",
        "rl",
        "export",
        "export_math500",
        "export_aime24",
        "export_amc23",
    ]
    assert all(r["wall_s"] is not None for r in rows.values())
    # a random model fails the gate, so rl is skipped, and says why
    assert rows["rl"]["state"] == "skipped" and rows["rl"]["note"].startswith("gate 'gate' did not pass")
    assert {r["state"] for s, r in rows.items() if s != "rl"} == {"complete"}
    assert rows["traces"]["metrics"]["count"] == 8 and rows["kd_qat"]["metrics"]["steps"] == 2
    assert rows["teacher_math500"]["metrics"]["num_problems"] == 2
    assert rows["gptq"]["peak_gpu_gib"] is None  # no GPU here
    assert "stages.traces.generation.max_new_tokens=32" in report["overrides"]
    assert (tmp_path / f"model-tiny-v{bench.MODEL_FOLDER_VERSION}" / "model.safetensors").is_file()
    table = (tmp_path / "stages.md").read_text()
    assert table in capsys.readouterr().out and table.count("\n") == 2 + len(rows)


def test_after_a_stage_fails_the_stages_that_do_not_need_it_still_run(bench, tmp_path, monkeypatch):
    def out_of_memory(ctx):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(stages.stage_module("kd_qat"), "run", out_of_memory)
    argv = ["--recipe", RECIPE, "--out", str(tmp_path), *TINY_RUN, "--set", "stages.export.model=gptq"]
    assert bench.main(argv) == 1
    rows = {r["stage"]: r for r in json.loads((tmp_path / "stages.json").read_text())["stages"]}
    assert rows["kd_qat"]["state"] == "failed" and "CUDA out of memory" in rows["kd_qat"]["note"]
    assert [s for s, r in rows.items() if r["state"] == "not run"] == ["kd_qat_math500", "gate", "rl"]
    assert rows["export_amc23"]["state"] == "complete"  # after kd_qat, from the GPTQ init


def test_a_signal_during_a_stage_run_alone_stops_the_bench(bench, tmp_path, monkeypatch):
    """After a failure the bench runs the remaining stages one by one; a SIGTERM in one of those (the CLI's 143) ends
    the bench there, as it does in the whole run, instead of going on to the next stage."""
    from pipeline import cli
    from pipeline.engine.recipe import load_recipe

    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 1 if len(calls) == 1 else 143  # the whole run fails; the first stage run alone is stopped

    monkeypatch.setattr(cli, "main", fake_main)
    code = bench.run_what_fits(RECIPE, load_recipe(RECIPE), tmp_path / "artifacts", [])
    assert code == 143 and len(calls) == 2 and calls[1][-2:] == ["--only", "teacher_math500"]


def test_bad_input_is_one_line_and_exit_2(bench, tmp_path, capsys):
    assert bench.main(["--recipe", "no-such-recipe", "--out", str(tmp_path), *TINY_RUN]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_random_model_samples_learned_tokens_that_round_trip_through_the_tokenizer(bench):
    """The fillers that pad the tokenizer to Qwen3's size re-tokenize to ~10 tokens each: traces of them would make KD
    sequences ~10x the traces' length (as on the H100). After favour_learned_tokens the model samples none. Hidden
    1,024 as Qwen3-0.6B's (the scale is set for the real shapes' logits), one small layer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipeline.data.tokenizer import QWEN3_LEARNED, build_tokenizer

    tokenizer = build_tokenizer(pad_to=QWEN3_LEARNED)
    fillers = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<|filler_")}
    shape = dict(hidden_size=1024, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    config = Qwen3Config(**shape, num_hidden_layers=1, vocab_size=len(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    prompt = torch.tensor([tokenizer.encode("Natalia sold clips to 48 of her friends.")])

    def sampled() -> list[int]:
        torch.manual_seed(1)
        out = model.generate(
            prompt, max_new_tokens=32, do_sample=True, temperature=0.6, top_k=20, eos_token_id=None, pad_token_id=0
        )
        return out[0, prompt.shape[1] :].tolist()

    assert sum(i in fillers for i in sampled()) > 16  # unscaled, mostly fillers: the check below means something
    bench.favour_learned_tokens(model, tokenizer)
    ids = sampled()
    assert not fillers & set(ids)
    assert len(tokenizer.encode(tokenizer.decode(ids))) <= 2 * len(ids)
