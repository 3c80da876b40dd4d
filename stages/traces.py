"""Stage `traces`: the teacher solves training-domain prompts; its solutions are the domain-matched data.

The studies calibrate PTQ and train KD-QAT on the model's *own* reasoning traces rather than generic
text (WikiText, C4): the activations and token distributions the quantized model must keep are the
ones it produces while reasoning. So the teacher (`model`) samples `generation.num_samples`
completions for each of `count` prompts of the recipe's training domain (`data.task`):
  testbed  the testbed's train split (`data.testbed`, seed = recipe seed)
  gsm8k    GSM8K train (from data.benchmarks_dir)
  jsonl    `data.prompts_file` ({"question", "answer"?} per line; without answers nothing is graded)
Each completion is graded against the prompt's answer (pipeline.data.grading); `only_correct` keeps just
the correct ones (rejection sampling). `source: reference` generates nothing: each prompt's reference
solution (GSM8K's worked answer, MATH's solution, the testbed's) is its one trace, graded correct: KD data in
the reference solutions' own style, for a teacher too weak to write usable traces of its own, or to compare
with its own (the students' perplexity is measured on held-out reference solutions). The prompt is the question
and `data.instruction` in the model's chat template. Output `<out_dir>/traces.jsonl`, one row per kept completion, a
`pipeline.data.traces.Trace`: {"id", "question", "instruction", "answer", "completion", "correct",
"num_tokens", "sample", "truncated"}.

    stages:
      traces:
        type: traces
        model: teacher
        count: 2000
        generation: {temperature: 0.6, top_p: 0.95, top_k: 20, max_new_tokens: 1024}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.data.benchmarks import check_training_data, training_problems
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.data.traces import Trace, write_traces
from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import (
    ADDED_KEY,
    ANY_MODEL,
    TRACES,
    StageConfig,
    StageContext,
    stage_ref,
    untrained_base_model,
)
from pipeline.evaluation import sample_and_grade, summarize
from pipeline.generate import GenerationSpec

CODE_VERSION = 2
USES = ("seed", "data")
HEADLINE = "kept"
OUTPUT = TRACES


class Config(StageConfig):
    type: Literal["traces"] = "traces"
    model: stage_ref(*ANY_MODEL)
    """The teacher that writes the traces: a stage that trained one (sft, rl), or "model"."""
    count: int = Field(1000, ge=1, le=MAX_PROBLEMS)
    """Prompts to solve (fewer when the source has fewer); traces = count x generation.num_samples."""
    generation: GenerationSpec = GenerationSpec()
    """Decoding: max_new_tokens, temperature / top_p / top_k, num_samples per prompt, batch_size, seed."""
    only_correct: bool = False
    """Keep only completions graded correct (consumers such as kd_qat can also filter on `correct`)."""
    source: Literal["model", "reference"] = Field("model", json_schema_extra=ADDED_KEY)
    """model: the teacher's sampled completions; reference: each prompt's reference solution, nothing generated."""


def check(config: Config, recipe) -> list[tuple[str, str]]:
    errors = untrained_base_model(config, recipe, "model")
    errors += check_training_data(recipe.data, need_answers=config.only_correct, where="only_correct")
    return errors


def run(ctx: StageContext) -> dict[str, float]:
    config, recipe = ctx.config, ctx.recipe
    problems = training_problems(
        recipe.data,
        config.count,
        recipe.seed,
        need_answers=config.only_correct,
        where=f"stages.{ctx.name}.only_correct",
    )
    if config.source == "reference":
        return _reference_traces(ctx, problems)
    from accelerate import PartialState

    from pipeline.models import load_for_decoding

    model, tokenizer = load_for_decoding(ctx.inputs["model"], recipe.model.trust_remote_code)
    ctx.log.info(
        "%s: %d %s prompts x %d samples, up to %d new tokens, on %s",
        ctx.name,
        len(problems),
        recipe.data.task,
        config.generation.num_samples,
        config.generation.max_new_tokens,
        model.device,
    )
    instruction = recipe.data.instruction
    rows, seconds = sample_and_grade(model, tokenizer, problems, config.generation, instruction)
    traces = _traces(rows, instruction, config.only_correct)
    if not traces:
        raise RuntimeError(f"{ctx.name}: no completion was graded correct, so no traces were kept (only_correct)")
    if PartialState().is_main_process:
        write_traces(traces, ctx.out_dir)
    summary = summarize(rows, config.generation.num_samples, seconds)
    metrics = {"count": len(problems), "generated": len(rows), "kept": len(traces)}
    metrics |= {k: summary[k] for k in ("accuracy", "truncation_rate", "mean_tokens", "tokens_per_s")}
    ctx.log.info(
        "%s: kept %d of %d (teacher accuracy %.2f%%), %.1f tokens each, %.0f tokens/s",
        ctx.name,
        metrics["kept"],
        metrics["generated"],
        100 * metrics["accuracy"],
        metrics["mean_tokens"],
        metrics["tokens_per_s"],
    )
    return metrics


def _traces(rows: list[dict], instruction: str, only_correct: bool) -> list[Trace]:
    """The graded samples as traces: every one, or with `only_correct` the correct ones."""
    return [
        Trace(
            id=r["id"],
            question=r["question"],
            instruction=instruction,
            answer=r["gold"],
            completion=r["completion"],
            correct=r["correct"],
            num_tokens=r["num_tokens"],
            sample=r["sample"],
            truncated=r["truncated"],
        )
        for r in rows
        if r["correct"] or not only_correct
    ]


def _reference_traces(ctx: StageContext, problems) -> dict[str, float]:
    """`source: reference`: every problem's reference solution as its trace; the teacher's tokenizer counts tokens."""
    from accelerate import PartialState

    from pipeline.models import load_tokenizer

    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise InputError(
            f"stages.{ctx.name}.source",
            f"reference: {len(missing)} of {len(problems)} {ctx.recipe.data.task} prompts have no reference solution "
            f"(first: {missing[0]}); use source: model",
        )
    tokenizer = load_tokenizer(ctx.inputs["model"], ctx.recipe.model.trust_remote_code)
    instruction = ctx.recipe.data.instruction
    traces = [
        Trace(
            id=p.id,
            question=p.question,
            instruction=instruction,
            answer=p.answer,
            completion=p.solution,
            correct=True,
            num_tokens=len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]),
            sample=0,
            truncated=False,
        )
        for p in problems
    ]
    if PartialState().is_main_process:
        write_traces(traces, ctx.out_dir)
    mean_tokens = sum(t.num_tokens for t in traces) / len(traces)
    ctx.log.info("%s: %d reference solutions as traces, %.1f tokens each", ctx.name, len(traces), mean_tokens)
    return {"count": len(problems), "generated": 0, "kept": len(traces), "mean_tokens": mean_tokens}
