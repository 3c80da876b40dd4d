"""Quantization primitives: pure functions on tensors, equal to compressed-tensors' to the bit.

Integer affine quantization with `num_bits` b, codes in [q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]:

    scale = (max - min) / (2^b - 1),  zero_point = round(clamp(q_min - min / scale, q_min, q_max))   (asymmetric)
    scale = max(|min|, |max|) / ((2^b - 1) / 2),  zero_point = 0                                      (symmetric)
    q = round(clamp(x / scale + zero_point, q_min, q_max));  x_hat = (q - zero_point) * scale

with min/max first widened to include 0, scales of 0 replaced by the dtype's eps, scales in the
tensor's dtype and zero points int8: compressed-tensors 0.19 `calculate_qparams` and
`_quantize_dequantize` (CPU path), op for op, so the same float roundings happen in the same order.
Weights are [out_features, in_features]; a group is `group_size` consecutive input columns
(group_size None = the whole row, "per channel"); scales and zero points are [out_features, n_groups].

Why our own copy and not compressed-tensors' functions: theirs run under `torch.no_grad` (QAT needs
gradients) and take a pydantic `QuantizationArgs` per call; ours are differentiable where it matters
(`fake_quantize_ste`) and are tested against theirs with atol=0.
"""

from __future__ import annotations

import torch

ZERO_POINT_DTYPE = torch.int8
"""compressed-tensors stores integer zero points as int8 for num_bits <= 8."""


def qrange(num_bits: int) -> tuple[float, float]:
    """(q_min, q_max) of signed `num_bits` codes."""
    return -(2.0 ** (num_bits - 1)), 2.0 ** (num_bits - 1) - 1


def group_minmax(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over each group of columns: [rows, cols] -> two [rows, n_groups]."""
    grouped = _grouped(x, group_size)
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def calculate_qparams(
    min_vals: torch.Tensor, max_vals: torch.Tensor, num_bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale in min_vals' dtype, int8 zero point) of the same shape as min_vals."""
    min_vals = torch.minimum(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.maximum(max_vals, torch.zeros_like(max_vals))
    q_min, q_max = qrange(num_bits)
    # new_full, not torch.tensor(..., device=): the same value, but filled on the device rather than copied
    # from the host, which on CUDA is a blocking copy (a stream sync) on every call
    bit_range = min_vals.new_full((), q_max - q_min)
    if symmetric:
        scale = torch.maximum(min_vals.abs(), max_vals.abs()) / (bit_range / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (max_vals - min_vals) / bit_range
        # computed before the eps guard below, as compressed-tensors does: an all-zero group gets
        # 0/0 here and keeps that zero point
        zero_point = torch.clamp(q_min - min_vals / scale, q_min, q_max)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, scale.new_full((), eps), scale)
    info = torch.iinfo(ZERO_POINT_DTYPE)
    zero_point = torch.round(torch.clamp(zero_point, info.min, info.max)).to(ZERO_POINT_DTYPE)
    return scale, zero_point


def weight_qparams(
    w: torch.Tensor, num_bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (round-to-nearest) scales and zero points of a weight, per group or per channel."""
    return calculate_qparams(*group_minmax(w, group_size), num_bits, symmetric)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Integer codes of x (as x's dtype unless `dtype` is given), shape of x."""
    q_min, q_max = qrange(num_bits)
    scaled = _grouped(x, group_size) / scale.unsqueeze(-1)
    if zero_point is not None:
        scaled = scaled + zero_point.unsqueeze(-1).to(x.dtype)
    q = torch.round(torch.clamp(scaled, q_min, q_max)).to(x.dtype).flatten(-2)
    return q if dtype is None else q.to(dtype)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(q - zero_point) * scale, in scale's dtype unless `dtype` is given."""
    x = _grouped(q, group_size).to(scale.dtype)
    if zero_point is not None:
        x = x - zero_point.unsqueeze(-1).to(scale.dtype)
    x = (x * scale.unsqueeze(-1)).flatten(-2)
    return x if dtype is None else x.to(dtype)


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator).

    Written as a Function rather than `v + (round(v) - v).detach()` because that sum is not exactly
    round(v) in floating point, and the fake-quantized weights must equal the exported ones to the bit.
    """

    @staticmethod
    def forward(ctx, v):
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's shape and dtype, differentiable.

    Gradients (LSQ, Esser et al. 2020): to x, 1 inside the clamp range and 0 where x is clipped (STE
    through the rounding); to the scale, round(x/s) - x/s inside the range and q - zero_point at the
    clamp bounds. Zero points are integers and get none.
    """
    q_min, q_max = qrange(num_bits)
    scale = scale.unsqueeze(-1)
    scaled = _grouped(x, group_size) / scale
    if zero_point is not None:
        scaled = scaled + zero_point.unsqueeze(-1).to(x.dtype)
    q = _RoundSTE.apply(torch.clamp(scaled, q_min, q_max)).to(x.dtype)
    x_hat = q.to(scale.dtype)
    if zero_point is not None:
        x_hat = x_hat - zero_point.unsqueeze(-1).to(scale.dtype)
    return (x_hat * scale).flatten(-2).to(x.dtype)


def fake_quantize_per_token(
    x: torch.Tensor, num_bits: int, symmetric: bool, clip_ratio: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Dynamic per-token fake quantization of activations [..., features] (compressed-tensors' TOKEN
    strategy when clip_ratio is 1). Scales come from each token's own min/max, detached, so gradients
    reach x only through the STE. A tensor `clip_ratio` (a learned clip) multiplies the range outside
    the detach and gets the LSQ gradient through the scale."""
    with torch.no_grad():
        min_vals, max_vals = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        if not isinstance(clip_ratio, torch.Tensor):
            if clip_ratio != 1.0:
                min_vals, max_vals = min_vals * clip_ratio, max_vals * clip_ratio
            scale, zero_point = calculate_qparams(min_vals, max_vals, num_bits, symmetric)
    if isinstance(clip_ratio, torch.Tensor):
        clip = clip_ratio.to(x.dtype)
        scale, zero_point = calculate_qparams(min_vals * clip, max_vals * clip, num_bits, symmetric)
    return fake_quantize(x, scale, None if symmetric else zero_point, num_bits, None)


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, 20 log10(|ref| / |ref - approx|); inf when equal."""
    reference, approximation = reference.double(), approximation.double()
    noise = torch.linalg.vector_norm(reference - approximation)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(reference) / noise))


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[..., cols] -> [..., n_groups, group_size]; per channel is one group of all columns."""
    cols = x.shape[-1]
    size = cols if group_size is None else group_size
    if cols % size:
        raise ValueError(f"group_size {size} does not divide the {cols} columns")
    return x.unflatten(-1, (cols // size, size))
