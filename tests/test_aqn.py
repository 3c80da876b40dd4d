"""AQN (QeRL's adaptive quantization noise): the σ schedule, and noise on RMSNorm weights that leaves no trace."""

import pytest
import torch

from pipeline.train.aqn import AQNSpec, aqn_sigma, norm_noise, rms_norms
from quant_tiny import tiny_model

SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_hidden_layers": 2}


def test_schedule_is_noise_free_then_geometric_from_sigma_start_to_sigma_end():
    spec = AQNSpec()  # 1e-2 -> 5e-4 over K = 10 noisy stages
    assert (spec.sigma_start, spec.sigma_end, spec.num_stages) == (1e-2, 5e-4, 10)
    total = 110  # K + 1 = 11 intervals of 10 steps
    per_stage = [aqn_sigma(step, total, spec) for step in range(0, total, 10)]
    assert per_stage[0] == 0.0
    assert per_stage[1] == pytest.approx(1e-2, rel=1e-12) and per_stage[10] == pytest.approx(5e-4, rel=1e-12)
    ratios = [b / a for a, b in zip(per_stage[1:], per_stage[2:])]
    assert ratios == pytest.approx([0.05 ** (1 / 9)] * 9, rel=1e-12)
    assert per_stage[5] == pytest.approx(1e-2 * 0.05 ** (4 / 9), rel=1e-12)
    # constant within a stage, and the schedule spans exactly the run
    assert {aqn_sigma(s, total, spec) for s in range(20, 30)} == {per_stage[2]}
    assert aqn_sigma(total - 1, total, spec) == per_stage[10]
    assert aqn_sigma(3, 4, AQNSpec(num_stages=1)) == 1e-2 and aqn_sigma(1, 4, AQNSpec(num_stages=1)) == 0.0


def test_noise_touches_only_rmsnorm_weights_and_is_removed_to_the_bit():
    model = tiny_model(64, **SHAPE)
    norms = rms_norms(model)
    # per layer: input, post-attention, q and k norms; plus the final norm
    assert len(norms) == 2 * 4 + 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm_ids = {id(m.weight) for m in norms}
    with norm_noise(model, 1e-2, torch.Generator().manual_seed(0)):
        for name, p in model.named_parameters():
            if id(p) in norm_ids:
                assert not torch.equal(p, before[name]), name
            else:
                assert torch.equal(p, before[name]), name
        deltas = torch.cat([(p - before[n]).flatten() for n, p in model.named_parameters() if id(p) in norm_ids])
        assert deltas.std().item() == pytest.approx(1e-2, rel=0.1) and abs(deltas.mean().item()) < 2e-3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_noise_is_a_function_of_the_seed_and_zero_sigma_is_a_no_op():
    model = tiny_model(64, **SHAPE)
    clean = model.model.norm.weight.detach().clone()
    draws = []
    for seed in (3, 3, 4):
        with norm_noise(model, 5e-4, torch.Generator().manual_seed(seed)):
            draws.append(model.model.norm.weight.detach().clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with norm_noise(model, 0.0, torch.Generator().manual_seed(3)):
        assert torch.equal(model.model.norm.weight, clean)


def test_restoring_from_a_copy_is_exact_where_subtracting_the_noise_is_not():
    model = tiny_model(64, **SHAPE)
    w = model.model.layers[0].input_layernorm.weight
    with torch.no_grad():
        w.copy_(torch.linspace(0.5, 2.0, w.numel()))
    before = w.detach().clone()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    assert not torch.equal((before + noise) - noise, before)  # why norm_noise keeps a copy
    with norm_noise(model, 1e-2, torch.Generator().manual_seed(0)):
        assert not torch.equal(w, before)
    assert torch.equal(w, before)
