"""Stage `rl` and pipeline.train.rl: rewards on known completions, GRPO steps on a tiny quantized model (qat and
lora), the saved policy's format, exact resume after a stop, the recipe checks."""

import json
import logging
import os
import signal

import pytest
import torch

import stages.rl as rl_stage
from pipeline.engine import signals
from pipeline.engine.checkpoint import Checkpointer, StageInterrupted
from pipeline.data.problem import Problem
from pipeline.quant.apply import decoding_weights, quant_linears, quantize_rtn
from pipeline.quant.formats.io import load_quantized, read_quant_spec, save_quantized
from pipeline.quant.scheme import QuantSpec
from pipeline.engine.recipe import RecipeError, parse_recipe
from pipeline.train.grpo_trainer import cut_at_stop
from pipeline.train.rl import GRPOSettings, accuracy_reward, format_reward, grpo_train, is_well_formed
from pipeline.engine.stage_api import StageContext
from quant_tiny import one_thread, tiny_model, tiny_tokenizer

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_hidden_layers": 1}
TINY_RL = {
    "steps": 2,
    "batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 12,
    "lr": 1e-3,
    "gradient_checkpointing": False,
    "checkpoint_every": 0,
}
PROBLEMS = [Problem(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(8)]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A W3G128 RTN-quantized tiny Qwen3 saved as a ptq stage leaves it. The byte tokenizer's ids depend on
    the process (its alphabet comes from a hash set), so every test reads this one saved copy."""
    path = tmp_path_factory.mktemp("rl") / "ptq"
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), **SHAPE)
    spec = QuantSpec.model_validate("w3g128")
    quantize_rtn(model, spec)
    save_quantized(model, tok, path / "model", spec)
    return path


def distinct_chars(completions, **_):
    """A synthetic reward that varies within every group, so every step has a gradient."""
    return [len(set(c)) / 10 for c in completions]


def train(init_dir, tmp_path, checkpointer=None, reward_funcs=(distinct_chars,), **settings):
    from pipeline.models import load_tokenizer

    model, tok = load_quantized(init_dir), load_tokenizer(init_dir)
    with one_thread():
        return grpo_train(
            model,
            tok,
            PROBLEMS,
            GRPOSettings(**{**TINY_RL, **settings}),
            out_dir=tmp_path / "out",
            checkpointer=checkpointer or Checkpointer(tmp_path / "ckpt"),
            seed=0,
            reward_funcs=list(reward_funcs),
            reward_weights=[1.0] * len(reward_funcs),
        )


def rows(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]


# -- rewards -------------------------------------------------------------------------------------


def test_rewards_on_known_completions():
    completions = [
        "<think>4 plus 4 is 8.</think> The answer is \\boxed{8}.",
        "<think>4 plus 4 is 9.</think> \\boxed{9}",
        "<think>\\boxed{8} is tempting</think> so 9",  # the box in the reasoning does not count
        "4 plus 4 is 8",  # no box: the last number is graded
        "The total is 1,008.",
    ]
    gold = ["8", "8", "8", "8", "1008"]
    assert accuracy_reward(completions, gold) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert is_well_formed("so 3 + 5 = 8</think>\n\\boxed{8}")  # template opened the think block
    assert not is_well_formed("<think>a</think><think>b</think>\\boxed{1}")
    assert not is_well_formed("x <think>a</think> \\boxed{1}")
    assert not is_well_formed("<think>a</think> 8")
    assert cut_at_stop([5, 6, 2, 7, 2], [2, 9]) == [5, 6, 2] and cut_at_stop([5, 6], [2]) == [5, 6]


def test_decoding_weights_sample_the_same_tokens_and_leave_the_latent_weights_as_they_were(init_dir):
    from pipeline.data.chat import chat_prompt
    from pipeline.generate import GenerationSpec, generate_ids
    from pipeline.models import load_tokenizer

    model, tok = load_quantized(init_dir), load_tokenizer(init_dir)
    prompts = [tok(chat_prompt(tok, p.question), add_special_tokens=False)["input_ids"] for p in PROBLEMS[:4]]
    spec = GenerationSpec(max_new_tokens=8, temperature=1.0, seed=3)
    latent = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    with one_thread():
        per_token = generate_ids(model, prompts, spec, [tok.eos_token_id], tok.pad_token_id)
        with decoding_weights(model):
            assert all(not m.fake_quant for _, m in quant_linears(model))
            once = generate_ids(model, prompts, spec, [tok.eos_token_id], tok.pad_token_id)
        with decoding_weights(model, torch.bfloat16):
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            generate_ids(
                model, prompts, spec.model_copy(update={"backend": "static"}), [tok.eos_token_id], tok.pad_token_id
            )
    assert once == per_token  # q(w) once or at every token: the same values, the same samples
    assert all(m.fake_quant for _, m in quant_linears(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, latent[n][0]) and p.data_ptr() == latent[n][1], n


# -- GRPO on the tiny model --------------------------------------------------------------------------


def test_qat_steps_log_metrics_and_train_latent_weights_only(init_dir, tmp_path):
    policy, metrics = train(init_dir, tmp_path, reward_funcs=(accuracy_reward, format_reward, distinct_chars))
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2] and metrics["steps"] == 2
    for row in got:
        assert row["completion_length"] <= 12 and 0 < row["entropy"] < 6  # log(259 tokens) = 5.56
        assert row["accuracy"] in (0.0, 0.125, 0.25, 0.375, 0.5) and row["format"] == 0.0  # random model
        assert row["reward"] == pytest.approx(row["accuracy"] + row["format"] + row["rewards/distinct_chars/mean"])
        assert "kl" not in row and row["sigma"] == 0.0
    before, after = dict(quant_linears(load_quantized(init_dir))), dict(quant_linears(policy))
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(after[name].weight_scale, before[name].weight_scale)
    assert not torch.equal(after[name].weight, before[name].weight)
    assert 0 < metrics["codes_changed"] < 0.5 and metrics["rollout_tokens_per_s"] > 0


def test_lora_trains_only_the_adapters_and_returns_the_merged_quantized_model(init_dir, tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    policy, metrics = train(
        init_dir, tmp_path, ckpt, policy="lora", lr=1e-2, checkpoint_every=2, aqn={"sigma_start": 1e-2, "num_stages": 2}
    )
    step, state = ckpt.latest()
    assert step == 2 and state["model"] and all(".lora_A." in n or ".lora_B." in n for n in state["model"])
    base = load_quantized(init_dir)
    assert type(policy).__name__ == "Qwen3ForCausalLM" and len(quant_linears(policy)) == 7
    latent = {n for n, _ in quant_linears(base)}
    for (name, p), (_, q) in zip(base.named_parameters(), policy.named_parameters()):
        if name.removesuffix(".weight") in latent:
            assert not torch.equal(p, q), name  # W + BA
        else:
            # norms included: the AQN noise on them (sigma > 0 at step 2) was removed to the bit
            assert torch.equal(p, q), name
    assert [r["sigma"] for r in rows(tmp_path)] == [0.0, 1e-2]
    assert metrics["codes_changed"] > 0


def test_beta_in_qat_mode_uses_the_given_reference_and_logs_kl(init_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a reference model"):
        train(init_dir, tmp_path, beta=0.1)
    from pipeline.models import load_tokenizer

    with one_thread():
        _, metrics = grpo_train(
            load_quantized(init_dir),
            load_tokenizer(init_dir),
            PROBLEMS,
            GRPOSettings(**{**TINY_RL, "beta": 0.1}),
            out_dir=tmp_path / "out",
            checkpointer=Checkpointer(tmp_path / "ckpt"),
            seed=0,
            ref_model=load_quantized(init_dir),
            reward_funcs=[distinct_chars],
            reward_weights=[1.0],
        )
    got = rows(tmp_path)
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert got[1]["kl"] > 0 and metrics["kl"] > 0


def test_a_stop_checkpoints_and_the_rerun_resumes_to_the_uninterrupted_result(init_dir, tmp_path):
    settings = {"steps": 4, "checkpoint_every": 0}
    full, _ = train(init_dir, tmp_path / "full", **settings)
    expected = rows(tmp_path / "full")

    ckpt = Checkpointer(tmp_path / "ckpt")
    calls = []

    def stop_after_two_steps(completions, **_):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # in step 2's rollout: seen after that step
        return distinct_chars(completions)

    stop_after_two_steps.__name__ = "distinct_chars"
    with signals.owned(), pytest.raises(StageInterrupted, match="stopped at step 2"):  # the runner owns the signals
        train(init_dir, tmp_path, ckpt, reward_funcs=(stop_after_two_steps,), **settings)
    assert ckpt.latest()[0] == 2 and len(rows(tmp_path)) == 2
    resumed, _ = train(init_dir, tmp_path, Checkpointer(tmp_path / "ckpt"), **settings)
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        for key in ("loss", "reward", "entropy", "grad_norm", "completion_length"):
            assert a[key] == b[key], (a["step"], key)
    for (name, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), name


# -- the stage --------------------------------------------------------------------------------------


def recipe(**stage):
    return parse_recipe(
        {
            "name": "t",
            "seed": 0,
            "model": {"path": "org/tiny", "dtype": "float32"},
            "quant": "w3g128",
            "data": {"testbed": {"train_size": 16, "test_size": 4}},
            "stages": {
                "ptq": {"type": "ptq", "model": "model", "method": "rtn", "calibration_source": "generic"},
                "rl": {"type": "rl", "init": "ptq", **TINY_RL, "count": 8, **stage},
            },
        }
    )


def test_stage_trains_on_testbed_prompts_and_saves_a_quantized_policy(init_dir, tmp_path):
    rec = recipe(format_weight=0.5)
    ctx = StageContext(
        name="rl",
        config=rec.stages["rl"],
        recipe=rec,
        out_dir=tmp_path / "out",
        inputs={"init": init_dir},
        input_manifests={},
        checkpointer=Checkpointer(tmp_path / "ckpt"),
        log=logging.getLogger("t"),
    )
    with one_thread():
        metrics = rl_stage.run(ctx)
    assert metrics["steps"] == 2 and metrics["prompts"] == 8 and 0 <= metrics["accuracy"] <= 1
    got = rows(tmp_path)
    assert all(r["reward"] == pytest.approx(r["accuracy"] + 0.5 * r["format"]) for r in got)
    policy = load_quantized(tmp_path / "out")
    assert len(quant_linears(policy)) == 7 and read_quant_spec(tmp_path / "out") == read_quant_spec(init_dir)
    assert all(m.calibrated for _, m in quant_linears(policy))


def test_a_stage_seed_changes_what_rl_draws_and_not_the_prompts(init_dir, tmp_path):
    """`seed` on the stage gives another RL run of the same student (a seed row of a study)."""

    def run_stage(rec, where):
        ctx = StageContext(
            name="rl",
            config=rec.stages["rl"],
            recipe=rec,
            out_dir=where / "out",
            inputs={"init": init_dir},
            input_manifests={},
            checkpointer=Checkpointer(where / "ckpt"),
            log=logging.getLogger("t"),
        )
        with one_thread():
            rl_stage.run(ctx)
        return rows(where)

    # an untrained model earns no reward on testbed prompts, so only the rollouts can tell seeds apart
    lengths = [
        [r["completion_length"] for r in run_stage(recipe(**seed), tmp_path / str(seed))]
        for seed in ({}, {"seed": 0}, {"seed": 1})
    ]
    assert lengths[0] == lengths[1] != lengths[2]


def test_bad_settings_name_their_key():
    with pytest.raises(RecipeError) as e:
        recipe(lr=0, temperature=0)
    assert set(e.value.lines()) == {"stages.rl.lr: must be > 0", "stages.rl.temperature: must be > 0"}
    with pytest.raises(RecipeError, match="batch_size must be a multiple of num_generations"):
        recipe(batch_size=6)
    with pytest.raises(
        RecipeError,
        match=r"stages.rl.init: 'model' \(the recipe's base model\) is a full-precision "
        "model; needs a quantized model",
    ):
        recipe(init="model")


def test_init_may_be_the_base_model_when_it_is_a_quantized_model(init_dir, tmp_path):
    """A student from another recipe (model.path) trains as the stage's init; a plain base model does not."""
    raw = {
        "name": "t",
        "seed": 0,
        "model": {"path": str(init_dir / "model"), "dtype": "float32"},
        "quant": "w3g128",
        "data": {"testbed": {"train_size": 16, "test_size": 4}},
        "stages": {"rl": {"type": "rl", "init": "model", **TINY_RL, "count": 8}},
    }
    assert parse_recipe(raw).stages["rl"].init == "model"
    from quant_tiny import save_tiny

    raw["model"]["path"] = str(save_tiny(tmp_path / "plain"))
    with pytest.raises(RecipeError, match=r"'model' \(the recipe's base model\) is a full-precision model"):
        parse_recipe(raw)
    with pytest.raises(RecipeError, match="stages.rl.aqn.sigma_start: must be > 0"):
        recipe(aqn={"sigma_start": 0})
    assert rl_stage.PASSTHROUGH == "init"


def test_tensorboard_tracker_holds_each_steps_reward_under_the_stage(init_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # where transformers' own TensorBoardCallback would have written ./runs
    train(init_dir, tmp_path, report_to=("tensorboard",))
    runs = list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(runs) == 1 and not (tmp_path / "runs").exists()
    events = EventAccumulator(str(runs[0].parent))
    events.Reload()
    rewards = [e.value for e in events.Scalars("train/reward")]
    assert rewards == pytest.approx([r["reward"] for r in rows(tmp_path)])
