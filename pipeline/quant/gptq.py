"""GPTQ (Frantar et al. 2023) through llmcompressor's `GPTQModifier` and `oneshot`, on our calibration
DataLoader, turned into our QuantLinear representation.

What llmcompressor 0.14 does, and what we take from it:
- scales and zero points come from its weight observer on the *original* weight (min-max, or the
  MSE grid search when observer="mse") before the GPTQ column sweep, and do not change during it;
- the sweep leaves each module's `weight` as the dequantized GPTQ weight (q - z) * s, beside
  `weight_scale` / `weight_zero_point`; the sequential pipeline quantizes decoder layer by layer,
  feeding each layer the outputs of the already-quantized ones.
Our latent weight is that dequantized weight with the same scales, so fake-quantizing it reproduces
GPTQ's quantized weight exactly (a fixed point; `test_ptq` checks it). GPTQ sees BF16 activations
and KV; a spec's activation / KV quantization is switched on after it (plain GPTQ, not GPTQ on
quantized activations).

Activation order: actorder "static" (alias "weight") sweeps columns in order of decreasing Hessian
diagonal but keeps the groups as contiguous runs of `group_size` columns in the *original* order,
each column using its own group's scale (llmcompressor gathers g_idx by the permutation and undoes
the permutation at the end). So no g_idx is stored or needed: our contiguous groups are the mapping.
The "group" (dynamic) ordering, which did need a g_idx, was removed from compressed-tensors 0.19.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

from pipeline.quant.apply import from_compressed_tensors
from pipeline.quant.calibration import calibration_loader
from pipeline.quant.scheme import QuantSpec, weight_quantization_args

ActOrder = Literal["static", "weight"] | None


def gptq_modifier(spec: QuantSpec, block_size: int, dampening_frac: float, actorder: ActOrder, observer: str):
    """The GPTQModifier for `spec`'s weights (what both our stage and the bare-oneshot bench run)."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    args = weight_quantization_args(spec.weights).model_copy(
        update={"observer": {"minmax": "memoryless_minmax", "mse": "memoryless_mse"}[observer]}
    )
    return GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=list(spec.targets), weights=args)},
        ignore=list(spec.ignore),
        block_size=block_size,
        dampening_frac=dampening_frac,
        actorder=actorder,
    )


def run_gptq(
    model: nn.Module,
    tokenizer,
    spec: QuantSpec,
    samples: list[list[int]],
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: ActOrder = "static",
    observer: str = "minmax",
) -> list[str]:
    """Quantize `model` in place with GPTQ on `samples` (token-id lists); returns the QuantLinear names.

    `model` must have been loaded from a directory (`oneshot` re-reads its config from
    `model.config.name_or_path`).
    """
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from pipeline.quant.apply import match_targets

    expected = [name for name, _ in match_targets(model, spec)]
    modifier = gptq_modifier(spec, block_size, dampening_frac, actorder, observer)
    oneshot(model=model, recipe=modifier, dataset=calibration_loader(samples), processor=tokenizer)
    active_session().reset()
    # oneshot wraps this instance's save_pretrained to write compressed-tensors checkpoints; ours is
    # the plain one (our layout, see pipeline.quant.io), so drop the instance attribute
    if "save_pretrained" in vars(model):
        del model.save_pretrained
    names = list(from_compressed_tensors(model, spec.activations))
    if names != expected:
        raise RuntimeError(f"GPTQ quantized {len(names)} modules, the spec targets {len(expected)}")
    if spec.kv_cache is not None:
        from pipeline.quant.kv import enable_kv_quant

        enable_kv_quant(model, spec.kv_cache)
    return names
