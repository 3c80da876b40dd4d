"""Stage `export`: a quantized model (ptq, kd_qat, rl stage) as a real low-bit checkpoint.

Format `pack-quantized` (compressed-tensors): int32-packed integer weights, scales, packed zero
points when asymmetric, `quantization_config` in config.json, tokenizer and generation config.
Stock transformers + compressed-tensors load it (`AutoModelForCausalLM.from_pretrained`) with the
logits of our fake-quant model; vLLM serves the same format. W4A4KV4 models (activation / KV-cache
quantization, QuaRot / FlatQuant transforms) get the same packed weights, the activation and KV schemes
in the quantization_config, the transforms in transforms.safetensors, and a model_type that only
`pipeline.load_quantized` reads (stock transformers refuses it rather than run it without its
transforms). Format `gptq` (weight-only models): the same integer codes in the GPTQ v1 layout, which vLLM
serves with `--quantization gptq` (pipeline.quant.formats.gptq_format). See pipeline.quant.formats.export and
docs/serving.md.

Outputs: `<out_dir>/model/`. Metrics: bytes on disk, bits per quantized weight, bits per parameter.

    reasoning-qat run recipe.yaml --only export        # or: reasoning-qat export STAGE_DIR --out DIR
"""

from __future__ import annotations

from typing import Literal

from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import QUANTIZED, StageConfig, StageContext, stage_ref

CODE_VERSION = 3
USES = ()
HEADLINE = "bits_per_weight"
OUTPUT = QUANTIZED


class Config(StageConfig):
    type: Literal["export"] = "export"
    model: stage_ref(QUANTIZED)
    """The quantized model to export (a ptq, kd_qat or rl stage)."""
    scheme: str | None = None
    """A preset (e.g. w3g128) the model must be quantized with; None: the model's own scheme."""
    format: Literal["pack-quantized", "gptq"] = "pack-quantized"
    """Checkpoint format: compressed-tensors pack-quantized (integer weights; W4A4KV4 adds its schemes and transforms),
    or gptq (GPTQ v1 layout of the same codes, weight-only models, that vLLM serves with `--quantization gptq`).
    The key was already there, so its default keeps existing fingerprints; only "gptq" is new."""


def check(config: Config, recipe) -> list[tuple[str, str]]:
    from pipeline.quant.formats.export import resolve_scheme

    if config.scheme is None:
        return []
    try:
        # the models a recipe quantizes carry its `quant` section: check against that before running
        resolve_scheme(config.scheme, recipe.quant)
    except InputError as e:
        return [(e.where, e.message)]
    return []


def run(ctx: StageContext) -> dict[str, float]:
    from pipeline.quant.formats.export import describe_size, export_checkpoint
    from pipeline.quant.formats.io import is_quantized

    source = ctx.inputs["model"]
    if not is_quantized(source):
        raise InputError(f"stages.{ctx.name}.model", f"{source} holds no quantized model (export a ptq/kd_qat stage)")
    try:
        size = export_checkpoint(
            source, ctx.config.scheme, ctx.out_dir / "model", ctx.recipe.model.trust_remote_code, ctx.config.format
        )
    except InputError as e:
        raise InputError(f"stages.{ctx.name}.{e.where}", e.message) from None
    ctx.log.info("exported %s: %s", source, describe_size(size))
    return size
