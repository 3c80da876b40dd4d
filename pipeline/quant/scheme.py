"""Quantization schemes: the recipe's `quant` section, named presets, targets and ignore patterns.

Field names follow compressed-tensors' `QuantizationArgs` (num_bits, group_size, symmetric) so that a
scheme maps one to one onto the `quantization_config` of an exported checkpoint.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WeightSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(3, ge=1, le=8)
    group_size: int | None = Field(128, gt=0)
    """Columns per group; None = one scale per output channel."""
    symmetric: bool = False


class ActivationSpec(BaseModel):
    """Per-token activation quantization of the targeted Linears' inputs (W4A4KV4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(4, ge=1, le=8)
    symmetric: bool = False
    clip_ratio: float = Field(1.0, gt=0, le=1)


class KVCacheSpec(BaseModel):
    """Per-token, per-head KV-cache quantization after RoPE (W4A4KV4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_bits: int = Field(4, ge=1, le=8)
    symmetric: bool = False
    group_size: int | None = Field(None, gt=0)
    """None = head_dim."""
    clip_ratio: float = Field(1.0, gt=0, le=1)


class QuantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: WeightSpec = WeightSpec()
    activations: ActivationSpec | None = None
    kv_cache: KVCacheSpec | None = None
    targets: tuple[str, ...] = ("Linear",)
    """Module class names or `re:<regex>` on module names, as in llmcompressor."""
    ignore: tuple[str, ...] = ("lm_head",)
