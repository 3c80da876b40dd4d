"""Stage `traces`: the teacher solves training-domain prompts; its solutions are the domain-matched data.

The studies calibrate PTQ and train KD-QAT on the model's *own* reasoning traces rather than generic
text (WikiText, C4): the activations and token distributions the quantized model must keep are the
ones it produces while reasoning. So the teacher (`model`) samples `generation.num_samples`
completions for each of `count` prompts of the recipe's training domain (`data.task`):
  testbed  the testbed's train split (`data.testbed`, seed = recipe seed)
  gsm8k    GSM8K train (from data.benchmarks_dir)
  jsonl    `data.prompts_file` ({"question", "answer"?} per line; without answers nothing is graded)
Each completion is graded against the prompt's answer (pipeline.data.grading); `only_correct` keeps just
the correct ones (rejection sampling). The prompt is the question and `data.instruction` in the
model's chat template. Output `<out_dir>/traces.jsonl`, one row per kept completion, a
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
from pipeline.evaluation import sample_and_grade
from pipeline.generate import GenerationSpec
from pipeline.engine.stage_api import ANY_MODEL, TRACES, StageConfig, StageContext, stage_ref, untrained_base_model
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.data.traces import Trace, write_traces

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


def check(config: Config, recipe) -> list[tuple[str, str]]:
    errors = untrained_base_model(config, recipe, "model")
    errors += check_training_data(recipe.data, need_answers=config.only_correct, where="only_correct")
    return errors


def run(ctx: StageContext) -> dict[str, float]:
    from accelerate import PartialState

    from pipeline.models import load_for_decoding

    config, recipe = ctx.config, ctx.recipe
    problems = training_problems(
        recipe.data,
        config.count,
        recipe.seed,
        need_answers=config.only_correct,
        where=f"stages.{ctx.name}.only_correct",
    )
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
    traces = [
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
        if r["correct"] or not config.only_correct
    ]
    if not traces:
        raise RuntimeError(f"{ctx.name}: no completion was graded correct, so no traces were kept (only_correct)")
    if PartialState().is_main_process:
        write_traces(traces, ctx.out_dir)
    tokens = sum(r["num_tokens"] for r in rows)
    metrics = {
        "count": len(problems),
        "generated": len(rows),
        "kept": len(traces),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "truncation_rate": sum(r["truncated"] for r in rows) / len(rows),
        "mean_tokens": tokens / len(rows),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
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
