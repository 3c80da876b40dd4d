"""Swap targeted Linears for QuantLinears in place, calibrate their scales, and convert to and from
compressed-tensors' module representation (what llmcompressor's GPTQ leaves behind, and what
compressed-tensors' compressors pack).

    prepare(model, spec)        # nn.Linear -> QuantLinear (uncalibrated), lm_head ignored by default
    calibrate(model, "minmax")  # scales from the weights: round-to-nearest (RTN)
    ... train ...
    to_compressed_tensors(model, spec)   # QuantLinear -> nn.Linear + quantization_scheme, for export

Targets and ignore patterns are matched by compressed-tensors' `match_named_modules`, the matcher
llmcompressor uses: class names (`Linear`), exact module names, or `re:<regex>` on names.
"""

from __future__ import annotations

from contextlib import contextmanager

from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from torch import nn

from pipeline.quant import fake
from pipeline.quant.linear import QuantLinear
from pipeline.quant.formats.compressed import config_groups, weight_quantization_args, weight_spec_from_args
from pipeline.quant.scheme import ActivationSpec, QuantSpec, WeightSpec, layer_weights

Observer = Literal["minmax", "mse"]


def match_targets(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs `spec` quantizes: Linears matching a target and no ignore pattern
    (other matched modules, e.g. an activation under `re:.*mlp.*`, are passed over, as llmcompressor
    does). ValueError when a target matches no Linear, or when `ignore` leaves nothing."""
    for target in spec.targets:
        if not any(isinstance(m, nn.Linear) for _, m in match_named_modules(model, [target])):
            raise ValueError(f"target {target!r} matches no Linear module of {type(model).__name__}")
    matched = [(n, m) for n, m in match_named_modules(model, spec.targets, spec.ignore) if isinstance(m, nn.Linear)]
    if not matched:
        raise ValueError(f"targets {list(spec.targets)} minus ignore {list(spec.ignore)} leave no module to quantize")
    return matched


def prepare(model: nn.Module, spec: QuantSpec, group_sizes: dict[str, int] | None = None) -> list[str]:
    """Replace each targeted nn.Linear by a QuantLinear sharing its parameters, and switch on KV-cache
    fake quantization when the spec has one (pipeline.quant.kv); returns the QuantLinears' names.
    Each QuantLinear's weight spec is `layer_weights(spec.weights, in_features)`: the group size lowered
    where it does not divide the layer's width (WeightSpec.group_size_policy); a saved model's layers
    take theirs from `group_sizes` ({name: group size}, as `lowered_group_sizes` recorded them)."""
    names = []
    for name, linear in match_targets(model, spec):
        if isinstance(linear, QuantLinear):
            raise ValueError(f"{name} is already a QuantLinear")
        try:
            if group_sizes and name in group_sizes:
                weights = spec.weights.model_copy(update={"group_size": group_sizes[name]})
            else:
                weights = layer_weights(spec.weights, linear.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        model.set_submodule(name, QuantLinear.from_linear(linear, weights, spec.activations))
        names.append(name)
    if spec.kv_cache is not None:
        from pipeline.quant.kv import enable_kv_quant

        enable_kv_quant(model, spec.kv_cache)
    return names


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def lowered_group_sizes(model: nn.Module, spec: QuantSpec) -> dict[str, int]:
    """{name: group size} of the QuantLinears whose group size is not the spec's (WeightSpec.group_size_policy)."""
    return {
        name: m.weights.group_size
        for name, m in quant_linears(model)
        if m.weights.group_size != spec.weights.group_size
    }


@torch.no_grad()
def observe(module: QuantLinear, observer: Observer = "minmax") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point) of `module`'s current latent weight.

    "minmax": each group's min and max (RTN). "mse": llmcompressor's MSE observer, a grid search over
    shrunk ranges that minimises the weight's quantization error (norm 2.4, up to 20% shrink).
    """
    w = module.weights
    if observer == "minmax":
        return fake.weight_qparams(module.weight, w.num_bits, w.group_size, w.symmetric)
    from llmcompressor.observers import Observer as LCObserver

    args = weight_quantization_args(w)
    obs = LCObserver.load_from_registry("memoryless_mse", base_name="weight", args=args)
    qparams = obs(module.weight).get_qparams()
    return qparams["scale"], qparams["zero_point"]


@torch.no_grad()
def calibrate(model: nn.Module, observer: Observer = "minmax") -> None:
    """Set every QuantLinear's scales and zero points from its current latent weight (`observe`)."""
    for _, module in quant_linears(model):
        module.set_qparams(*observe(module, observer))


def quantize_rtn(model: nn.Module, spec: QuantSpec, observer: Observer = "minmax") -> list[str]:
    """prepare + calibrate: round-to-nearest quantization of `model` in place."""
    names = prepare(model, spec)
    calibrate(model, observer)
    return names


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer (weights, activations, KV cache) on or off; online transforms stay."""
    for _, module in quant_linears(model):
        module.fake_quant = enabled
    for module in model.modules():
        if hasattr(module, "kv_cache_spec"):
            module.kv_fake_quant = enabled


def from_compressed_tensors(model: nn.Module, activations: ActivationSpec | None = None) -> dict[str, WeightSpec]:
    """Replace each Linear carrying a compressed-tensors `quantization_scheme` (after llmcompressor's
    oneshot, or a decompressed checkpoint) by a QuantLinear whose latent weight is that module's
    (already dequantized) weight and whose scales and zero points are its `weight_scale` /
    `weight_zero_point`; `activations` adds per-token input fake quantization (compressed-tensors
    schemes carry none we support). Returns the weight spec of each converted module."""
    specs = {}
    for name, module in list(model.named_modules()):
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not isinstance(module, nn.Linear) or scheme.weights is None:
            continue
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise ValueError(f"{name}: static activation quantization is not supported")
        spec = weight_spec_from_args(scheme.weights)
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        quant = QuantLinear.from_linear(plain, spec, activations)
        quant.set_qparams(module.weight_scale, getattr(module, "weight_zero_point", None))
        model.set_submodule(name, quant)
        specs[name] = spec
    return specs


@contextmanager
def quiet_overridden_targets(groups: dict):
    """Within the block, compressed-tensors' "Could not match `<name>`" warnings about the exact-name targets of
    config groups after group_0 (pipeline.quant.formats.compressed.config_groups) are dropped: its matcher stops at
    the first
    target a module matches (group_0's `Linear`) and so reports those names unmatched, though they are matched
    and win (an exact name beats a class). One false line per lowered layer otherwise; other warnings stay."""
    import logging

    overridden = {f"`{t}`" for key, g in groups.items() if key != "group_0" for t in g.targets}
    logger = logging.getLogger("compressed_tensors.utils.match")

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Could not match") and message.split()[3] in overridden)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def to_compressed_tensors(model: nn.Module, spec: QuantSpec) -> None:
    """The inverse: QuantLinears become nn.Linears with compressed-tensors' weight `quantization_scheme`,
    `weight_scale` and `weight_zero_point` (status frozen), the state compressed-tensors' compressors
    pack. The weight stays the latent one: compressing quantizes it with the same scales, to the
    same integer codes our fake quantization uses."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    # activation / KV-cache schemes are not module state: pipeline.quant.formats.export writes them to the config
    quantized = quant_linears(model)
    if not quantized:
        raise ValueError("the model has no QuantLinear to export")
    qparams = {}
    groups = config_groups(spec, {name: module.weights for name, module in quantized})
    for name, module in quantized:
        qparams[name] = (module.weight_scale.detach(), module.weight_zero_point)
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        model.set_submodule(name, plain)
    config = QuantizationConfig(
        config_groups=groups, ignore=list(spec.ignore), quantization_status=QuantizationStatus.FROZEN
    )
    with quiet_overridden_targets(groups):
        apply_quantization_config(model, config, show_progress=False)
    attached = {name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if attached != set(qparams):
        raise ValueError(
            f"spec targets/ignore select {len(attached)} modules but the model has {len(qparams)} QuantLinears"
        )
    with torch.no_grad():
        for name, (scale, zero_point) in qparams.items():
            module = model.get_submodule(name)
            module.weight_scale.copy_(scale)
            if zero_point is not None:
                module.weight_zero_point.copy_(zero_point)


def weight_only(model: torch.nn.Module) -> bool:
    """Every QuantLinear quantizes only its weight (no activation quantizer): W3G128, W4G128, ..."""
    return all(m.activations is None for _, m in quant_linears(model))


@contextmanager
def decoding_weights(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """Within the block a weight-only quantized model decodes on fixed weights (`pipeline.generate`
    does this for every decode; training stages add `dtype`): each QuantLinear holds q(w), computed once, with its
    quantizer off (plain matmuls on the same values
    instead of re-quantizing every weight at every token), and with `dtype` every parameter is cast
    to it (bf16 on GPU: the fp32 latent weights under autocast would give the static KV cache fp32
    keys, after the fp32 q/k norms, and bf16 values). Afterwards each parameter points at its own
    tensor again, untouched: the swap changes `.data` (no copy of the latents is kept or made)."""
    if not weight_only(model):
        raise ValueError("decoding_weights needs weight-only QuantLinears (activation quantizers run per token)")
    quantized = {id(m.weight): m for _, m in quant_linears(model) if m.fake_quant}
    swapped = []
    with torch.no_grad():
        for p in model.parameters():
            module = quantized.get(id(p))
            if module is None and (dtype is None or p.dtype == dtype):
                continue
            value = module.quantized_weight() if module is not None else p.data
            swapped.append((p, p.data))
            p.data = value.to(dtype) if dtype is not None else value
    for module in quantized.values():
        module.fake_quant = False
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data
        for module in quantized.values():
            module.fake_quant = True
