"""KV-cache fake quantization after RoPE, through transformers' attention-function registry.

`enable_kv_quant(model, spec)` registers (once per base implementation) an attention function
`kvq_<base>` that fake-quantizes the key and value states it is handed and then calls the base
implementation (sdpa, eager, ...), and switches the model to it. Attention modules receive keys after
RoPE and after the cache update, so every key and value the scores see is quantized, per token and
per head, in groups of `group_size` channels (None = the whole head_dim), with the STE of
pipeline.quant.fake so QAT trains through it. The cache itself keeps the unquantized states and each
step re-quantizes them; since a token's scale depends only on its own values, it is quantized the
same way at every step, as a cache that stored the quantized values would give (at the cost of
re-doing it each step, which fake quantization accepts).

Rotated keys (QuaRot's online Hadamard on queries and keys, FlatQuant's key transform): when the
attention module has a `qk_transform` (pipeline.quant.online.KroneckerTransform P), keys become kP and
queries q P⁻ᵀ before the keys are quantized, so scores q kᵀ are unchanged up to the quantization.
Qwen3's q_norm / k_norm act per head before RoPE, so the rotation sits after both, here.

The spec lives on each attention module as `kv_cache_spec`, set here before any forward; nothing
changes inside the forward.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.quant import fake
from pipeline.quant.scheme import KVCacheSpec

PREFIX = "kvq_"


def fake_quantize_kv(x: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """Per-token, per-head fake quantization of [batch, heads, seq, head_dim] states."""
    head_dim = x.shape[-1]
    group = spec.group_size or head_dim
    grouped = x.unflatten(-1, (head_dim // group, group))
    return fake.fake_quantize_per_token(grouped, spec.num_bits, spec.symmetric, spec.clip_ratio).flatten(-2)


def _wrap(base: Callable) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        spec = module.kv_cache_spec
        rotation = getattr(module, "qk_transform", None)
        if rotation is not None:
            query, key = rotation.inverse_transpose(query), rotation(key)
        if getattr(module, "kv_fake_quant", True):
            key, value = fake_quantize_kv(key, spec), fake_quantize_kv(value, spec)
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


def enable_kv_quant(model: nn.Module, spec: KVCacheSpec) -> list[str]:
    """Quantize every self-attention's keys and values; returns the attention modules' names."""
    base_name = model.config._attn_implementation or "eager"
    if base_name.startswith(PREFIX):
        raise ValueError("KV-cache quantization is already enabled on this model")
    modules = [(n, m) for n, m in model.named_modules() if n.endswith("self_attn")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no `self_attn` modules to quantize the KV cache of")
    if base_name == "eager":
        # transformers passes each model's own eager function as the default, not through the registry
        base = sys.modules[type(modules[0][1]).__module__].eager_attention_forward
    else:
        base = ALL_ATTENTION_FUNCTIONS[base_name]
    name = PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrap(base))
        # masks are built per implementation name: an unknown name gets none (not even causal)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    for _, module in modules:
        head_dim = getattr(module, "head_dim", None)
        if spec.group_size is not None and head_dim is not None and head_dim % spec.group_size:
            raise ValueError(f"kv_cache.group_size {spec.group_size} does not divide head_dim {head_dim}")
        module.kv_cache_spec = spec
        module.kv_fake_quant = True
    model.set_attn_implementation(name)
    return [n for n, _ in modules]
