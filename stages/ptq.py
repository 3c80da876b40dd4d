"""Stage `ptq`: post-training quantization of the BF16 teacher into the QuantLinear model (PTQ init).

Methods:
  - `gptq` (default): GPTQ (Frantar et al. 2023) through llmcompressor's GPTQModifier + oneshot,
    calibrated on the teacher's own reasoning traces (the paper's domain-matched calibration) or on
    the generic text source (the WikiText stand-in, see pipeline.quant.calibration); asymmetric,
    act-order ("static"), min-max or MSE-searched ranges ("clipping"). See pipeline.quant.methods.gptq for
    how its result becomes our representation.
  - `rtn`: round-to-nearest with min-max (or MSE) ranges; no data needed (calibration data, when
    given, only feeds the SQNR report).
  - `quarot` (W4A4KV4 baseline): Hadamard rotations fused into the weights plus online ones on the
    down_proj input and on queries/keys (pipeline.quant.methods.quarot), then `weight_method` rtn or gptq on the
    rotated weights.
  - `flatquant` (W4A4KV4 PTQ init): learned Kronecker-factored affine transforms, weight and activation
    clipping, calibrated layer by layer on output MSE (`epochs`, `lr`, `nsamples`, `seqlen`, `batch_size`;
    pipeline.quant.methods.flatquant), then `weight_method` rtn (with the learned clips) or gptq (on the learned
    clipped grid). The model is quantized and saved in float32 (the merged transforms keep their precision;
    KD-QAT trains in float32 anyway).
  Online transforms are saved with the model (pipeline.quant.formats.io) and reload with it.
Each method has its own config (Rtn, Gptq, Quarot, Flatquant; `method` picks it): a key that does not apply to
the chosen method (e.g. `epochs` with gptq) is an error at validation.
The scheme is the recipe's `quant` section (e.g. `quant: w3g128`).

Outputs: `<out_dir>/model/` (pipeline.quant.formats.io layout: safetensors with latent weights, scales and
zero points, `reasoning_qat_quant.json` with the layers whose group size was lowered, tokenizer),
`<out_dir>/sqnr.json` (per layer: weight and output SQNR in dB). Metrics: mean/min SQNR,
final-hidden-state SQNR, wall time of the quantization, layers with a lowered group size.
The SQNR report runs the unquantized and the quantized model over the first `sqnr_samples`
calibration sequences cut to `sqnr_seqlen` tokens, one forward pass each (on CPU it once took most
of a 135M model's RTN stage); `sqnr_samples: 0` skips it (no sqnr.json, no SQNR metrics).

    reasoning-qat run recipes/demo.yaml --only ptq
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_serializer, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import (
    ADDED_KEY,
    MODEL,
    QUANTIZED,
    TRACES,
    StageContext,
    VariantConfig,
    register_variants,
    stage_ref,
)

CODE_VERSION = 5
USES = ("seed", "quant")
HEADLINE = "output_sqnr_mean"
OUTPUT = QUANTIZED


class Config(VariantConfig):
    """The keys every method shares; `method` picks one of the per-method configs below (Rtn, Gptq, Quarot,
    Flatquant), a pydantic discriminated union (pipeline.engine.stage_api.VariantConfig): `Config(...)` returns the
    chosen method's config, and a key of another method is refused."""

    type: Literal["ptq"] = "ptq"
    model: stage_ref(MODEL) = "model"
    """The unquantized (BF16) model to quantize: a stage (e.g. the sft teacher) or "model"."""
    calibration: stage_ref(TRACES) | None = None
    """A traces stage whose traces calibrate GPTQ (calibration_source "traces")."""
    calibration_source: Literal["traces", "generic"] = "traces"
    """"traces": the `calibration` stage's traces; "generic": non-domain text, `calibration_text` or the
    built-in WikiText stand-in (Python standard-library docstrings)."""
    calibration_text: str | None = None
    """calibration_source generic: a text corpus to cut calibration windows from (.jsonl / .parquet with
    a `text` field, e.g. a WikiText or C4 slice); None: the built-in text."""
    method: Literal["rtn", "gptq", "quarot", "flatquant"] = "gptq"
    """How the model is quantized (see the module docstring)."""
    nsamples: int = Field(128, gt=0)
    """Calibration sequences."""
    seqlen: int = Field(2048, gt=0)
    """Tokens per calibration sequence (traces are truncated, generic text is cut to exactly this)."""
    observer: Literal["minmax", "mse"] = "minmax"
    """How each group's range is chosen: min-max, or llmcompressor's MSE grid search (clipping)."""
    sqnr_samples: int = Field(4, ge=0)
    """Calibration sequences run through the model for the SQNR report; 0: no report."""
    sqnr_seqlen: int = Field(256, gt=0)
    """Tokens of each of those sequences (truncated): with sqnr_samples, the report's cost."""

    @model_validator(mode="after")
    def _source(self):
        weight_method = getattr(self, "weight_method", None)
        needs_data = self.method in ("gptq", "flatquant") or (self.method == "quarot" and weight_method == "gptq")
        if self.calibration_source == "traces" and self.calibration is None and needs_data:
            raise ValueError("calibration_source 'traces' needs `calibration: <traces stage>`")
        if self.calibration_source == "generic" and self.calibration is not None:
            raise ValueError("calibration is set but calibration_source is 'generic'; drop one")
        if self.calibration_text is not None and self.calibration_source != "generic":
            raise ValueError("calibration_text is the generic source; set calibration_source: generic")
        return self

    # The flat key set is the fingerprint's format, kept so that finished stages are not re-run. Before the
    # per-method configs, one Config held every method's keys, so every ptq manifest records (and every ptq
    # fingerprint hashes) all of them, the other methods' at their defaults. A method's config therefore dumps
    # the flat key set: its own keys as set, every other method's key at its default (which the method never
    # reads); and `result_fields` hands `result_config` the fields of the flat set, so that `batch_size`
    # (ADDED_KEY) is left out at its default for every method, as it was. A dump is thus a record, not an
    # input: `Config.model_validate(config.model_dump())` refuses the other methods' keys.
    @model_serializer(mode="wrap")
    def _flat(self, handler) -> dict[str, Any]:
        own = handler(self)
        return {
            name: own[name] if name in own else to_jsonable_python(info.get_default(call_default_factory=True))
            for name, info in Config.result_fields().items()
        }

    @classmethod
    def result_fields(cls) -> dict[str, FieldInfo]:
        return METHODS.fields(Config)


class _GptqKeys(BaseModel):
    """GPTQ's settings: method gptq, and quarot / flatquant with weight_method gptq."""

    block_size: int = Field(128, gt=0)
    """GPTQ: columns updated per block (lazy batch updates)."""
    dampening_frac: float = Field(0.01, ge=0)
    """GPTQ: fraction of the Hessian's mean diagonal added to its diagonal."""
    actorder: Literal["static", "weight"] | None = "static"
    """GPTQ: sweep columns by decreasing Hessian diagonal ("static" = "weight"); None: in order."""


class _TransformKeys(_GptqKeys):
    """quarot / flatquant: the transform, then the weights quantized by `weight_method`."""

    weight_method: Literal["rtn", "gptq"] = "rtn"
    """quarot / flatquant: how the transformed weights are quantized (GPTQ settings below apply)."""


class Rtn(Config):
    """method rtn: no GPTQ settings, no transform."""

    method: Literal["rtn"] = "rtn"


class Gptq(Config, _GptqKeys):
    method: Literal["gptq"] = "gptq"


class Quarot(Config, _TransformKeys):
    method: Literal["quarot"] = "quarot"


class Flatquant(Config, _TransformKeys):
    method: Literal["flatquant"] = "flatquant"
    epochs: int = Field(15, ge=0)
    """flatquant: passes over the calibration samples per decoder layer."""
    lr: float = Field(1e-3, gt=0)
    """flatquant: AdamW learning rate of the transforms and clips (cosine to 0 over each layer)."""
    smooth_alpha: float = Field(0.5, ge=0, le=1)
    """flatquant: SmoothQuant migration strength of the per-channel smoothing init."""
    batch_size: int | None = Field(None, ge=1, json_schema_extra=ADDED_KEY)
    """flatquant: calibration sequences per optimizer step, each transform merged once per step
    (pipeline.quant.methods.flatquant.calibrate). FlatQuant's code takes 4 with lr 5e-3: fewer steps want the larger
    rate (4 at 1e-3 did worse than 1 at 1e-3 on our tests, 4 at 5e-3 as well or better). None: one sequence per
    step with the first version's arithmetic, as before this key; 1 is that schedule, faster, rounded differently.
    Set, the traces are packed into windows of exactly `seqlen` tokens, so that every batch fills."""
    compile: bool = Field(False, json_schema_extra=ADDED_KEY)
    """flatquant: torch.compile the per-layer loss (CUDA; compiles during the first layer, ~30 s). With tf32 on one
    H200 at the 0.6B shape, batch 8: 12.7 -> 9.7 ms a sequence (docs/results/flatquant/)."""
    tf32: bool = Field(False, json_schema_extra=ADDED_KEY)
    """flatquant: the float32 calibration's matmuls on TF32 tensor cores (CUDA): 1.7-1.9x faster on one H200 at the
    0.6B shape, the layers' output MSE unchanged to three digits; false: full float32 matmuls, as before this key."""


# the keys in the order the flat Config declared them: its documentation's order, and its dumps'
METHODS = register_variants(
    Config,
    "method",
    "gptq",
    (Rtn, Gptq, Quarot, Flatquant),
    order=(
        "type",
        "when",
        "model",
        "calibration",
        "calibration_source",
        "calibration_text",
        "method",
        "weight_method",
        "epochs",
        "lr",
        "smooth_alpha",
        "batch_size",
        "compile",
        "tf32",
        "nsamples",
        "seqlen",
        "block_size",
        "dampening_frac",
        "actorder",
        "observer",
        "sqnr_samples",
        "sqnr_seqlen",
    ),
)


def check(config: Config, recipe) -> list[tuple[str, str]]:
    from pathlib import Path

    errors = []
    if config.calibration_text is not None and not Path(config.calibration_text).expanduser().is_file():
        errors.append(("calibration_text", f"no such file: {config.calibration_text}"))
    return errors + _scheme_fit(recipe)


def _scheme_fit(recipe) -> list[tuple[str, str]]:
    """The recipe's scheme against the base model's layer widths: from `model.arch` (every model of
    such a recipe is built from it), or from a local `model.path`'s config.json (no weights read)."""
    from pathlib import Path

    from pipeline.loading import load_config
    from pipeline.models import check_model_dir
    from pipeline.quant.fit import check_fit

    model = recipe.model
    if model.arch is not None:
        return check_fit(model.arch, recipe.quant)
    if model.path is None or not Path(model.path).expanduser().exists():
        return []  # a hub id: checked in run, before any compute
    try:
        check_model_dir(model.path, "model.path", model.trust_remote_code, verify_manifest=False)
    except InputError:
        return []  # the recipe's own model.path check reports it, once
    try:
        base_config = load_config(model.path, model.trust_remote_code)
    except (OSError, ValueError) as e:  # e.g. a model type transformers does not know
        return [("model.path", f"{model.path}: {str(e).splitlines()[0]}")]
    return check_fit(base_config, recipe.quant, trust_remote_code=model.trust_remote_code)


def run(ctx: StageContext) -> dict[str, float]:
    from pipeline.models import load_model, load_tokenizer
    from pipeline.quant import sqnr
    from pipeline.quant.apply import quant_linears
    from pipeline.quant.fit import check_fit
    from pipeline.quant.formats.io import save_quantized

    config, spec = ctx.config, ctx.recipe.quant
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformed = config.method in ("quarot", "flatquant")
    trust = ctx.recipe.model.trust_remote_code
    model = load_model(
        ctx.inputs["model"], dtype="float32" if transformed else None, device=device, trust_remote_code=trust
    ).eval()
    tokenizer = load_tokenizer(ctx.inputs["model"], trust_remote_code=trust)
    misfits = check_fit(model, spec)
    if misfits:
        raise InputError(*misfits[0])

    samples = _calibration_samples(config, tokenizer, ctx)
    report_samples = [s[: config.sqnr_seqlen] for s in samples[: config.sqnr_samples]]
    originals = sqnr.snapshot_weights(model, spec) if report_samples else {}
    reference = sqnr.final_outputs(model, report_samples)

    start = time.perf_counter()
    extra, originals = _quantize(model, tokenizer, spec, samples, config, ctx, originals)
    wall = time.perf_counter() - start

    lowered = _log_lowered_group_sizes(model, spec, ctx.log)
    save_quantized(model, tokenizer, ctx.out_dir / "model", spec)
    metrics = {
        "wall_time_s": wall,
        "quantized_layers": float(len(quant_linears(model))),
        "calibration_tokens": float(sum(len(s) for s in samples)),
        "lowered_group_size_layers": float(lowered),
        **extra,
    }
    if report_samples:
        metrics |= _sqnr_report(model, originals, report_samples, reference, config, ctx)
    return metrics


def _calibration_samples(config: Config, tokenizer, ctx: StageContext) -> list[list[int]]:
    """The calibration sequences (token ids): from the `calibration` stage's traces, or generic text."""
    from pipeline.data.rows import read_texts
    from pipeline.quant.calibration import generic_samples, packed_traces_samples, traces_samples

    if config.calibration is not None:
        # batched FlatQuant needs samples of one length (see packed_traces_samples); the other methods keep
        # one trace a sample, as their artifacts were made
        sampler = packed_traces_samples if config.method == "flatquant" and config.batch_size else traces_samples
        return sampler(
            tokenizer,
            ctx.inputs["calibration"],
            config.nsamples,
            config.seqlen,
            ctx.recipe.seed,
            where=f"stages.{ctx.name}.calibration",
        )
    texts = (
        read_texts(config.calibration_text, f"stages.{ctx.name}.calibration_text") if config.calibration_text else None
    )
    return generic_samples(tokenizer, config.nsamples, config.seqlen, ctx.recipe.seed, texts)


def _quantize(model, tokenizer, spec, samples, config: Config, ctx: StageContext, originals):
    """Quantize `model` in place by `config.method`; returns the method's own metrics and the full-precision
    weights the SQNR report compares with (`originals`, or the transformed ones of quarot / flatquant)."""
    from pipeline.quant.apply import quantize_rtn
    from pipeline.quant.methods.gptq import run_gptq

    if config.method == "gptq":
        run_gptq(
            model, tokenizer, spec, samples, config.block_size, config.dampening_frac, config.actorder, config.observer
        )
    elif config.method == "rtn":
        quantize_rtn(model, spec, config.observer)
    else:
        return _transform_and_quantize(model, spec, samples, config, ctx)
    return {}, originals


def _sqnr_report(model, originals, samples, reference, config: Config, ctx: StageContext) -> dict[str, float]:
    """Per-layer SQNR (logged, and written to sqnr.json) and the model-level SQNR metrics, from one
    forward pass of the quantized model over `samples`; `reference` is the unquantized model's
    (final hidden states, logits) on them."""
    from pipeline.quant import sqnr

    report, hidden, logits = sqnr.layer_sqnr_and_outputs(model, originals, samples)
    ctx.log.info(
        "per-layer SQNR (dB), %s, %s text, %d x %d tokens:\n%s",
        config.method,
        "traces" if config.calibration is not None else "generic",  # as _calibration_samples chose (RTN: generic)
        len(samples),
        max(len(s) for s in samples),
        sqnr.format_table(report),
    )
    (ctx.out_dir / "sqnr.json").write_text(json.dumps(report, indent=1) + "\n")
    metrics = {**sqnr.summarize(report), "logits_sqnr": sqnr.hidden_sqnr(reference[1], logits)}
    if config.method != "quarot":  # QuaRot's hidden states are rotated: only its logits compare
        metrics["hidden_sqnr"] = sqnr.hidden_sqnr(reference[0], hidden)
    return metrics


def _log_lowered_group_sizes(model, spec, log) -> int:
    """Tell the user which layers got a smaller group than `quant.weights.group_size` (it does not divide their
    width; WeightSpec.group_size_policy); returns how many. The sizes are also in model/reasoning_qat_quant.json."""
    from pipeline.quant.apply import lowered_group_sizes, quant_linears

    lowered = lowered_group_sizes(model, spec)
    by_size: dict[tuple[int, int], list[str]] = {}
    for name, module in quant_linears(model):
        if name in lowered:
            by_size.setdefault((module.in_features, lowered[name]), []).append(name)
    for (width, size), names in by_size.items():
        log.warning(
            "quant.weights.group_size %d does not divide in_features %d: %d layers (%s%s) use group size %d "
            "(group_size_policy %s)",
            spec.weights.group_size,
            width,
            len(names),
            names[0],
            ", ..." if len(names) > 1 else "",
            size,
            spec.weights.group_size_policy,
        )
    return len(lowered)


def _transform_and_quantize(model, spec, samples, config: Config, ctx: StageContext):
    """quarot / flatquant, then weight_method; returns the method's own metrics and the transformed
    full-precision weights (the reference of the SQNR report)."""
    from pipeline.quant import sqnr
    from pipeline.quant.apply import calibrate, prepare
    from pipeline.quant.methods import flatquant, quarot
    from pipeline.quant.methods.gptq import gptq_layerwise

    prepare(model, spec)
    metrics: dict[str, float] = {}
    try:
        if config.method == "quarot":
            quarot.rotate(model, seed=ctx.recipe.seed)
        else:
            report = flatquant.calibrate(
                model,
                samples,
                config.epochs,
                config.lr,
                config.smooth_alpha,
                seed=ctx.recipe.seed,
                log=ctx.log,
                batch_size=config.batch_size or 1,
                merge_once=config.batch_size is not None,
                compile=config.compile,
                tf32=config.tf32,
            )
            (ctx.out_dir / "flatquant.json").write_text(json.dumps(report, indent=1) + "\n")
            metrics = {
                "flatquant_mse_init_mean": sum(r["mse_init"] for r in report) / len(report),
                "flatquant_mse_mean": sum(r["mse"] for r in report) / len(report),
                "flatquant_seconds_per_layer": sum(r["seconds"] for r in report) / len(report),
            }
    except ValueError as e:  # the scheme's targets leave a Linear of the decoder unquantized
        raise InputError("quant.targets", f"{config.method}: {e}") from None
    originals = sqnr.snapshot_weights(model, spec) if config.sqnr_samples else {}
    if config.weight_method == "gptq":
        gptq_layerwise(
            model,
            samples,
            config.block_size,
            config.dampening_frac,
            config.actorder,
            config.observer,
            keep_scales=config.method == "flatquant",
        )
    elif config.method == "quarot":
        calibrate(model, config.observer)
    return metrics, originals
