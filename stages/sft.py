"""Stage `sft`: supervised fine-tuning on chain-of-thought completions (teacher bootstrap, SFT baseline).

Three uses, one stage:
  - the testbed teacher: `init` unset and the recipe's `model.arch` set: build the testbed tokenizer
    and a Qwen3 of that size from scratch, train it on the testbed's train problems;
  - fine-tuning a pretrained model (`init` unset, `model.path` set, or `init: <stage>` to continue
    that stage's model);
  - the SFT-QAT baseline of the KD-QAT study: `init: <ptq stage>` and `data: <traces stage>`; the loss
    is then plain next-token cross-entropy on teacher traces instead of KD.

Data: `data` unset means the recipe's testbed train split (`data.testbed`, seed = recipe seed); else
a traces artifact `<dir>/traces.jsonl` (question, completion, correct), keeping only correct rows
unless `only_correct` is false. Loss falls on the completion (the assistant turn, `<think>` section
and boxed answer) only.

Departure from the studies: their teachers are pretrained reasoning models (Qwen3, R1-Distill); the
testbed teacher is trained from scratch here, so it is the only model the demo recipes need.

Outputs: `<out_dir>/model/` (Hugging Face layout, safetensors, tokenizer and generation config) in
the recipe's `model.dtype`, and `<out_dir>/metrics.jsonl` (one row per step). Resumes exactly from
its checkpoints (pipeline.train.loop).

    reasoning-qat run recipes/demo.yaml --only teacher
"""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.data.chat import chat_example
from pipeline.data.testbed import make_problems
from pipeline.data.tokenizer import build_tokenizer
from pipeline.data.traces import training_traces
from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import ANY_MODEL, MODEL, TRACES, StageConfig, StageContext, stage_ref
from pipeline.models import build_model, load_model, load_tokenizer, save_model
from pipeline.quant.formats.layout import is_quantized
from pipeline.train.loop import (
    TrainArgs,
    causal_lm_loss,
    check_train_args,
    make_accelerator,
    train,
    whole_model,
    whole_models,
)

CODE_VERSION = 1
USES = ("seed", "model", "data")
HEADLINE = "final_loss"
OUTPUT = MODEL


class Config(TrainArgs, StageConfig):
    type: Literal["sft"] = "sft"
    init: stage_ref(*ANY_MODEL) | None = None
    """Model to continue training (a stage, or "model"); None: the recipe's model (built from
    `model.arch`, or loaded from `model.path`)."""
    data: stage_ref(TRACES) | None = None
    """A traces stage whose completions to train on; None: the testbed's train split."""
    only_correct: bool = True
    """With `data`: train only on traces whose answer was graded correct."""


def output(config: Config, input_kinds: dict[str, str | None]) -> str | None:
    """A full-precision model, or a quantized one when `init` holds one (the SFT-QAT baseline)."""
    return MODEL if config.init is None else input_kinds["init"]


def check(config: Config, recipe) -> list[tuple[str, str]]:
    errors = []
    if config.data is None and recipe.data.task != "testbed":
        errors.append(
            ("data", f"needs a traces stage when data.task is {recipe.data.task!r} (only the testbed ships solutions)")
        )
    return errors + check_train_args(config)


def _examples(ctx: StageContext, tokenizer) -> list[tuple[list[int], int]]:
    """(token ids, completion start) of each chat to train on."""
    config, recipe = ctx.config, ctx.recipe
    if config.data is None:
        return [
            chat_example(tokenizer, p.question, p.solution, recipe.data.instruction)
            for p in make_problems(recipe.data.testbed, "train", seed=recipe.seed)
        ]
    kept = training_traces(ctx.inputs["data"], config.only_correct, ctx.name, ctx.log)
    return [t.example(tokenizer) for t in kept]


def _model(ctx: StageContext, tokenizer, accelerator):
    """The model to train, as the stage starts it: `init`'s, the recipe's `arch` built from its seed, or the
    recipe's base model; whole on every process, also under FSDP2 and ZeRO-3 (the loop shards or partitions it
    after building the optimizer, which tells matrices, decayed, from vectors by their shapes: a model loaded
    partitioned by transformers would show it only empty parameters)."""
    config, recipe = ctx.config, ctx.recipe
    trust = recipe.model.trust_remote_code
    with whole_models(accelerator):
        if config.init is not None:
            return load_model(ctx.inputs["init"], dtype="float32", trust_remote_code=trust)
        if recipe.model.arch is not None:
            return build_model(recipe.model.arch, tokenizer, seed=recipe.seed)
        return load_model(recipe.model.path, dtype="float32", trust_remote_code=trust)


def run(ctx: StageContext) -> dict[str, float]:
    config, recipe = ctx.config, ctx.recipe
    trust = recipe.model.trust_remote_code
    accelerator = make_accelerator(config.report_to, ctx.out_dir)
    quant_spec = None
    if config.init is not None:
        if is_quantized(ctx.inputs["init"]):
            from pipeline.quant.formats.io import read_quant_spec

            quant_spec = read_quant_spec(ctx.inputs["init"])
        tokenizer = load_tokenizer(ctx.inputs["init"], trust_remote_code=trust)
    elif recipe.model.arch is not None:
        tokenizer = build_tokenizer()
    else:
        tokenizer = load_tokenizer(recipe.model.path, trust_remote_code=trust)
    model = _model(ctx, tokenizer, accelerator)

    examples = _examples(ctx, tokenizer)
    longest = max(len(ids) for ids, _ in examples)
    if longest > model.config.max_position_embeddings:
        raise InputError(
            "model.arch.max_position_embeddings",
            f"an example has {longest} tokens, more than the model's {model.config.max_position_embeddings}",
        )
    params = sum(p.numel() for p in model.parameters())
    ctx.log.info(
        "%s: %d examples (longest %d tokens), %.2fM parameters, %s",
        ctx.name,
        len(examples),
        longest,
        params / 1e6,
        accelerator.device,
    )

    result = train(
        model,
        examples,
        causal_lm_loss,
        config,
        out_dir=ctx.out_dir,
        checkpointer=ctx.checkpointer,
        seed=recipe.seed,
        pad_id=tokenizer.pad_token_id,
        log=ctx.log,
        accelerator=accelerator,
        desc=f"{ctx.name}: sft",
    )
    model = whole_model(accelerator, model, lambda: _model(ctx, tokenizer, accelerator))  # FSDP2: a collective
    if accelerator.is_main_process:
        model = model.eval().to(getattr(torch, recipe.model.dtype))
        if quant_spec is not None:  # SFT-QAT: the model keeps its QuantLinears and their format
            from pipeline.quant.formats.io import save_quantized

            save_quantized(model, tokenizer, ctx.out_dir / "model", quant_spec)
        else:
            save_model(model, tokenizer, ctx.out_dir / "model")
    accelerator.wait_for_everyone()
    completion_tokens = sum(len(ids) - start for ids, start in examples) / len(examples)
    return {**result, "examples": len(examples), "mean_completion_tokens": completion_tokens, "parameters": params}
