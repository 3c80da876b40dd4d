"""QuantLinear: the `nn.Linear` that every stage trains, evaluates and exports.

It keeps the latent weight (`weight`, what the optimizer updates) and the weight quantizer's state in
compressed-tensors' names, so that its state dict reads like a compressed-tensors checkpoint:
`weight_scale` [out, n_groups] in the weight's dtype (a Parameter, frozen unless made learnable) and
`weight_zero_point` [out, n_groups] int8 (a buffer; None when symmetric). The forward pass is
F.linear(x, fake_quantize(weight)) with the STE of `pipeline.quant.fake`; it reads its state and
never writes it, so gradient checkpointing may re-run it. Optional per-token activation fake
quantization of the input (W4A4), with a learned clip ratio `activation_clip` (a scalar Parameter,
FlatQuant's learnable activation clipping) in place of the spec's fixed one when set. Optional
`input_transform` (pipeline.quant.online: QuaRot's online Hadamard, FlatQuant's transform), applied
before the activation quantizer and also when fake quantization is off: the weight has it merged in.

Lifecycle (pipeline.quant.apply): `prepare` swaps modules in (scales not yet set), `calibrate` sets
the scales from the weights (or GPTQ / a checkpoint sets them), then train; `export` writes the
packed integers. A forward before calibration is an error, never a silent lazy init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import fake
from pipeline.quant.scheme import ActivationSpec, WeightSpec


class QuantLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weights: WeightSpec,
        activations: ActivationSpec | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        group_size = weights.group_size or in_features
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.weights = weights
        self.activations = activations
        shape = (out_features, in_features // group_size)
        self.weight_scale = nn.Parameter(
            torch.empty(shape, device=device, dtype=self.weight.dtype), requires_grad=False
        )
        zero_point = None if weights.symmetric else torch.zeros(shape, device=device, dtype=fake.ZERO_POINT_DTYPE)
        self.register_buffer("weight_zero_point", zero_point)
        self.fake_quant = True
        """False: a plain Linear on the latent weight (for measuring the quantization error)."""
        self.calibrated = False
        self.input_transform: nn.Module | None = None
        self.activation_clip: nn.Parameter | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: WeightSpec, activations: ActivationSpec | None = None):
        """A QuantLinear that shares `linear`'s weight and bias Parameters (no copy); not calibrated."""
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, weights, activations, device="meta"
        )
        module.weight = linear.weight
        module.bias = linear.bias
        device, dtype = linear.weight.device, linear.weight.dtype
        module.weight_scale = nn.Parameter(
            torch.empty(module.weight_scale.shape, device=device, dtype=dtype), requires_grad=False
        )
        if module.weight_zero_point is not None:
            module.weight_zero_point = torch.zeros(
                module.weight_zero_point.shape, device=device, dtype=fake.ZERO_POINT_DTYPE
            )
        return module.train(linear.training)

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Install calibrated scales (and zero points when asymmetric)."""
        self.weight_scale.copy_(scale)
        if self.weight_zero_point is not None:
            self.weight_zero_point.copy_(zero_point)
        self.calibrated = True

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward pass uses (differentiable in weight and scale)."""
        if not self.calibrated:
            raise RuntimeError("QuantLinear used before calibration: run pipeline.quant.apply.calibrate first")
        return fake.fake_quantize(
            self.weight, self.weight_scale, self.weight_zero_point, self.weights.num_bits, self.weights.group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if not self.fake_quant:
            return F.linear(x, self.weight, self.bias)
        if self.activations is not None:
            a = self.activations
            clip = a.clip_ratio if self.activation_clip is None else self.activation_clip
            x = fake.fake_quantize_per_token(x, a.num_bits, a.symmetric, clip)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        w = self.weights
        groups = f"g{w.group_size}" if w.group_size else "per-channel"
        text = f"{super().extra_repr()}, w{w.num_bits} {groups} {'sym' if w.symmetric else 'asym'}"
        if self.activations is not None:
            text += f", a{self.activations.num_bits}token"
        if self.activation_clip is not None:
            text += ", learned clip"
        return text
