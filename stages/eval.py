"""Stage `eval`: a model's accuracy on a benchmark, and/or its perplexity and KL to a teacher, teacher-forced.

Benchmarks: the testbed's test split, GSM8K, MATH-500, AIME, AMC.

Generation (`generate`, on by default): samples K = `generation.num_samples` completions per problem
through the one generation path (pipeline.generate), grades them with math-verify
(pipeline.data.grading) and reports accuracy (avg@K), pass@K, truncation rate, mean generated tokens and
tokens/s. Every sample goes to `<out_dir>/samples.jsonl` ({"id", "question", "gold", "sample",
"completion", "correct", "num_tokens", "truncated"}). The Qwen3 cards evaluate thinking mode with
temperature 0.6, top-p 0.95, top-k 20; the default here is greedy, which is deterministic and what
the testbed needs.

Perplexity (`perplexity: true`; pipeline.evaluation.perplexity): of the bench's reference solutions
given their chat prompts, or of a text file (`text`, in windows of `max_length` tokens); with
`teacher`, also the mean per-token KL(teacher || model) on the same tokens. This is how a small
pretrained model is judged, whose accuracy says little (SmolLM2-135M solves ~2% of GSM8K);
`generate: false` measures only these, in seconds instead of a generation run.

    stages:
      eval_kd:
        type: eval
        model: kd_qat
        bench: gsm8k
        limit: 200
        generation: {max_new_tokens: 1024}
      heldout_kl:
        type: eval
        model: kd_qat
        generate: false
        perplexity: true
        text: data/heldout.jsonl     # {"text": ...} per line
        teacher: model
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.data.benchmarks import check_bench, load_benchmark
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.engine.stage_api import (
    ADDED_KEY,
    ANY_MODEL,
    SAMPLES,
    StageConfig,
    StageContext,
    stage_ref,
    untrained_base_model,
)
from pipeline.evaluation import evaluate, perplexity, solution_examples, text_examples
from pipeline.generate import GenerationSpec

CODE_VERSION = 1
USES = ("seed", "data")
HEADLINE = ("accuracy", "perplexity")  # a perplexity-only eval has no accuracy
OUTPUT = SAMPLES


class Config(StageConfig):
    type: Literal["eval"] = "eval"
    model: stage_ref(*ANY_MODEL)
    """The model to evaluate: a stage that wrote one (sft, ptq, kd_qat, rl, export), or "model"."""
    bench: str = "testbed"
    """testbed (the recipe's data.testbed, test split), gsm8k, math500, aime24 or amc23."""
    limit: int | None = Field(None, ge=1, le=MAX_PROBLEMS)
    """Only the first `limit` problems (None: all)."""
    generate: bool = Field(True, json_schema_extra=ADDED_KEY)
    """Sample and grade completions (accuracy); false: only perplexity."""
    generation: GenerationSpec = GenerationSpec()
    """Decoding: max_new_tokens, temperature / top_p / top_k, num_samples (K), batch_size, seed, backend."""
    perplexity: bool = False
    """Also the perplexity of the bench's reference solutions (teacher-forced, solution tokens only;
    the testbed, GSM8K and MATH-500 have them), or of `text`."""
    text: str | None = Field(None, json_schema_extra=ADDED_KEY)
    """Perplexity over this text instead (.jsonl / .parquet with a `text` field, e.g. held-out prose)."""
    max_length: int = Field(2048, ge=2, json_schema_extra=ADDED_KEY)
    """Tokens per window of `text`."""
    teacher: stage_ref(*ANY_MODEL) | None = Field(None, json_schema_extra=ADDED_KEY)
    """Also the KL from this model (e.g. "model", the BF16 teacher) on the perplexity's tokens."""

    @model_validator(mode="after")
    def _something_to_measure(self):
        if not (self.generate or self.perplexity):
            raise ValueError("generate and perplexity are both false: nothing to evaluate")
        if (self.text is not None or self.teacher is not None) and not self.perplexity:
            raise ValueError("text and teacher apply to the perplexity: set perplexity: true")
        return self


def check(config: Config, recipe) -> list[tuple[str, str]]:
    errors = untrained_base_model(config, recipe, "model", *(["teacher"] if config.teacher else []))
    for key in ("model", "teacher"):
        source = recipe.stages.get(getattr(config, key) or "")
        if source is not None and source.type == "export" and source.format == "gptq":
            # transformers hands a GPTQ checkpoint to optimum / gptqmodel, which this project does not install
            errors.append(
                (
                    key,
                    f"{getattr(config, key)!r} writes the GPTQ format, for vLLM / SGLang (docs/serving.md); evaluate "
                    f"{source.model!r}, the stage it exports, or an export in the pack-quantized format",
                )
            )
    if config.text is not None and not Path(config.text).expanduser().is_file():
        errors.append(("text", f"no such file: {config.text}"))
    if config.generate or config.text is None:
        errors += check_bench(config.bench, recipe.data, limit=config.limit)
    return errors


def run(ctx: StageContext) -> dict[str, float]:

    from pipeline.data.rows import read_texts
    from pipeline.models import load_for_decoding

    config, data = ctx.config, ctx.recipe.data
    trust = ctx.recipe.model.trust_remote_code
    measures_bench = config.generate or config.text is None
    problems = (
        load_benchmark(
            config.bench, limit=config.limit, data_dir=data.benchmarks_dir, testbed=data.testbed, hub=data.hub
        )
        if measures_bench
        else []
    )
    model, tokenizer = load_for_decoding(ctx.inputs["model"], trust)
    metrics: dict[str, float] = {}
    if config.generate:
        ctx.log.info(
            "%s: %s, %d problems x %d samples, up to %d new tokens, on %s",
            ctx.name,
            config.bench,
            len(problems),
            config.generation.num_samples,
            config.generation.max_new_tokens,
            model.device,
        )
        metrics = evaluate(
            model,
            tokenizer,
            problems,
            config.generation,
            samples_path=ctx.out_dir / "samples.jsonl",
            instruction=data.instruction,
        )
        ctx.log.info(
            "%s: accuracy %.2f%%, pass@%d %.2f%%, truncated %.1f%%, %.0f tokens/s",
            ctx.name,
            100 * metrics["accuracy"],
            config.generation.num_samples,
            100 * metrics["pass_at_k"],
            100 * metrics["truncation_rate"],
            metrics["tokens_per_s"],
        )
    if config.perplexity:
        metrics |= _perplexity(
            ctx, model, tokenizer, problems, read_texts(config.text, f"stages.{ctx.name}.text") if config.text else None
        )
    return metrics


def _perplexity(ctx: StageContext, model, tokenizer, problems, texts) -> dict[str, float]:
    from pipeline.engine.errors import InputError
    from pipeline.models import load_model

    config = ctx.config
    teacher = None
    if config.teacher is not None:
        teacher = load_model(
            ctx.inputs["teacher"], device=model.device, trust_remote_code=ctx.recipe.model.trust_remote_code
        )
        if teacher.config.vocab_size != model.config.vocab_size:
            raise InputError(
                f"stages.{ctx.name}.teacher",
                f"vocabulary {teacher.config.vocab_size} differs from the model's {model.config.vocab_size}",
            )
    examples = (
        text_examples(tokenizer, texts, config.max_length)
        if texts is not None
        else solution_examples(tokenizer, problems, ctx.recipe.data.instruction)
    )
    metrics = perplexity(model, examples, tokenizer.pad_token_id, teacher=teacher)
    ctx.log.info(
        "%s: perplexity %.4f on %d %s tokens%s",
        ctx.name,
        metrics["perplexity"],
        metrics["perplexity_tokens"],
        "text" if texts is not None else "solution",
        f", KL to {config.teacher} {metrics['kl_to_teacher']:.4f}" if teacher is not None else "",
    )
    return metrics
