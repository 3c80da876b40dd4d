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

from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from pipeline.engine.progress import progress
from pipeline.quant.apply import from_compressed_tensors, match_targets, quiet_overridden_targets
from pipeline.quant.calibration import calibration_loader
from pipeline.quant.formats.compressed import config_groups, weight_quantization_args
from pipeline.quant.scheme import QuantSpec, layer_weights

ActOrder = Literal["static", "weight"] | None


def gptq_modifier(
    model: nn.Module, spec: QuantSpec, block_size: int, dampening_frac: float, actorder: ActOrder, observer: str
):
    """The GPTQModifier for `spec`'s weights on `model` (what both our stage and the bare-oneshot bench run):
    one config group per group size the model's layers get (pipeline.quant.formats.compressed.config_groups)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    per_layer = {name: layer_weights(spec.weights, m.in_features) for name, m in match_targets(model, spec)}
    return GPTQModifier(
        config_groups=config_groups(
            spec, per_layer, observer={"minmax": "memoryless_minmax", "mse": "memoryless_mse"}[observer]
        ),
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
    from compressed_tensors.offload import remove_dispatch
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    expected = [name for name, _ in match_targets(model, spec)]
    modifier = gptq_modifier(model, spec, block_size, dampening_frac, actorder, observer)
    with quiet_overridden_targets(modifier.config_groups), _layer_progress(model, "gptq"):
        oneshot(model=model, recipe=modifier, dataset=calibration_loader(samples), processor=tokenizer)
    active_session().reset()
    # oneshot leaves every module under compressed-tensors' offloading (tensors kept on an offload device, moved
    # to the execution device at each forward); back to a plain model on the device it computed on, as our
    # QuantLinears and every later `.to(device)` expect
    remove_dispatch(model, onload_tensors=True)
    # oneshot wraps this instance's save_pretrained to write compressed-tensors checkpoints; ours is
    # the plain one (our layout, see pipeline.quant.formats.io), so drop the instance attribute
    if "save_pretrained" in vars(model):
        del model.save_pretrained
    names = list(from_compressed_tensors(model, spec.activations))
    if names != expected:
        raise RuntimeError(f"GPTQ quantized {len(names)} modules, the spec targets {len(expected)}")
    if spec.kv_cache is not None:
        from pipeline.quant.kv import enable_kv_quant

        enable_kv_quant(model, spec.kv_cache)
    return names


@contextmanager
def _layer_progress(model: nn.Module, description: str):
    """Decoder layers done, on a progress bar, while oneshot runs: its sequential pipeline calibrates and
    quantizes layer i on every sample before it runs layer i + 1, so layer i's first forward on real tensors
    (not fx's tracing proxies) says layers 0 .. i-1 are done."""
    from pipeline.quant.methods.quarot import decoder_layers

    layers = decoder_layers(model)
    with progress(description, total=len(layers), unit="layers") as bar:

        def starts(index):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor) and bar.done < index:
                    bar.advance(index - bar.done)

            return hook

        handles = [layer.register_forward_pre_hook(starts(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        bar.advance(len(layers) - bar.done)


def gptq_layerwise(
    model: nn.Module,
    samples: list[list[int]],
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: ActOrder = "static",
    observer: str = "minmax",
    keep_scales: bool = False,
) -> list[str]:
    """GPTQ on a prepared model whose QuantLinears see transformed inputs (after QuaRot / FlatQuant), in
    place; returns the names of the modules it quantized.

    llmcompressor's oneshot cannot be used here: its sequential pipeline traces the stock decoder and
    does not know our online transforms (TransformedNorm, QuantLinear.input_transform), so its Hessians
    would be of the untransformed inputs. We use its GPTQ core instead (`accumulate_hessian`,
    `quantize_weight`) on Hessians of the inputs each QuantLinear actually multiplies (after its input
    transform, before activation quantization, as QuaRot's GPTQ does), decoder layer by decoder layer,
    each layer fed the outputs of the already-quantized ones (llmcompressor's sequential order). Scales
    come from the observer on the transformed weight, as llmcompressor's do, or with `keep_scales` are the
    modules' own (FlatQuant's learned clipping: GPTQ then only re-rounds the weights on that grid).
    """
    from pipeline.quant.apply import quant_linears
    from pipeline.quant.layerwise import capture_inputs, each_layer, next_inputs

    inputs = capture_inputs(model, samples)
    done = []
    for index, layer in each_layer(model, "gptq"):
        modules = quant_linears(layer)
        hessians = _layer_hessians(layer, modules, inputs)
        for name, m in modules:
            _quantize_module(m, *hessians[name], block_size, dampening_frac, actorder, observer, keep_scales)
            done.append(f"{_layer_prefix(model)}.{index}.{name}")
        inputs = next_inputs(layer, inputs)
    return done


def _layer_hessians(layer: nn.Module, modules: list[tuple[str, nn.Module]], inputs) -> dict[str, tuple]:
    """Name -> (Hessian sum, sample count) of the inputs each of `modules` multiplies (after its input transform),
    from one full-precision pass of `layer` over `inputs`; the modules are left with fake quantization off."""
    import torch
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    from pipeline.quant.layerwise import run_layer

    hessians = {name: make_empty_hessian(m) for name, m in modules}
    counts = {name: torch.zeros((), dtype=torch.long) for name, _ in modules}

    def hook(name, module, args):
        x = args[0] if module.input_transform is None else module.input_transform(args[0])
        accumulate_hessian(x.detach(), module, hessians[name], counts[name])

    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: hook(name, mod, a)) for name, m in modules]
    for _, m in modules:
        m.fake_quant = False  # the layer's weights are not quantized yet: full-precision inputs
    try:
        with torch.no_grad():
            for inp in inputs:
                run_layer(layer, inp)
    finally:
        for h in handles:
            h.remove()
    return {name: (hessians[name], counts[name]) for name, _ in modules}


def _quantize_module(
    m: nn.Module,
    hessian,
    count,
    block_size: int,
    dampening_frac: float,
    actorder: ActOrder,
    observer: str,
    keep_scales: bool,
) -> None:
    """GPTQ of one QuantLinear's weight given its inputs' Hessian (sum over `count` samples), in place, on the
    observer's grid or (`keep_scales`) the module's own; fake quantization back on."""
    import torch
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from pipeline.quant.apply import observe

    args = weight_quantization_args(m.weights).model_copy(update={"actorder": actorder})
    if keep_scales:
        scale, zero_point = m.weight_scale.detach().clone(), m.weight_zero_point
    else:
        scale, zero_point = observe(m, observer)
    zp = zero_point if zero_point is not None else torch.zeros_like(scale, dtype=torch.int8)
    with torch.no_grad():
        quantized, _, _ = quantize_weight(
            m.weight.detach()[None].float(),
            (hessian / count)[None],
            scale[None],
            zp[None],
            None,
            args,
            block_size,
            dampening_frac,
        )
        m.weight.copy_(quantized[0].to(m.weight.dtype))
    m.set_qparams(scale, zero_point)
    m.fake_quant = True


def _layer_prefix(model: nn.Module) -> str:
    from pipeline.quant.methods.quarot import decoder_layers

    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)
