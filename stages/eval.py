"""Stage `eval`: a model's accuracy on a benchmark (the testbed's test split, GSM8K, MATH-500, AIME, AMC).

Samples K = `generation.num_samples` completions per problem through the one generation path
(pipeline.generate), grades them with math-verify (pipeline.grading) and reports accuracy (avg@K),
pass@K, truncation rate, mean generated tokens and tokens/s. Every sample goes to
`<out_dir>/samples.jsonl` ({"id", "question", "gold", "sample", "completion", "correct",
"num_tokens", "truncated"}). The Qwen3 cards evaluate thinking mode with temperature 0.6, top-p 0.95,
top-k 20; the default here is greedy, which is deterministic and what the testbed needs.

    stages:
      eval_kd:
        type: eval
        model: kd_qat
        bench: gsm8k
        limit: 200
        generation: {max_new_tokens: 1024}
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.benchmarks import check_bench, load_benchmark
from pipeline.evaluate import evaluate, solution_perplexity
from pipeline.generate import GenerationSpec
from pipeline.stage_api import ANY_MODEL, SAMPLES, StageConfig, StageContext, stage_ref, untrained_base_model
from pipeline.tasks.testbed import MAX_PROBLEMS

CODE_VERSION = 1
USES = ("seed", "data")
HEADLINE = "accuracy"
OUTPUT = SAMPLES


class Config(StageConfig):
    type: Literal["eval"] = "eval"
    model: stage_ref(*ANY_MODEL)
    """The model to evaluate: a stage that wrote one (sft, ptq, kd_qat, rl, export), or "model"."""
    bench: str = "testbed"
    """testbed (the recipe's data.testbed, test split), gsm8k, math500, aime24 or amc23."""
    limit: int | None = Field(None, ge=1, le=MAX_PROBLEMS)
    """Only the first `limit` problems (None: all)."""
    generation: GenerationSpec = GenerationSpec()
    """Decoding: max_new_tokens, temperature / top_p / top_k, num_samples (K), batch_size, seed, backend."""
    perplexity: bool = False
    """Also the perplexity of the same problems' reference solutions (teacher-forced, solution tokens
    only; pipeline.evaluate.solution_perplexity): the testbed, GSM8K and MATH-500 have them."""


def check(config: Config, recipe) -> list[tuple[str, str]]:
    return untrained_base_model(config, recipe, "model") + check_bench(config.bench, recipe.data, limit=config.limit)


def run(ctx: StageContext) -> dict[str, float]:
    from accelerate import PartialState

    from pipeline.models import load_model, load_tokenizer

    config, recipe = ctx.config, ctx.recipe
    problems = load_benchmark(config.bench, limit=config.limit, data_dir=recipe.data.benchmarks_dir,
                              testbed=recipe.data.testbed)
    trust = recipe.model.trust_remote_code
    tokenizer = load_tokenizer(ctx.inputs["model"], trust_remote_code=trust)
    model = load_model(ctx.inputs["model"], device=PartialState().device, trust_remote_code=trust)
    ctx.log.info("%s: %s, %d problems x %d samples, up to %d new tokens, on %s", ctx.name, config.bench,
                 len(problems), config.generation.num_samples, config.generation.max_new_tokens, model.device)
    metrics = evaluate(model, tokenizer, problems, config.generation, samples_path=ctx.out_dir / "samples.jsonl")
    if config.perplexity:
        metrics |= solution_perplexity(model, tokenizer, problems)
        ctx.log.info("%s: perplexity %.4f on %d solution tokens", ctx.name, metrics["perplexity"],
                     metrics["perplexity_tokens"])
    ctx.log.info("%s: accuracy %.2f%%, pass@%d %.2f%%, truncated %.1f%%, %.0f tokens/s", ctx.name,
                 100 * metrics["accuracy"], config.generation.num_samples, 100 * metrics["pass_at_k"],
                 100 * metrics["truncation_rate"], metrics["tokens_per_s"])
    return metrics
