"""Layer-by-layer calibration plumbing: the inputs of the first decoder layer for each calibration sample,
and one decoder layer run on them, so that a method (FlatQuant's training, GPTQ on a transformed model)
can work on one layer at a time with only that layer's activations in memory.

A layer input is (hidden_states [1, len, hidden], the keyword arguments the model passed the layer:
position embeddings, attention mask, position ids, ...), captured by a forward pre-hook on layer 0
that stops the model there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pipeline.engine.progress import progress
from pipeline.quant.methods.quarot import decoder_layers


@dataclass
class LayerInput:
    hidden: torch.Tensor
    kwargs: dict


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, samples: list[list[int]]) -> list[LayerInput]:
    """Layer 0's inputs for each sample (token-id list), on the model's device."""
    device = next(model.parameters()).device
    captured: list[LayerInput] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in samples:
            try:
                model(torch.tensor([s], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inp: LayerInput) -> torch.Tensor:
    out = layer(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def next_inputs(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The next layer's inputs: this layer's outputs with the same keyword arguments."""
    return [LayerInput(run_layer(layer, i), i.kwargs) for i in inputs]


def each_layer(model: nn.Module, description: str) -> Iterator[tuple[int, nn.Module]]:
    """(index, decoder layer) in order, counted on a progress bar as each one is done (its calibration is
    the slow part of a layer-by-layer method: minutes a layer on a real model)."""
    layers = decoder_layers(model)
    with progress(description, total=len(layers), unit="layers") as bar:
        for index, layer in enumerate(layers):
            yield index, layer
            bar.advance(1)
