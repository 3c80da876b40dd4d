"""Our quantization primitives equal compressed-tensors' to the bit (atol=0), and their gradients are LSQ's."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams as ct_calculate_qparams
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

from pipeline.quant import fake

CASES = [
    (bits, group, sym, dtype)
    for bits in (2, 3, 4, 8)
    for group in (32, 64, 128, None)
    for sym in (True, False)
    for dtype in (torch.float32, torch.bfloat16)
]


def _ct_args(bits, group, sym):
    if group is None:
        return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="channel")
    return QuantizationArgs(num_bits=bits, symmetric=sym, strategy="group", group_size=group)


def _weight(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[3, :128] = 0.0  # an all-zero group: the eps guard
    w[5] = w[5].abs()  # all positive: min widened to 0
    w[7, 10] = 0.9  # an outlier
    return w.to(dtype)


@pytest.mark.parametrize("bits,group,sym,dtype", CASES)
def test_equals_compressed_tensors(bits, group, sym, dtype):
    w = _weight(dtype)
    args = _ct_args(bits, group, sym)
    min_vals, max_vals = fake.group_minmax(w, group)
    scale, zp = fake.calculate_qparams(min_vals, max_vals, bits, sym)
    ct_scale, ct_zp = ct_calculate_qparams(min_vals, max_vals, args)
    assert scale.dtype == ct_scale.dtype == dtype and zp.dtype == ct_zp.dtype == torch.int8
    torch.testing.assert_close(scale, ct_scale, atol=0, rtol=0)
    torch.testing.assert_close(zp, ct_zp, atol=0, rtol=0)

    zp_arg = None if sym else zp
    q = fake.quantize(w, scale, zp_arg, bits, group, dtype=torch.int8)
    torch.testing.assert_close(q, ct_quantize(w, scale, zp, args, dtype=torch.int8), atol=0, rtol=0)
    q_min, q_max = fake.qrange(bits)
    assert q.min() >= q_min and q.max() <= q_max
    torch.testing.assert_close(
        fake.dequantize(q, scale, zp_arg, group), ct_dequantize(q, scale, zp, args), atol=0, rtol=0
    )
    fq = fake.fake_quantize(w, scale, zp_arg, bits, group)
    assert fq.dtype == dtype
    torch.testing.assert_close(fq, ct_fake_quantize(w, scale, zp, args), atol=0, rtol=0)
    if dtype == torch.float32 or bits <= 4:
        # a fake-quantized tensor is a fixed point, what importing GPTQ's dequantized weights relies
        # on (not for 8-bit codes in bf16: q * scale needs more than bf16's 8 significant bits)
        torch.testing.assert_close(fake.fake_quantize(fq, scale, zp_arg, bits, group), fq, atol=0, rtol=0)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False)])
def test_per_token_equals_compressed_tensors(bits, sym):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy="token", dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    torch.testing.assert_close(
        fake.fake_quantize_per_token(x, bits, sym), ct_fake_quantize(x, scale, zp, args), atol=0, rtol=0
    )


def test_ste_gradients_are_lsq():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    scale, zp = fake.weight_qparams(w, 3, 32, False)
    scale = (scale * 0.8).requires_grad_()  # shrink so that some weights are clipped
    w = w.requires_grad_()
    upstream = torch.randn(4, 64)
    (fake.fake_quantize(w, scale, zp, 3, 32) * upstream).sum().backward()

    q_min, q_max = fake.qrange(3)
    s = scale.detach().repeat_interleave(32, dim=1)
    z = zp.float().repeat_interleave(32, dim=1)
    v = w.detach() / s + z
    inside = (v >= q_min) & (v <= q_max)
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(w.grad, upstream * inside)
    q = torch.round(v.clamp(q_min, q_max))
    d_scale = torch.where(inside, q - v, q - z)  # d/ds of (q - z) * s with q = round(x/s + z)
    torch.testing.assert_close(scale.grad, (upstream * d_scale).unflatten(1, (2, 32)).sum(-1))


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        fake.weight_qparams(torch.randn(4, 96), 3, 64, False)


def test_sqnr():
    x = torch.randn(100)
    assert fake.sqnr(x, x) == float("inf")
    assert fake.sqnr(x, x + 0.1 * x) == pytest.approx(20.0)
