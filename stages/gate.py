"""Stage `gate`: is the quantized student capable enough for RL? (pass / fail, with the numbers)

The studies found GRPO on a quantized reasoning model helps only from a viable cold start; below a
capability threshold it collapses. The gate evaluates `model` (through pipeline.evaluation, the same
path as `eval`) on a benchmark and passes when every threshold given holds:
  accuracy ≥ min_accuracy
  accuracy / teacher accuracy ≥ min_retention   (the teacher evaluated on the same problems, same decoding)
A stage with `when: <this gate>` is skipped when it fails (state `skipped`, exit code 0, downstream
stages reading that stage's passthrough input); `reasoning-qat run --force` runs it anyway, with a
warning. `explain(config, metrics)` words the verdict with the measured numbers; it is logged, and
written to `<out_dir>/verdict.txt`.

Metrics: accuracy, teacher_accuracy and retention (with a teacher), passed (1.0 / 0.0), and the
evaluator's pass_at_k / truncation_rate / mean_tokens for the student. Samples go to
`samples.jsonl` (student) and `teacher_samples.jsonl`.

    stages:
      gate:
        type: gate
        model: kd_qat
        teacher: teacher
        bench: testbed
        limit: 200
        min_retention: 0.5
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.data.benchmarks import check_bench, load_benchmark
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.engine.stage_api import ANY_MODEL, VERDICT, StageConfig, StageContext, stage_ref, untrained_base_model
from pipeline.evaluation import evaluate
from pipeline.generate import GenerationSpec

CODE_VERSION = 1
USES = ("seed", "data")
HEADLINE = "accuracy"
OUTPUT = VERDICT


class Config(StageConfig):
    type: Literal["gate"] = "gate"
    model: stage_ref(*ANY_MODEL)
    """The model judged: usually the quantized student (kd_qat, ptq)."""
    teacher: stage_ref(*ANY_MODEL) | None = None
    """The full-precision reference for `min_retention`: evaluated on the same problems and decoding."""
    min_accuracy: float | None = Field(None, ge=0, le=1)
    """Pass only if the model's accuracy is at least this."""
    min_retention: float | None = Field(None, ge=0)
    """Pass only if accuracy / teacher accuracy is at least this (needs `teacher`)."""
    bench: str = "testbed"
    """testbed (the recipe's data.testbed, test split), gsm8k, math500, aime24 or amc23."""
    limit: int | None = Field(None, ge=1, le=MAX_PROBLEMS)
    """Only the first `limit` problems (None: all)."""
    generation: GenerationSpec = GenerationSpec()
    """Decoding, for model and teacher alike."""

    @model_validator(mode="after")
    def _thresholds(self):
        if self.min_accuracy is None and self.min_retention is None:
            raise ValueError("give min_accuracy, min_retention or both")
        if self.min_retention is not None and self.teacher is None:
            raise ValueError("min_retention needs `teacher`")
        return self


def check(config: Config, recipe) -> list[tuple[str, str]]:
    return untrained_base_model(config, recipe, "model", "teacher") + check_bench(
        config.bench, recipe.data, limit=config.limit
    )


def verdict(config: Config, accuracy: float, teacher_accuracy: float | None) -> dict[str, float]:
    """The gate's metrics from the measured accuracies: retention (with a teacher) and passed."""
    metrics = {"accuracy": accuracy}
    passed = config.min_accuracy is None or accuracy >= config.min_accuracy
    if teacher_accuracy is not None:
        # a teacher that solves nothing leaves retention undefined: only min_accuracy can judge then
        retention = accuracy / teacher_accuracy if teacher_accuracy > 0 else 0.0
        metrics.update(teacher_accuracy=teacher_accuracy, retention=retention)
        if config.min_retention is not None:
            passed = passed and teacher_accuracy > 0 and retention >= config.min_retention
    metrics["passed"] = float(passed)
    return metrics


def explain(config: Config, metrics: dict[str, float]) -> str:
    """One line with the numbers, e.g.
    `accuracy 0.12 < min_accuracy 0.30; retention 0.25 (0.12 / 0.48) >= min_retention 0.20`."""
    parts = []
    if config.min_accuracy is not None:
        op = ">=" if metrics["accuracy"] >= config.min_accuracy else "<"
        parts.append(f"accuracy {metrics['accuracy']:.3f} {op} min_accuracy {config.min_accuracy:g}")
    if config.min_retention is not None and metrics["teacher_accuracy"] == 0:
        parts.append("the teacher solved none of the problems, so retention is undefined and min_retention fails")
    elif config.min_retention is not None:
        op = ">=" if metrics["retention"] >= config.min_retention else "<"
        parts.append(
            f"retention {metrics['retention']:.3f} ({metrics['accuracy']:.3f} / "
            f"{metrics['teacher_accuracy']:.3f}) {op} min_retention {config.min_retention:g}"
        )
    return "; ".join(parts)


def run(ctx: StageContext) -> dict[str, float]:
    from accelerate import PartialState

    from pipeline.models import load_for_decoding

    config, recipe = ctx.config, ctx.recipe
    problems = load_benchmark(
        config.bench,
        limit=config.limit,
        data_dir=recipe.data.benchmarks_dir,
        testbed=recipe.data.testbed,
        hub=recipe.data.hub,
    )

    def accuracy_of(field: str, samples: str) -> dict[str, float]:
        model, tokenizer = load_for_decoding(ctx.inputs[field], recipe.model.trust_remote_code)
        return evaluate(
            model,
            tokenizer,
            problems,
            config.generation,
            samples_path=ctx.out_dir / samples,
            instruction=recipe.data.instruction,
        )

    student = accuracy_of("model", "samples.jsonl")
    teacher = accuracy_of("teacher", "teacher_samples.jsonl")["accuracy"] if config.teacher else None
    metrics = verdict(config, student["accuracy"], teacher)
    text = explain(config, metrics)
    ctx.log.info(
        "%s: %s on %s (%d problems): %s",
        ctx.name,
        "passed" if metrics["passed"] else "FAILED",
        config.bench,
        len(problems),
        text,
    )
    if PartialState().is_main_process:
        (ctx.out_dir / "verdict.txt").write_text(("passed: " if metrics["passed"] else "failed: ") + text + "\n")
    return {**metrics, **{k: student[k] for k in ("pass_at_k", "truncation_rate", "mean_tokens")}}
