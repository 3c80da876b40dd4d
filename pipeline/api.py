"""The Python API: what `reasoning-qat run / status / eval / export` do, as functions the CLI itself calls.

    import pipeline

    pipeline.run("recipes/demo.yaml", artifacts="artifacts")          # -> [Outcome(name, state, wall, headline)]
    pipeline.status("demo")                                            # a shipped recipe by name
    pipeline.export("artifacts/demo/kd_qat", "ckpt/", scheme="w3g128") # -> sizes of the checkpoint
    pipeline.evaluate("ckpt/", bench="gsm8k", limit=200)               # -> accuracy, pass@K, tokens/s, ...
    pipeline.perplexity("ckpt/", bench="gsm8k", teacher="artifacts/demo/teacher")  # -> perplexity, KL
    model = pipeline.load_quantized("ckpt/")

The package exposes these functions lazily (pipeline/__init__.py); the measures themselves are in
pipeline.evaluation. A recipe argument is a `Recipe`, a YAML path or the name of a shipped recipe; `overrides`
are `--set` strings. Bad input raises RecipeError (every problem) or InputError (one), before anything is
written, as on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.engine.errors import InputError
from pipeline.engine.files import check_can_create

if TYPE_CHECKING:
    from torch import nn

    from pipeline.engine.recipe import Recipe
    from pipeline.engine.runner import Decision, Outcome, Processes
    from pipeline.generate import GenerationSpec

DEFAULT_ARTIFACTS = "artifacts"


def load(recipe: "Recipe | str | Path", overrides: Sequence[str] = ()) -> "Recipe":
    """The validated recipe: `recipe` itself, or the file (or shipped recipe) it names with `overrides` applied."""
    from pipeline.engine.recipe import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        if overrides:
            raise InputError("overrides", "apply overrides when loading the recipe, not to a loaded Recipe")
        return recipe
    return load_recipe(recipe, overrides)


def run(
    recipe: "Recipe | str | Path",
    artifacts: str | Path = DEFAULT_ARTIFACTS,
    *,
    overrides: Sequence[str] = (),
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    procs: "Processes | None" = None,
) -> "list[Outcome]":
    """Run what is missing or stale under `artifacts/<recipe name>/`: `from_stage` re-runs it and everything
    downstream, `only` just it, `force` every selected stage. Returns each stage's outcome; raises RunError when
    a stage fails, RunStopped on SIGINT / SIGTERM. `procs`: the caller's view of the ranks, if it made one."""
    from pipeline.engine.runner import Options
    from pipeline.engine.runner import run as run_recipe

    options = Options(from_stage=from_stage, only=only, force=force)
    return run_recipe(load(recipe, overrides), artifacts, options, procs)


def plan(
    recipe: "Recipe | str | Path",
    artifacts: str | Path = DEFAULT_ARTIFACTS,
    *,
    overrides: Sequence[str] = (),
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
) -> "list[Decision]":
    """What `run` with the same arguments would do to each stage (`action`: run / skip / gate, and why);
    writes nothing."""
    from pipeline.engine.runner import Options
    from pipeline.engine.runner import plan as plan_recipe
    from pipeline.engine.store import Store

    loaded = load(recipe, overrides)
    options = Options(from_stage=from_stage, only=only, force=force)
    return plan_recipe(loaded, Store(artifacts, loaded.name), options)


def status(
    recipe: "Recipe | str | Path", artifacts: str | Path = DEFAULT_ARTIFACTS, *, overrides: Sequence[str] = ()
) -> "list[Decision]":
    """Each stage's `state` (complete, stale, pending, skipped, failed, running) and `reason`; writes nothing."""
    from pipeline.engine.runner import status as recipe_status
    from pipeline.engine.store import Store

    loaded = load(recipe, overrides)
    return recipe_status(loaded, Store(artifacts, loaded.name))


def load_quantized(path: str | Path, device: str | None = None, trust_remote_code: bool = False) -> "nn.Module":
    """The quantized model at `path` (a ptq / kd_qat / rl stage directory, its model folder or an exported
    checkpoint), checked first (safetensors only, files matching their manifest), in eval mode on `device`."""
    from pipeline.quant.formats.io import load_quantized as load_checked

    _check_quantized(Path(path), "path", trust_remote_code)
    return load_checked(path, device=device, trust_remote_code=trust_remote_code)


def export(
    source: str | Path,
    out: str | Path,
    scheme: str | None = None,
    trust_remote_code: bool = False,
    format: str = "pack-quantized",
) -> dict[str, float]:
    """Write the quantized model at `source` to `out` (missing or empty) as a real low-bit checkpoint; `scheme`
    (a preset) must name the model's own; `format` is pack-quantized (compressed-tensors) or gptq (3/4-bit
    weight-only models, for vLLM's GPTQ kernels). Returns bytes on disk and bits per weight / parameter."""
    from pipeline.quant.formats.export import export_checkpoint

    source, out = Path(source), Path(out)
    _check_quantized(source, "stage_dir", trust_remote_code)
    if out.exists() and not out.is_dir():
        raise InputError("--out", f"{out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        raise InputError("--out", f"{out} exists and is not empty")
    check_can_create(out, "--out")
    return export_checkpoint(source, scheme, out, trust_remote_code, format)


def evaluate(
    model_dir: str | Path,
    bench: str = "testbed",
    limit: int | None = None,
    generation: "GenerationSpec | dict[str, Any] | None" = None,
    samples_path: str | Path | None = None,
    *,
    data_dir: str | None = None,
    hub: str | None = None,
    recipe: "Recipe | str | Path | None" = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Accuracy (avg@K), pass@K, truncation rate, tokens and speed of the model at `model_dir` on `bench`'s first
    `limit` problems, sampled as `generation` says (a GenerationSpec or its keys); every sample is written to
    `samples_path` (jsonl) when given. Problems come from `data_dir` or the hub dataset `hub`; `recipe`: take
    the testbed spec, data sources and instruction from its `data` section."""
    from pipeline.evaluation import bench_problems
    from pipeline.evaluation import evaluate as evaluate_model
    from pipeline.generate import GenerationSpec

    spec = generation if isinstance(generation, GenerationSpec) else GenerationSpec(**(generation or {}))
    if samples_path is not None:
        _check_out(str(samples_path))
    problems, instruction = bench_problems(bench, limit, data_dir, hub, _recipe_data(recipe))
    tokenizer = _tokenizer(str(model_dir), "MODEL_DIR", needs_chat=True, trust_remote_code=trust_remote_code)
    model = _model(str(model_dir), dtype, trust_remote_code)
    return evaluate_model(model, tokenizer, problems, spec, samples_path=samples_path, instruction=instruction)


def perplexity(
    model_dir: str | Path,
    bench: str = "testbed",
    limit: int | None = None,
    *,
    text: str | Path | None = None,
    teacher: str | Path | None = None,
    max_length: int = 2048,
    batch_size: int = 16,
    data_dir: str | None = None,
    hub: str | None = None,
    recipe: "Recipe | str | Path | None" = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Teacher-forced perplexity of the model at `model_dir` (and, with `teacher`, the mean per-token
    KL(teacher || model)) over `bench`'s reference solutions given their prompts (`num_problems` of them), or
    over the `text` file (.jsonl / .parquet with a `text` field) in windows of `max_length` tokens. Problems
    come from `data_dir`, the hub dataset `hub` or `recipe`'s `data` section, as for `evaluate`."""
    from pipeline.data.rows import read_texts
    from pipeline.evaluation import bench_problems, solution_examples, text_examples
    from pipeline.evaluation import perplexity as measure

    if max_length < 2:
        raise InputError("--max-length", f"must be >= 2, got {max_length}")
    texts = read_texts(text, "--text") if text else None
    if texts is None:
        problems, instruction = bench_problems(bench, limit, data_dir, hub, _recipe_data(recipe))
    tokenizer = _tokenizer(str(model_dir), "MODEL_DIR", needs_chat=texts is None, trust_remote_code=trust_remote_code)
    if teacher:
        _tokenizer(str(teacher), "--teacher", needs_chat=False, trust_remote_code=trust_remote_code)
    examples = (
        text_examples(tokenizer, texts, max_length) if texts else solution_examples(tokenizer, problems, instruction)
    )
    model = _model(str(model_dir), dtype, trust_remote_code)
    teacher_model = None
    if teacher:
        teacher_model = _model(str(teacher), dtype, trust_remote_code)
        if teacher_model.config.vocab_size != model.config.vocab_size:
            raise InputError(
                "--teacher",
                f"vocabulary {teacher_model.config.vocab_size} differs from the model's {model.config.vocab_size}",
            )
    metrics = measure(model, examples, tokenizer.pad_token_id, teacher=teacher_model, batch_size=batch_size)
    if texts is None:
        metrics["num_problems"] = len(problems)
    return metrics


def _recipe_data(recipe: "Recipe | str | Path | None"):
    """The `data` section of the recipe `evaluate` / `perplexity` take problems from, if any. Loading validates its
    stages, whose benchmarks --data-dir does not reach, and `eval` has no --set: a missing benchmark directory names
    the ways out that are left."""
    from pipeline.data.benchmarks import naming_ways_out
    from pipeline.engine.recipe import RecipeError

    if recipe is None:
        return None
    try:
        return load(recipe).data
    except RecipeError as e:
        ways_out = "set it in the recipe or set $REASONING_QAT_BENCHMARKS"
        raise naming_ways_out(e, "data.benchmarks_dir", ways_out) from None


# -- checks of what the caller named, before anything is loaded or written --------------------------------------


def _check_out(path: str) -> None:
    """`--out` must be a file this process can write, checked before the evaluation it would end."""
    out = Path(path)
    if out.is_dir():
        raise InputError("--out", f"{path} is a directory; give a file name, e.g. {out / 'samples.jsonl'}")
    check_can_create(out, "--out")
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError("--out", f"{path} cannot be written (permission denied)")


def _check_model_dir(path: str, where: str, trust_remote_code: bool) -> None:
    import json

    from pipeline.data.chat import NO_TOKENIZER, TOKENIZER_FILES
    from pipeline.models import PASS_TRUST_FLAG, check_model_dir

    if not Path(path).exists():
        raise InputError(where, f"no such directory: {path}")
    inner = Path(check_model_dir(path, where, trust_remote_code, allow=PASS_TRUST_FLAG))
    # transformers hands a GPTQ checkpoint to optimum / gptqmodel, which this project does not install (their pins
    # are not ours): refused here, before the ImportError a load would end in
    quantization = json.loads((inner / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "gptq":
        raise InputError(
            where,
            f"{inner} is a GPTQ-format checkpoint (export --format gptq), for vLLM / SGLang (docs/serving.md); "
            "evaluate the stage directory it was exported from, or its default (pack-quantized) export",
        )
    if not any((inner / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(where, f"{inner} {NO_TOKENIZER}")


def _tokenizer(path: str, where: str, needs_chat: bool, trust_remote_code: bool):
    """The tokenizer of a model directory the user named, checked before any weights are read."""
    from pipeline.data.chat import NO_CHAT_TEMPLATE
    from pipeline.models import load_tokenizer

    _check_model_dir(path, where, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if needs_chat and not tokenizer.chat_template:
        raise InputError(where, f"{path} {NO_CHAT_TEMPLATE}")
    return tokenizer


def _model(path: str, dtype: str | None, trust_remote_code: bool):
    """The model of a directory `_tokenizer` checked, on this process's device."""
    from accelerate import PartialState

    from pipeline.models import load_model

    return load_model(path, dtype=dtype, device=PartialState().device, trust_remote_code=trust_remote_code)


def _check_quantized(path: Path, where: str, trust_remote_code: bool) -> None:
    """InputError(where, ...) unless `path` holds a quantized model this process may load."""
    from pipeline.models import PASS_TRUST_FLAG, check_model_dir
    from pipeline.quant.formats.layout import is_quantized

    if not path.exists():
        raise InputError(where, f"{path} does not exist")
    check_model_dir(path, where, trust_remote_code, allow=PASS_TRUST_FLAG)
    if not is_quantized(path):
        raise InputError(where, f"{path} holds no quantized model (run a ptq stage first)")
