"""QuantLinear: forward = F.linear with the fake-quantized weight, STE/LSQ gradients, no state change in forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import fake
from pipeline.quant.linear import QuantLinear
from pipeline.quant.scheme import ActivationSpec, WeightSpec

W3G64 = WeightSpec(num_bits=3, group_size=64, symmetric=False)


def _calibrated(weights=W3G64, activations=None, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(128, 32, bias=bias)
    q = QuantLinear.from_linear(linear, weights, activations)
    q.set_qparams(*fake.weight_qparams(q.weight.detach(), weights.num_bits, weights.group_size, weights.symmetric))
    return linear, q


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_shares_parameters_and_forward_equals_linear_on_fake_quant_weight():
    linear, q = _calibrated()
    assert q.weight is linear.weight and q.bias is linear.bias
    x = torch.randn(3, 5, 128)
    wq = fake.fake_quantize(q.weight, q.weight_scale, q.weight_zero_point, 3, 64)
    assert not torch.equal(wq, q.weight)
    torch.testing.assert_close(q(x), F.linear(x, wq, q.bias), atol=0, rtol=0)
    q.fake_quant = False
    torch.testing.assert_close(q(x), linear(x), atol=0, rtol=0)


@pytest.mark.parametrize("weights", [WeightSpec(num_bits=4, group_size=None, symmetric=True), W3G64])
def test_no_state_change_across_forwards_and_checkpointing(weights):
    _, q = _calibrated(weights)
    q.weight_scale.requires_grad_(True)
    before = _state(q)
    x = torch.randn(4, 128, requires_grad=True)
    y1 = q(x)
    y2 = torch.utils.checkpoint.checkpoint(q, x, use_reentrant=False)
    y2.sum().backward()
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    after = _state(q)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(before[k], after[k], atol=0, rtol=0)


def test_ste_gradients_reach_weight_input_and_learnable_scale():
    _, q = _calibrated()
    x = torch.randn(6, 128, requires_grad=True)
    q(x).square().sum().backward()
    assert q.weight_scale.grad is None  # frozen by default
    wq = q.quantized_weight().detach()
    # d loss / d x = grad_y @ W_q: the input sees the quantized weight
    grad_y = 2 * F.linear(x, wq, q.bias).detach()
    torch.testing.assert_close(x.grad, grad_y @ wq)
    # d loss / d W = grad_y^T x where not clipped, 0 where clipped: with asymmetric min-max ranges the
    # integer zero point shifts the grid, so a few weights at a group's edge fall outside it
    v = q.weight.detach() / q.weight_scale.repeat_interleave(64, 1) + q.weight_zero_point.repeat_interleave(64, 1)
    inside = (v >= -4) & (v <= 3)
    assert 0 < (~inside).sum() < 0.2 * inside.numel()
    torch.testing.assert_close(q.weight.grad, (grad_y.T @ x.detach()) * inside)

    q.zero_grad()
    q.weight_scale.requires_grad_(True)
    q(x.detach()).square().sum().backward()
    assert q.weight_scale.grad is not None and q.weight_scale.grad.abs().sum() > 0


def test_activation_fake_quant_per_token():
    spec = ActivationSpec(num_bits=4, symmetric=False)
    _, q = _calibrated(activations=spec)
    x = torch.randn(2, 7, 128)
    xq = fake.fake_quantize_per_token(x, 4, False)
    torch.testing.assert_close(q(x), F.linear(xq, q.quantized_weight(), q.bias), atol=0, rtol=0)


def test_uncalibrated_forward_is_an_error():
    q = QuantLinear.from_linear(nn.Linear(128, 8), W3G64)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(1, 128))


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear.from_linear(nn.Linear(96, 8), W3G64)
