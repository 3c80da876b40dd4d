"""Stage `sft`: trains the testbed teacher from scratch, or on a traces artifact; checks its config."""

import json
import logging

import pytest
import torch

import stages.sft as sft
from pipeline.engine.checkpoint import Checkpointer
from pipeline.models import load_model, load_tokenizer
from pipeline.engine.recipe import RecipeError, parse_recipe
from pipeline.engine.stage_api import StageContext

TINY = {
    "arch": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    },
    "dtype": "float32",
}
TRAIN = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2}


def recipe(teacher: dict, **top):
    raw = {
        "name": "t",
        "seed": 0,
        "model": TINY,
        "data": {"testbed": {"train_size": 40, "test_size": 5}},
        "stages": {"teacher": {"type": "sft", **TRAIN, **teacher}},
        **top,
    }
    return parse_recipe(raw)


def context(tmp_path, rec, inputs=None):
    return StageContext(
        name="teacher",
        config=rec.stages["teacher"],
        recipe=rec,
        out_dir=tmp_path / "out",
        inputs=inputs or {},
        input_manifests={},
        checkpointer=Checkpointer(tmp_path / "ckpt"),
        log=logging.getLogger("test"),
    )


def test_teacher_from_scratch_writes_a_loadable_model_and_metrics(tmp_path):
    metrics = sft.run(context(tmp_path, recipe({})))
    assert metrics["steps"] == 4 and metrics["examples"] == 40 and metrics["final_loss"] > 0
    assert 40 < metrics["mean_completion_tokens"] < 120
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    model, tok = load_model(tmp_path / "out"), load_tokenizer(tmp_path / "out")
    assert model.config.model_type == "qwen3" and model.config.hidden_size == 32 and tok.eos_token == "<|im_end|>"
    assert {p.name for p in (tmp_path / "out" / "model").glob("*.safetensors")} == {"model.safetensors"}


def test_bfloat16_recipe_saves_a_bfloat16_model(tmp_path):
    sft.run(context(tmp_path, recipe({"steps": 1, "warmup_steps": 0}, model={**TINY, "dtype": "bfloat16"})))
    assert load_model(tmp_path / "out").dtype == torch.bfloat16


def test_traces_and_init_continue_a_model_on_correct_completions(tmp_path):
    sft.run(context(tmp_path / "first", recipe({})))
    traces = tmp_path / "traces"
    traces.mkdir()
    rows = [
        {
            "id": str(i),
            "question": f"Ava has {i} coins. How many coins does Ava have now?",
            "answer": str(i),
            "completion": f"<think>\nAva starts with {i} coins.\n</think>\n\nThe answer is \\boxed{{{i}}}.",
            "correct": i % 3 != 0,
            "num_tokens": 20,
            "sample": 0,
            "truncated": False,
        }
        for i in range(12)
    ]
    (traces / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = recipe(
        {"init": "first", "data": "traces"},
        stages={
            "first": {"type": "sft", **TRAIN},
            "traces": {"type": "traces", "model": "first"},
            "teacher": {"type": "sft", **TRAIN, "init": "first", "data": "traces"},
        },
    )
    inputs = {"init": tmp_path / "first" / "out", "data": traces}
    assert sft.run(context(tmp_path / "second", rec, inputs))["examples"] == 8
    rec_all = recipe(
        {},
        stages={
            **{k: v.model_dump() for k, v in rec.stages.items() if k != "teacher"},
            "teacher": {"type": "sft", **TRAIN, "init": "first", "data": "traces", "only_correct": False},
        },
    )
    metrics = sft.run(context(tmp_path / "third", rec_all, inputs))
    assert metrics["examples"] == 12
    first = load_model(tmp_path / "first" / "out")
    third = load_model(tmp_path / "third" / "out")
    assert not torch.equal(first.lm_head.weight, third.lm_head.weight)


def test_check_reports_each_bad_setting_with_its_key():
    with pytest.raises(RecipeError) as e:
        recipe({"batch_size": 6, "grad_accum": 4, "warmup_steps": 9}, data={"task": "gsm8k"})
    lines = e.value.lines()
    assert any(line.startswith("stages.teacher.data: needs a traces stage") for line in lines)
    assert "stages.teacher.batch_size: must be a multiple of grad_accum (4)" in lines
    assert "stages.teacher.warmup_steps: must be <= steps (4)" in lines
    with pytest.raises(RecipeError, match="stages.teacher.lr"):
        recipe({"lr": 0})
