"""The training loop's optimizer, and the memory it and the model's latent weights take.

Two recipe keys (fields of `pipeline.train.loop.TrainArgs`) are the memory levers of the optimizer side:

  param_dtype  float32    latent weights and their gradients in fp32, torch AdamW: 16 bytes a trainable
                          parameter (weight 4, gradient 4, two moments 8)
               bfloat16   latent weights and gradients in bf16; the update is computed in fp32 and
                          written back with stochastic rounding, so updates smaller than a bf16 step
                          still move the weight on average (torchao's `bf16_stochastic_round`)
  optimizer    adamw      two fp32 moments (8 bytes a parameter)
               adamw_8bit the moments block-wise quantized to 8 bits (2 bytes a parameter; Dettmers et
                          al. 2022, "8-bit Optimizers via Block-wise Quantization"; torchao's AdamW8bit)

Qwen3-8B (8.2B parameters) as a KD-QAT student: fp32 + adamw is 131 GB before the teacher and the
activations; bf16 + adamw_8bit is 49 GB. torchao supplies both optimizers; we only choose between them and
save their state without pickle (`OPTIMIZER_STATE_TYPES`, used by `pipeline.engine.checkpoint`). Both levers work on
one process and under FSDP2, where torchao keeps each moment a DTensor over the 8-bit state of the rank's shard.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

ParamDtype = Literal["float32", "bfloat16"]
OptimizerName = Literal["adamw", "adamw_8bit"]

BETAS = (0.9, 0.95)  # as in GPT-style LM training: a shorter second-moment memory suits short runs


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: torch.nn.Module, name: OptimizerName, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (weight decay on matrices only) as `name` says. Parameters in bf16
    are updated with stochastic rounding; the plain fp32 case keeps torch's own (fused on GPU) AdamW."""
    groups = _param_groups(model, weight_decay)
    bf16 = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    if name == "adamw" and not bf16:
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=device.type == "cuda")
    from torchao.optim import _AdamW

    cls = _adamw_8bit() if name == "adamw_8bit" else _AdamW
    return cls(groups, lr=lr, betas=BETAS, bf16_stochastic_round=bf16)


@functools.cache
def _adamw_8bit() -> type[torch.optim.Optimizer]:
    """torchao's AdamW8bit, its 8-bit moments of float32 appearance whatever the parameter's dtype. The appearance
    dtype is only what `.dtype` reports (the update dequantizes to float32 either way), but torchao's `aten.view` of
    an OptimState8bit drops it (to float32), and under FSDP2 AdamW8bit wraps each shard's moments with
    `DTensor.from_local`, which views them: a bf16 parameter's moments became a float32 view of a bf16 tensor, which
    torch.compile (the update) cannot trace. A float32 one views as itself."""
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    class AdamW8bitFloat32Moments(AdamW8bit):
        @staticmethod
        def _subclass_zeros(p: torch.Tensor, signed: bool, block_size: int) -> torch.Tensor:
            return OptimState8bit.zeros(p.shape, signed, block_size, p.device)

    return AdamW8bitFloat32Moments


def bytes_per_trainable_parameter(param_dtype: ParamDtype, optimizer: OptimizerName) -> int:
    """Latent weight + gradient + optimizer moments, per trainable parameter."""
    weight = 4 if param_dtype == "float32" else 2
    moments = 8 if optimizer == "adamw" else 2
    return 2 * weight + moments


def _optim_state_8bit():
    from torchao.optim.subclass_8bit import OptimState8bit

    return OptimState8bit


# Tensor subclasses an optimizer state may hold, by the name written into the checkpoint: a checkpoint names
# one of these, never an arbitrary class, so loading it imports nothing it chooses.
OPTIMIZER_STATE_TYPES = {"torchao.OptimState8bit": _optim_state_8bit}


def subclass_name(tensor: torch.Tensor) -> str | None:
    """The registered name of `tensor`'s subclass, None for a plain tensor; an unknown subclass is an error."""
    if type(tensor) is torch.Tensor or isinstance(tensor, torch.nn.Parameter):
        return None
    for name, get_cls in OPTIMIZER_STATE_TYPES.items():
        if type(tensor) is get_cls():
            return name
    raise TypeError(f"a checkpoint cannot hold a {type(tensor).__name__} tensor")


def flatten_subclass(tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], list]:
    """(inner plain tensors, JSON-able attributes) of a registered subclass, via its `__tensor_flatten__`."""
    names, attributes = tensor.__tensor_flatten__()
    return {n: getattr(tensor, n) for n in names}, [
        str(a).removeprefix("torch.") if isinstance(a, torch.dtype) else a for a in attributes
    ]


def unflatten_subclass(name: str, inner: dict[str, torch.Tensor], attributes: list) -> torch.Tensor:
    """Inverse of `flatten_subclass` (dtype attributes were written as their names)."""
    if name not in OPTIMIZER_STATE_TYPES:
        raise ValueError(f"the checkpoint names an unknown tensor type {name!r}")
    cls = OPTIMIZER_STATE_TYPES[name]()
    attributes = [
        getattr(torch, a) if isinstance(a, str) and isinstance(getattr(torch, a, None), torch.dtype) else a
        for a in attributes
    ]
    return cls.__tensor_unflatten__(inner, attributes, None, None)
