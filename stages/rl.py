"""Stage `rl`: GRPO with verifiable rewards on the quantized student (the optional third step).

The published studies found that after KD-QAT, RL adds a few points *if* the student clears a capability threshold;
below it RL collapses. So this stage normally carries `when: <gate>` and is skipped (state
`skipped`, downstream stages reading `init` instead) when the gate fails; `--force` runs it anyway.

The policy is the quantized model of `init` (kd_qat, ptq or any stage that saved QuantLinears),
trained by TRL's GRPOTrainer through pipeline.train.rl (which says where and why it departs from stock
TRL): rollouts through pipeline.generate, reward = pipeline.data.grading's verdict (1/0) plus an optional
format reward, GRPO/DAPO losses and clipping as TRL implements them. Prompts are `count` problems of
the recipe's training domain (`data.task`: the testbed's train split, GSM8K train, or a prompts
jsonl with answers), in the chat template.

Policy modes (`policy`): `qat` trains the latent weights through fake quantization (scales frozen);
`lora` trains LoRA adapters on the frozen quantized base and merges them at the end (the merged
latent weights re-quantize with the same scales; see pipeline.train.rl). `aqn` adds QeRL's adaptive
quantization noise to the rollout policy's RMSNorm weights. β > 0 in `qat` mode keeps a frozen copy of
the initial policy as the reference; in `lora` mode the reference is the base with adapters disabled.

Output: the final policy in the quantized representation (`<out_dir>/model/`, what `export` and
`eval` read), `metrics.jsonl` (reward, accuracy, format, entropy, kl, completion length, sigma, ...
per step); resumable checkpoints through the engine.

    stages:
      gate:
        type: gate
        model: kd_qat
        teacher: teacher
        min_retention: 0.5
        limit: 200
      rl:
        type: rl
        init: kd_qat
        when: gate
        steps: 200
        batch_size: 64
        num_generations: 8
        lr: 1.0e-6
        max_completion_length: 512
        aqn: {sigma_start: 1.0e-2, sigma_end: 5.0e-4, num_stages: 10}
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from pipeline.data.benchmarks import check_training_data, training_problems
from pipeline.engine.errors import InputError
from pipeline.train.rl import GRPOSettings
from pipeline.engine.stage_api import QUANTIZED, SEED_MAX, StageConfig, StageContext, stage_ref
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.train.loop import missing_trackers

CODE_VERSION = 1
USES = ("seed", "model", "data")
HEADLINE = "reward"  # over its own rollouts: an rl "accuracy" beside the evals would read as one of them
PASSTHROUGH = "init"
OUTPUT = QUANTIZED


class Config(GRPOSettings, StageConfig):
    type: Literal["rl"] = "rl"
    init: stage_ref(QUANTIZED)
    """The quantized student to train (a kd_qat or ptq stage, or "model" when the recipe's model.path is a
    quantized model, e.g. a student from another recipe); what downstream reads when the gate skips this stage."""
    count: int = Field(1000, ge=1, le=MAX_PROBLEMS)
    """Training prompts drawn from the recipe's data.task (fewer when the source has fewer)."""
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    """The seed of rollout sampling, data order, AQN noise and LoRA init (default: the recipe's). The
    prompts stay the recipe seed's, so seed rows of a study differ only in what RL draws."""


def check(config: Config, recipe) -> list[tuple[str, str]]:
    # `init: model` needs a model.path holding a quantized model: checked with every reference's kind
    return check_training_data(recipe.data, need_answers=True) + missing_trackers(config.report_to)


def run(ctx: StageContext) -> dict[str, float]:
    from accelerate import PartialState

    from pipeline.models import is_quantized, load_model, load_tokenizer
    from pipeline.quant.formats.io import read_quant_spec, save_quantized, saved_dtype
    from pipeline.train.rl import grpo_train

    config, recipe = ctx.config, ctx.recipe
    if not is_quantized(ctx.inputs["init"]):
        raise InputError(f"stages.{ctx.name}.init", f"{config.init!r} holds no quantized model (use kd_qat or ptq)")
    spec = read_quant_spec(ctx.inputs["init"])
    problems = training_problems(recipe.data, config.count, recipe.seed, need_answers=True, where="data.prompts_file")
    # latent weights in fp32 (bf16 autocast on GPU), as kd_qat trains them
    policy = load_model(ctx.inputs["init"], dtype="float32", trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(ctx.inputs["init"], trust_remote_code=recipe.model.trust_remote_code)
    reference = None
    if config.beta > 0 and config.policy == "qat":
        reference = copy.deepcopy(policy)  # the initial policy, frozen
    ctx.log.info(
        "%s: GRPO (%s, %s loss, G=%d, %d completions/step) on %d %s prompts for %d steps%s",
        ctx.name,
        config.policy,
        config.loss_type,
        config.num_generations,
        config.batch_size,
        len(problems),
        recipe.data.task,
        config.steps,
        ", AQN" if config.aqn else "",
    )
    policy, metrics = grpo_train(
        policy,
        tokenizer,
        problems,
        config,
        out_dir=ctx.out_dir,
        checkpointer=ctx.checkpointer,
        seed=recipe.seed if config.seed is None else config.seed,
        ref_model=reference,
        log=ctx.log,
        desc=f"{ctx.name}: grpo",
        instruction=recipe.data.instruction,
    )
    if PartialState().is_main_process:
        # TRL turns the KV cache off for gradient checkpointing; the saved policy decodes with it
        policy.config.use_cache = policy.generation_config.use_cache = True
        policy = policy.eval().to(saved_dtype(policy, recipe.model.dtype))
        save_quantized(policy, tokenizer, ctx.out_dir / "model", spec)
    PartialState().wait_for_everyone()
    ctx.log.info(
        "%s: reward %.3f, accuracy %.3f, entropy %.3f over the last steps; %.2f%% of weight codes changed",
        ctx.name,
        metrics["reward"],
        metrics["accuracy"],
        metrics["entropy"],
        100 * metrics["codes_changed"],
    )
    return {**metrics, "prompts": len(problems)}
