"""Numeric sanity of a PTQ result, in SQNR (dB), in the spirit of gpt-fast's GPTQ debug numbers.

Per quantized layer:
- weight SQNR: the fake-quantized weight against the original (BF16) weight;
- output SQNR: on the quantized model's own inputs to that layer (what GPTQ's sequential pipeline
  optimises), x @ W_original^T against the layer's fake-quantized output. GPTQ should beat RTN here
  even where its weight SQNR is lower: it trades weight error for output error.
Per model: SQNR of the final hidden states against the unquantized model's on the same samples, and of
the logits (the one comparison that holds after QuaRot, whose hidden states live in a rotated basis).
After QuaRot / FlatQuant the "original" weights are the transformed full-precision ones, and a layer's
input is taken after its online input transform.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import fake
from pipeline.quant.apply import decoding_weights, match_targets, quant_linears, weight_only
from pipeline.quant.scheme import QuantSpec


def snapshot_weights(model: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """CPU copies of the weights `spec` will quantize, taken before quantizing."""
    return {name: m.weight.detach().to("cpu", copy=True) for name, m in match_targets(model, spec)}


@torch.no_grad()
def final_outputs(model: nn.Module, samples: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The last hidden state ([len, hidden]) and the logits ([len, vocab]) of each sample, float32 on
    CPU, from one forward pass per sample. A weight-only quantized model runs on q(w) computed once
    (`decoding_weights`), not re-quantized at every call."""
    device = next(model.parameters()).device
    hidden, logits = [], []
    with decoding_weights(model) if weight_only(model) else nullcontext():
        for s in samples:
            out = model(torch.tensor([s], device=device), output_hidden_states=True)
            hidden.append(out.hidden_states[-1][0].float().cpu())
            logits.append(out.logits[0].float().cpu())
    return hidden, logits


@torch.no_grad()
def layer_sqnr_and_outputs(
    model: nn.Module, originals: dict[str, torch.Tensor], samples: list[list[int]]
) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """`layer_sqnr`'s report and `final_outputs`' hidden states and logits of the quantized model,
    from the same forward pass per sample."""
    energy: dict[str, list[float]] = {}
    hooks = []

    def hook(name, module, args, output):
        w = originals[name].to(device=output.device, dtype=output.dtype)
        x = args[0] if module.input_transform is None else module.input_transform(args[0])
        reference = F.linear(x, w, module.bias)
        sig_noise = energy.setdefault(name, [0.0, 0.0])
        sig_noise[0] += float(reference.float().square().sum(dtype=torch.float64))
        sig_noise[1] += float((reference.float() - output.float()).square().sum(dtype=torch.float64))

    layers = quant_linears(model)
    for name, module in layers:
        hooks.append(module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    # q(w) is computed once per layer, for the passes and the weight SQNR alike (it costs about as much
    # as the passes): within decoding_weights each weight holds it (final_outputs' own block is then a no-op)
    try:
        with decoding_weights(model) if weight_only(model) else nullcontext():
            hidden, logits = final_outputs(model, samples)
            quantized = {
                name: (module.quantized_weight() if module.fake_quant else module.weight).detach().cpu()
                for name, module in layers
            }
    finally:
        for h in hooks:
            h.remove()
    report = []
    for name, _ in layers:
        signal, noise = energy[name]
        report.append(
            {
                "layer": name,
                "weight_sqnr": fake.sqnr(originals[name], quantized[name]),
                "output_sqnr": float("inf") if noise == 0 else 10 * math.log10(signal / noise),
            }
        )
    return report, hidden, logits


def layer_sqnr(model: nn.Module, originals: dict[str, torch.Tensor], samples: list[list[int]]) -> list[dict]:
    """[{"layer", "weight_sqnr", "output_sqnr"}] for each QuantLinear, in module order."""
    return layer_sqnr_and_outputs(model, originals, samples)[0]


def hidden_sqnr(reference: list[torch.Tensor], quantized: list[torch.Tensor]) -> float:
    return fake.sqnr(torch.cat([r.flatten() for r in reference]), torch.cat([q.flatten() for q in quantized]))


def summarize(report: list[dict]) -> dict[str, float]:
    """Mean and min of each SQNR column."""
    out = {}
    for key in ("weight_sqnr", "output_sqnr"):
        values = [r[key] for r in report]
        out[f"{key}_mean"] = sum(values) / len(values)
        out[f"{key}_min"] = min(values)
    return out


def format_table(report: list[dict]) -> str:
    lines = [f"{'layer':<48} {'weight SQNR':>12} {'output SQNR':>12}"]
    lines += [f"{r['layer']:<48} {r['weight_sqnr']:>12.2f} {r['output_sqnr']:>12.2f}" for r in report]
    return "\n".join(lines)
