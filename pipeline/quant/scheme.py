"""Quantization schemes: the recipe's `quant` section, named presets, targets and ignore patterns.

Field names follow compressed-tensors' `QuantizationArgs` (num_bits, group_size, symmetric) so that a
scheme maps one to one onto the `quantization_config` of an exported checkpoint
(`pipeline.quant.formats.compressed.weight_quantization_args`). This module is pure data: no torch, no model;
whether a scheme fits a model is `pipeline.quant.fit.check_fit`.

A recipe gives the section in one of three forms:

    quant: w3g128                                        # a named preset
    quant: {preset: w3g128, weights: {symmetric: true}}  # a preset with overrides (merged key by key)
    quant: {weights: {num_bits: 3, group_size: 128, symmetric: false}}   # spelled out

Presets (`PRESETS`):
- `w3g128`, `w4g128`, `w2g128`: integer weights in groups of 128 input columns, asymmetric (one scale
  and one integer zero point per group; what GPTQ W3G128 reports use), activations and KV in BF16.
- `w4a4kv4`: 4-bit weights, symmetric, one scale per output channel (QuaRot / FlatQuant's weight
  format: the rotation spreads outliers over the whole row, so groups buy little and per-channel
  symmetric weights keep the int4 GEMM simple); 4-bit asymmetric per-token activations (dynamic,
  computed from each token's min/max, as FlatQuant does); 4-bit asymmetric KV cache after RoPE, one
  scale per token and head (group = head_dim).

Widths a group size does not divide (SmolLM2-135M's 576, SmolLM2-360M's 960): `weights.group_size_policy` (default
`largest_divisor`) gives such a layer the largest smaller group that divides it (`layer_weights`: 576 -> 96);
`exact` refuses the model at recipe check.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUP_QUANTUM = 32
"""A lowered group size stays a multiple of gcd(group_size, 32): the group sizes kernels take (32, 64, 128)
are multiples of 32, and a group of 96 keeps the per-group overhead near the requested 128's."""


class WeightSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(3, ge=1, le=8)
    """Bits per weight code."""
    group_size: int | None = Field(128, gt=0)
    """Columns per group; None = one scale per output channel."""
    symmetric: bool = False
    """Symmetric range (scale only); False: asymmetric (scale and zero point per group)."""
    group_size_policy: Literal["largest_divisor", "exact"] = "largest_divisor"
    """A Linear whose in_features `group_size` does not divide (widths 576, 960, ...): "largest_divisor" gives it
    the largest group size <= group_size that divides in_features and is a multiple of gcd(group_size, 32)
    (576 -> 96), recorded per layer in the saved model and the export's config groups; "exact" refuses the model."""


class ActivationSpec(BaseModel):
    """Per-token activation quantization of the targeted Linears' inputs (W4A4KV4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(4, ge=1, le=8)
    """Bits per activation code."""
    symmetric: bool = False
    """Symmetric range per token; False: asymmetric (scale and zero point per token)."""
    clip_ratio: float = Field(1.0, gt=0, le=1)
    """Each token's range is shrunk to this fraction of its min/max before quantizing (QuaRot's clipping)."""


class KVCacheSpec(BaseModel):
    """Per-token, per-head KV-cache quantization after RoPE (W4A4KV4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(4, ge=1, le=8)
    """Bits per key / value code."""
    symmetric: bool = False
    """Symmetric range; False: asymmetric (scale and zero point per group)."""
    group_size: int | None = Field(None, gt=0)
    """None = head_dim."""
    clip_ratio: float = Field(1.0, gt=0, le=1)
    """Each group's range is shrunk to this fraction of its min/max before quantizing."""


class QuantSpec(BaseModel):
    """The recipe's quantization scheme: a preset name (`quant: w3g128`), a mapping of the keys below, or
    `preset: NAME` with some of them overridden."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: WeightSpec = WeightSpec()
    """Weight quantization of the targeted Linears."""
    activations: ActivationSpec | None = None
    """Input activation quantization of the targeted Linears (None: activations stay in full precision)."""
    kv_cache: KVCacheSpec | None = None
    """KV-cache quantization (None: the cache stays in full precision)."""
    targets: tuple[str, ...] = ("Linear",)
    """Module class names, exact module names, or `re:<regex>` on module names, as in llmcompressor."""
    ignore: tuple[str, ...] = ("lm_head",)
    """Modules left unquantized, matched like `targets`."""

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            return _preset_dict(data)
        if isinstance(data, dict) and "preset" in data:
            overrides = {k: v for k, v in data.items() if k != "preset"}
            return _merge(_preset_dict(data["preset"]), overrides)
        return data

    @model_validator(mode="after")
    def _targets_given(self):
        if not self.targets:
            raise ValueError("targets must name at least one module class or pattern")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "w3g128": {"weights": {"num_bits": 3, "group_size": 128, "symmetric": False}},
    "w4g128": {"weights": {"num_bits": 4, "group_size": 128, "symmetric": False}},
    "w2g128": {"weights": {"num_bits": 2, "group_size": 128, "symmetric": False}},
    "w4a4kv4": {
        "weights": {"num_bits": 4, "group_size": None, "symmetric": True},
        "activations": {"num_bits": 4, "symmetric": False},
        "kv_cache": {"num_bits": 4, "symmetric": False, "group_size": None},
    },
}


def _preset_dict(name: Any) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied key by key, recursing into sections given as dicts on both sides."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve(spec: QuantSpec | str | dict[str, Any]) -> QuantSpec:
    """A QuantSpec from any of the recipe's three forms."""
    return spec if isinstance(spec, QuantSpec) else QuantSpec.model_validate(spec)


def layer_weights(weights: WeightSpec, in_features: int) -> WeightSpec:
    """The weight spec of one Linear with `in_features` columns: `weights`, with the group size lowered by
    `group_size_policy` when it does not divide in_features; ValueError when no group size fits."""
    size = weights.group_size
    if size is None or in_features % size == 0:
        return weights
    quantum = math.gcd(size, GROUP_QUANTUM)
    fits = [g for g in range(size - size % quantum, 0, -quantum) if in_features % g == 0]
    if weights.group_size_policy == "exact" or not fits:
        why = " (group_size_policy: exact)" if fits else f", nor does any smaller multiple of {quantum}"
        raise ValueError(f"{size} does not divide in_features {in_features}{why}")
    return weights.model_copy(update={"group_size": fits[0]})
