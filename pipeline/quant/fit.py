"""Does a quantization scheme fit a model: its targets match, every targeted width takes a group size, the KV
group divides head_dim. A config is instantiated on the meta device (no memory, no weights)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.quant.apply import match_targets
from pipeline.quant.scheme import QuantSpec, layer_weights


def check_fit(
    model_or_config: Any, spec: QuantSpec, where: str = "quant", trust_remote_code: bool = False
) -> list[tuple[str, str]]:
    """Every way `spec` does not fit the model, as (key path, message) pairs; [] if it fits.

    `model_or_config` is a model, a transformers `PretrainedConfig`, or a `pipeline.models.Qwen3Arch`.
    A config is instantiated on the meta device (no memory, no weights) so that target matching sees
    the same module names and widths as the real model.
    """
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
    else:
        model = _meta_model(model_or_config, trust_remote_code)
    try:
        matched = match_targets(model, spec)
    except ValueError as e:
        return [(f"{where}.targets", str(e))]
    errors = []
    misfits = []
    for name, module in matched:
        try:
            layer_weights(spec.weights, module.in_features)
        except ValueError as e:
            misfits.append(f"{name}: {e}")
    if misfits:
        more = f" (and {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
        errors.append((f"{where}.weights.group_size", misfits[0] + more))
    if spec.kv_cache is not None and spec.kv_cache.group_size is not None:
        head_dim = _head_dim(model.config)
        if head_dim % spec.kv_cache.group_size:
            errors.append(
                (
                    f"{where}.kv_cache.group_size",
                    f"{spec.kv_cache.group_size} does not divide head_dim {head_dim}",
                )
            )
    return errors


def lowered_group_sizes(config: Any, spec: QuantSpec, trust_remote_code: bool = False) -> dict[int, int]:
    """in_features -> the group size `group_size_policy` gives the targeted Linears of that width, for each width
    the spec's group size does not divide; the model is built on the meta device. Call it on a spec that
    `check_fit` passed (ValueError otherwise)."""
    widths = sorted({m.in_features for _, m in match_targets(_meta_model(config, trust_remote_code), spec)})
    return {
        w: layer_weights(spec.weights, w).group_size
        for w in widths
        if layer_weights(spec.weights, w).group_size != spec.weights.group_size
    }


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _meta_model(config: Any, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, PretrainedConfig, Qwen3Config

    if not isinstance(config, PretrainedConfig):
        # a Qwen3Arch: its fields are Qwen3Config's keyword arguments. The vocabulary only sets
        # lm_head's out_features (never a grouped dimension), so the Qwen3 default stands in for the
        # tokenizer's until the model is built.
        config = Qwen3Config(**config.model_dump())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
