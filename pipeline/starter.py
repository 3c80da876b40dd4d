"""A commented starting recipe for the user's own model folder: `write_starter(model, scheme, out)`, what
`reasoning-qat init` (pipeline/cli/init.py) runs.

    reasoning-qat init --model /models/My-Reasoner-1.5B --scheme w3g128 [--out my-reasoner.yaml]

The recipe is the shipped Qwen3-0.6B workflow of the scheme (pipeline/recipes/qwen3-0.6b-w3g128.yaml,
qwen3-0.6b-w4a4kv4.yaml) pointed at the folder: its config.json is read through pipeline.models (closed:
a model whose loading would run its own code is refused), the scheme is checked against its layer widths
(widths 128 does not divide get the `largest_divisor` group size, named in a comment), completion lengths
are capped by its context, and the text is validated as `reasoning-qat validate` would before it is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import yaml

from pipeline.engine.errors import InputError
from pipeline.engine.files import check_can_create

SCHEMES = ("w3g128", "w4a4kv4")
TOKEN_CAPS = {"eval": 32768, "traces": 8192, "train_eval": 4096}
"""Most new tokens per completion, as the shipped recipes set them: final evals (thinking mode), traces
(training-set solutions stay far shorter) and the held-out evals during training."""
PROMPT_ROOM = 1024
"""Tokens of context left to the prompt when a model's context caps a completion."""

HEADER = """\
# $scheme for $model_path, written by `reasoning-qat init` after the shipped recipe qwen3-0.6b-$scheme:
# a starting point, sized for a model of about 1B parameters on one 80 GB GPU. Read the comments, then
#   reasoning-qat validate $out
#   reasoning-qat run $out
#   reasoning-qat report $out --baseline teacher_math500
# Every key, its default and meaning: `reasoning-qat stages TYPE` (docs/stages.md).
# Decoding is the reasoning setting of the Qwen3 and DeepSeek-R1 cards (temperature 0.6, top-p 0.95,
# top-k 20); use your model card's. Completions: up to $eval_tokens new tokens ($context_note).
name: $name
seed: 0

model:
  path: $model_path
  dtype: $dtype$dtype_note

"""

STAGES_HEAD = """\
data:
  task: gsm8k                 # training prompts: GSM8K train; a MATH-style `jsonl` prompts file fits the evals better

stages:
  teacher_math500:            # the BF16 reference
    type: eval
    model: model
    bench: math500
    generation: $eval_gen

  traces:                     # the model's own solutions of the training prompts: calibration and KD data
    type: traces
    model: model
"""
"""The data section and the first two stages, the same for both schemes."""

W3G128 = (
    """\
quant:
  preset: w3g128              # 3-bit asymmetric integer weights, one scale + zero per 128 input columns
  weights:
    group_size_policy: largest_divisor
$group_note
"""
    + STAGES_HEAD
    + """    count: 7473               # every GSM8K train prompt
    generation: $traces_gen

  gptq:                       # GPTQ (asymmetric, act-order) calibrated on the traces: the PTQ init and baseline
    type: ptq
    method: gptq
    calibration: traces

  gptq_math500:
    type: eval
    model: gptq
    bench: math500
    generation: $eval_gen

  kd_qat:                     # forward KL to the frozen BF16 teacher on its traces, from the GPTQ init
    type: kd_qat
    init: gptq
    teacher: model
    data: traces
    only_correct: true        # rejection-sampled traces
    steps: 1000
    batch_size: 64            # sequences per step; raise grad_accum (or lower this) when memory runs out
    grad_accum: 4
    lr: 1.0e-5                # a pretrained model: small steps
    warmup_steps: 50
    gradient_checkpointing: true
    checkpoint_every: 100
    eval_every: 250
    eval_bench: gsm8k
    eval_limit: 200
    eval_generation: $train_eval_gen

  gate:                       # GRPO only for a student that keeps >= 80% of the teacher's GSM8K accuracy
    type: gate
    model: kd_qat
    teacher: model
    bench: gsm8k
    limit: 500
    min_retention: 0.8
    generation: $train_eval_gen

  rl:                         # GRPO (DAPO loss, clip-higher) on the latent weights, with QeRL's noise
    type: rl
    init: kd_qat
    when: gate
    count: 7473
    steps: 200
    batch_size: 128           # 16 prompts x 8 completions per step
    num_generations: 8
    rollout_batch_size: 128
    lr: 1.0e-6
    epsilon_high: 0.28
    max_completion_length: $train_eval_tokens
    checkpoint_every: 20
    aqn: {sigma_start: 1.0e-2, sigma_end: 5.0e-4, num_stages: 10}

  export:                     # the deliverable: a packed W3G128 checkpoint
    type: export
    model: rl                 # the kd_qat student when the gate skipped rl

  export_math500:
    type: eval
    model: export
    bench: math500
    generation: $eval_gen
"""
)

W4A4KV4 = (
    """\
quant:
  preset: w4a4kv4             # int4 per-channel symmetric weights, int4 per-token activations, int4 KV per head
  activations: {clip_ratio: 0.9}   # QuaRot's activation clip ratio; FlatQuant learns its own clips on top

"""
    + STAGES_HEAD
    + """    count: 7473               # every GSM8K train prompt
    generation: $traces_gen

  flatquant:                  # learned transforms + clipping, layer by layer on output MSE: the PTQ init
    type: ptq                 # (method: quarot is the fixed-Hadamard baseline)
    method: flatquant
    weight_method: rtn        # with the learned weight clips
    calibration: traces
    epochs: 15

  flatquant_math500:
    type: eval
    model: flatquant
    bench: math500
    generation: $eval_gen

  kd_qat:                     # forward KL to the frozen BF16 teacher; transforms and clips train with the weights
    type: kd_qat
    init: flatquant
    teacher: model
    data: traces
    only_correct: true
    steps: 1000
    batch_size: 64            # sequences per step; raise grad_accum (or lower this) when memory runs out
    grad_accum: 4
    lr: 1.0e-5
    warmup_steps: 50
    transforms: trainable
    gradient_checkpointing: true
    checkpoint_every: 100

  export:                     # the deliverable: W4A4KV4 with its online transforms
    type: export
    model: kd_qat

  export_math500:
    type: eval
    model: export
    bench: math500
    generation: $eval_gen
"""
)


def write_starter(model: str | Path, scheme: str, out: str | Path | None = None) -> Path:
    """Write the starting recipe for the model folder `model` in `scheme` to `out` (default `<name>.yaml` here);
    returns its path. Bad input raises InputError or RecipeError before anything is written."""
    from pipeline.data.benchmarks import naming_ways_out
    from pipeline.engine.recipe import RecipeError, parse_recipe

    if scheme not in SCHEMES:
        raise InputError("--scheme", f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    config = _model_config(model)
    name = _recipe_name(model, scheme)
    out = Path(out) if out is not None else Path(f"{name}.yaml")
    _check_out(out)
    text = render(name, Path(model).resolve(), scheme, config, out)
    try:
        parse_recipe(yaml.safe_load(text), source=str(out))  # RecipeError: every reason it would not validate
    except RecipeError as e:  # the recipe is not written yet: the environment is the one way to its benchmarks
        raise naming_ways_out(
            e, "data.benchmarks_dir", "export REASONING_QAT_BENCHMARKS=DIR and run init again"
        ) from None
    with open(out, "x") as f:  # "x": never replace a file that appeared meanwhile
        f.write(text)
    return out


def render(name: str, model_path: Path, scheme: str, config, out: Path) -> str:
    """The recipe text for a model whose transformers config is `config`."""
    context = getattr(config, "max_position_embeddings", None)
    tokens = {k: _completion_budget(cap, context) for k, cap in TOKEN_CAPS.items()}
    sampling = "temperature: 0.6, top_p: 0.95, top_k: 20"
    dtype = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    values = dict(
        scheme=scheme,
        model_path=model_path,
        out=out,
        name=name,
        dtype=dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16",
        dtype_note="" if dtype in ("bfloat16", "float16", "float32") else "        # config.json names no dtype",
        eval_tokens=tokens["eval"],
        train_eval_tokens=tokens["train_eval"],
        context_note=f"its context is {context} tokens" if context else "config.json gives no context length",
        eval_gen=f"{{max_new_tokens: {tokens['eval']}, {sampling}, batch_size: 16}}",
        traces_gen=f"{{max_new_tokens: {tokens['traces']}, {sampling}, batch_size: 64}}",
        train_eval_gen=f"{{max_new_tokens: {tokens['train_eval']}, {sampling}, batch_size: 64}}",
        group_note=_group_note(config, scheme) if scheme == "w3g128" else "",
    )
    body = W3G128 if scheme == "w3g128" else W4A4KV4
    return Template(HEADER + body).substitute(values)


def _model_config(model: str | Path):
    """The transformers config of the model folder `model`, read without running code from it."""
    from pipeline.loading import load_config
    from pipeline.models import check_model_dir

    if not Path(model).is_dir():
        raise InputError("--model", f"no such directory: {model}")
    try:
        check_model_dir(model, "--model", allow="write its recipe by hand with model.trust_remote_code: true")
        return load_config(model)
    except (OSError, ValueError) as e:  # e.g. a model type transformers does not know
        raise InputError("--model", f"{model}: {str(e).splitlines()[0]}") from None


def _recipe_name(model: str | Path, scheme: str) -> str:
    """`<folder>-<scheme>`, lowercased, made a valid recipe name; a stage folder's model/ takes the stage's name."""
    path = Path(model).resolve()
    folder = path.parent.name if path.name == "model" else path.name
    slug = re.sub(r"[^a-z0-9_.-]+", "-", folder.lower()).strip("-._") or "model"
    return f"{slug}-{scheme}"


def _check_out(out: Path) -> None:
    if out.exists():
        raise InputError("--out", f"{out} exists; give another name or remove it")
    if not out.parent.is_dir():
        raise InputError("--out", f"no such directory: {out.parent}")
    check_can_create(out, "--out")  # permission bits do not tell root that /proc or a read-only mount refuses


def _completion_budget(cap: int, context: int | None) -> int:
    """`cap` new tokens, or what the context leaves after PROMPT_ROOM tokens of prompt (at least half of it)."""
    if context is None:
        return cap
    return min(cap, max(context - PROMPT_ROOM, context // 2))


def _group_note(config, scheme: str) -> str:
    """Comment lines under `group_size_policy`: which widths get which lowered group size. RecipeError when
    no group size fits some layer."""
    from pipeline.engine.recipe import RecipeError
    from pipeline.quant.fit import check_fit, lowered_group_sizes
    from pipeline.quant.scheme import QuantSpec

    spec = QuantSpec.model_validate({"preset": scheme, "weights": {"group_size_policy": "largest_divisor"}})
    errors = check_fit(config, spec)
    if errors:
        raise RecipeError(errors)
    lowered = lowered_group_sizes(config, spec)
    if not lowered:
        return "    # every quantized Linear's width is a multiple of 128: groups of 128 throughout\n"
    sizes = ", ".join(f"{width} -> {size}" for width, size in lowered.items())
    return (
        f"    # widths 128 does not divide get the largest multiple of 32 that divides them ({sizes});\n"
        "    # `exact` would refuse the model instead\n"
    )
