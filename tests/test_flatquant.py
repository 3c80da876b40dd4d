"""FlatQuant: learned transforms keep the function with quantization off (heads × head_dim ≠ hidden), beat
QuaRot and RTN on layer output MSE at W4A4KV4 on a model with planted outlier channels, train in KD-QAT
(gradients reach them) and survive save/load."""
import pytest
import torch

import pipeline
from pipeline.quant import flatquant, quarot
from pipeline.quant.apply import calibrate, prepare, set_fake_quant
from pipeline.quant.io import save_quantized
from pipeline.quant.online import transform_parameters, transforms
from pipeline.quant.scheme import QuantSpec
from quant_tiny import one_thread, tiny_model, tiny_tokenizer

W4A4KV4 = QuantSpec.model_validate("w4a4kv4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _samples(n, length=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (length,), generator=g).tolist() for _ in range(n)]


def test_calibrated_transforms_keep_the_function_with_quantization_off(tmp_path):
    # 8 heads × 64 = 512 ≠ hidden 256: the o_proj input transform is 512 wide
    shape = dict(intermediate_size=384, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    reference = tiny_model(300, **shape)
    model = tiny_model(300, **shape)
    prepare(model, W4A4KV4)
    report = flatquant.calibrate(model, _samples(3), epochs=2, lr=5e-3)
    assert [r["layer"] for r in report] == [0, 1] and all(r["seconds"] > 0 for r in report)
    assert model.model.layers[0].self_attn.o_proj.input_transform.sizes == (16, 32)
    # training moved the transforms off their Hadamard init
    from pipeline.quant.hadamard import kronecker_factors
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.input_transform.left.double(), kronecker_factors(384)[0])

    x = torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        quantized = model(x).logits
        set_fake_quant(model, False)
        got, expected = model(x).logits, reference(x).logits
        set_fake_quant(model, True)
    assert (got - expected).abs().max() < 1e-4  # float32 model, float64 merges
    assert (quantized - expected).abs().max() > 1e-2

    save_quantized(model, tiny_tokenizer(), tmp_path / "model", W4A4KV4)
    loaded = pipeline.load_quantized(tmp_path)
    assert len(transforms(loaded)) == 10
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, quantized)


def _planted():
    """Outlier channels in both norms' outputs (30x the others), the case SmoothQuant's per-channel scaling and
    FlatQuant's learned smoothing are for. Not also in the down_proj input (up_proj rows x40, as this test once
    planted): those make the layer MSE a few tokens' (5 of 144 carried half of it), and which tokens changes with
    the rounding of the CPU's kernels (a 1e-6 relative change of the weights moved QuaRot's layer-0 MSE from
    0.031 to 0.045), so no ordering of the methods held on every machine."""
    model = tiny_model(300, intermediate_size=384)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 77]] = 30.0
            layer.post_attention_layernorm.weight[[5, 150]] = 30.0
    prepare(model, W4A4KV4)
    return model


def test_flatquant_beats_quarot_and_rtn_on_planted_outliers():
    calib, held_out = _samples(6), _samples(8, seed=1)
    rtn = _planted()
    calibrate(rtn)
    rot = _planted()
    quarot.rotate(rot)
    calibrate(rot)
    flat = _planted()
    report = flatquant.calibrate(flat, calib, epochs=5, lr=1e-3)
    # training beats the init on layer 1 (0.0036 -> 0.0029..0.0032 over 1e-6 perturbations of the weights);
    # layer 0 keeps its init (Hadamard + smoothing), which no epoch improved on
    assert report[1]["mse"] < 0.95 * report[1]["mse_init"]
    mse = {k: flatquant.layer_output_mse(m, held_out) for k, m in [("rtn", rtn), ("quarot", rot), ("flatquant", flat)]}
    print({k: [f"{v:.4f}" for v in vs] for k, vs in mse.items()})
    # seen over six 1e-6 perturbations of the weights: rtn 0.0142..0.0145 / 0.0120..0.0122, quarot 0.0058..0.0064 /
    # 0.0045..0.0049, flatquant 0.0040..0.0042 / 0.0027..0.0030 (layer 0 / layer 1)
    for layer in range(2):
        assert mse["flatquant"][layer] < mse["quarot"][layer] < mse["rtn"][layer]


def test_gradients_reach_transforms_and_clips():
    model = tiny_model(300)
    prepare(model, W4A4KV4)
    flatquant.calibrate(model, _samples(1, length=16), epochs=1)
    params = transform_parameters(model)
    assert len(params) == 2 * (5 * 2 + 4) + 14  # A, B per transform, 4 smoothed per layer; 14 activation clips
    model.train()
    for p in params:
        p.requires_grad_(True)
    model(torch.tensor(_samples(1, length=16))).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_flatquant_needs_a_prepared_model():
    with pytest.raises(ValueError, match="prepared"):
        flatquant.calibrate(tiny_model(300), _samples(1))
