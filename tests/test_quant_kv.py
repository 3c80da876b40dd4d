"""KV-cache fake quantization after RoPE through the attention-function registry."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

from pipeline.quant.kv import enable_kv_quant, fake_quantize_kv
from pipeline.quant.scheme import KVCacheSpec
from quant_tiny import generate_and_full_forward, tiny_model

KV4 = KVCacheSpec(num_bits=4, symmetric=False)


def test_per_token_per_head_groups_equal_compressed_tensors():
    k = torch.randn(2, 3, 7, 64, generator=torch.Generator().manual_seed(0))
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="token", dynamic=True)
    for group in (None, 32):
        # compressed-tensors' token strategy keeps dims 0 and 1 and reduces the rest: one row per
        # (batch, head, token, group)
        x = k.reshape(2, -1, group or 64)
        scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
        ref = ct_fake_quantize(x, scale, zp, args).reshape(k.shape)
        torch.testing.assert_close(fake_quantize_kv(k, KVCacheSpec(num_bits=4, group_size=group)), ref, atol=0, rtol=0)


def _logits(impl, kv, x):
    model = tiny_model(300)
    model.set_attn_implementation(impl)
    if kv is not None:
        enable_kv_quant(model, kv)
    with torch.no_grad():
        return model(x).logits


def test_same_quantization_under_sdpa_and_eager_and_it_changes_the_output():
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, sdpa, eager = _logits("sdpa", None, x), _logits("sdpa", KV4, x), _logits("eager", KV4, x)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)
    assert (sdpa - plain).abs().max() > 1e-2


def test_cached_decoding_sees_the_same_quantized_kv_as_one_full_forward():
    model = tiny_model(300)
    enable_kv_quant(model, KV4)
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    generate_and_full_forward(model, x, max_new_tokens=6)


def test_gradients_flow_through_kv_quant():
    model = tiny_model(300)
    enable_kv_quant(model, KV4)
    model.train()
    model(torch.randint(0, 300, (1, 10))).logits.sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_group_size_must_divide_head_dim():
    with pytest.raises(ValueError, match="does not divide head_dim"):
        enable_kv_quant(tiny_model(300), KVCacheSpec(num_bits=4, group_size=48))
