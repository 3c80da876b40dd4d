"""FlatQuant: learned transforms keep the function with quantization off (heads × head_dim ≠ hidden), beat
QuaRot and RTN on layer output MSE at W4A4KV4 on a model with planted outlier channels, train in KD-QAT
(gradients reach them) and survive save/load."""

import pytest
import torch

import pipeline
from pipeline.quant.methods import flatquant
from pipeline.quant.apply import prepare, set_fake_quant
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.layerwise import capture_inputs
from pipeline.quant.online import transform_parameters, transforms
from pipeline.quant.scheme import QuantSpec
from quant_tiny import one_thread, planted_rtn_and_quarot, planted_w4a4kv4, tiny_model, tiny_tokenizer

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

    assert not torch.allclose(
        model.model.layers[0].mlp.down_proj.input_transform.left.double(), kronecker_factors(384)[0]
    )

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


def test_flatquant_beats_quarot_and_rtn_on_planted_outliers():
    calib, held_out = _samples(6), _samples(8, seed=1)
    rtn, rot = planted_rtn_and_quarot()
    flat = planted_w4a4kv4()
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


def test_tf32_holds_for_the_calibration_only_and_is_a_flatquant_key(monkeypatch):
    """`tf32` sets torch's process-wide float32 matmul precision for the calibration alone (TF32 acts on CUDA),
    also when calibration fails; `tf32` and `compile` are keys of the ptq stage's flatquant config, not RTN's."""
    import stages.ptq as ptq

    seen = []
    monkeypatch.setattr(
        flatquant, "_calibrate_layers", lambda *a: seen.append(torch.get_float32_matmul_precision()) or []
    )
    model = tiny_model(300)
    prepare(model, W4A4KV4)
    assert torch.get_float32_matmul_precision() == "highest"
    flatquant.calibrate(model, _samples(1, length=16), epochs=1, tf32=True)
    flatquant.calibrate(model, _samples(1, length=16), epochs=1)
    assert seen == ["high", "highest"] and torch.get_float32_matmul_precision() == "highest"
    monkeypatch.setattr(flatquant, "_calibrate_layers", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        flatquant.calibrate(model, _samples(1, length=16), epochs=1, tf32=True)
    assert torch.get_float32_matmul_precision() == "highest"
    config = ptq.Config.model_validate(
        {"type": "ptq", "method": "flatquant", "calibration_source": "generic", "compile": True, "tf32": True}
    )
    assert (config.compile, config.tf32) == (True, True)
    with pytest.raises(ValueError, match="tf32"):  # a flatquant key, not RTN's
        ptq.Config.model_validate({"type": "ptq", "method": "rtn", "tf32": True})


def test_flatquant_needs_a_prepared_model():
    with pytest.raises(ValueError, match="prepared"):
        flatquant.calibrate(tiny_model(300), _samples(1))


def test_step_inverses_share_one_inversion_and_defer_the_singularity_check():
    from pipeline.quant.online import KroneckerTransform, StepInverses

    g = torch.Generator().manual_seed(0)
    t = KroneckerTransform(
        torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g),
        torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g),
        torch.rand(32, generator=g) + 0.5,
    )
    w = torch.randn(6, 32, generator=g)
    per_reader, exact = t.inverse_transpose(w), t.inverse_transpose(w.double())
    with StepInverses([t]) as inverses:
        cached = t._inverses[1]
        torch.testing.assert_close(t.inverse_transpose(w), per_reader, rtol=1e-5, atol=1e-6)
        assert t._inverses[1] is cached  # a second reader reuses the step's inversion
        assert torch.equal(t.inverse_transpose(w.double()), exact)  # the float64 merge inverts on its own
        inverses.check()
        with torch.no_grad():
            t.left.zero_()
        inverses.refresh()  # no host sync here: the error waits for the epoch's check
        with pytest.raises(torch.linalg.LinAlgError, match="singular"):
            inverses.check()
    assert t._inverses is None


def test_batches_cover_every_sample_once_and_never_mix_lengths():
    model = tiny_model(300)
    prepare(model, W4A4KV4)
    samples = _samples(5) + _samples(2, length=40, seed=2)
    buckets = flatquant._buckets(capture_inputs(model, samples))
    assert sorted(b.hidden.shape[:2] for b in buckets) == [(2, 40), (5, 48)]
    batches = flatquant._epoch_batches(buckets, 4, torch.Generator().manual_seed(0))
    assert sorted(len(rows) for _, rows in batches) == [1, 2, 4]  # ceil(5/4) + ceil(2/4) steps
    seen = sorted(b.samples[r] for b, rows in batches for r in rows.tolist())
    assert seen == list(range(7))
    # one per step: the order the one-sample loop drew
    singles = flatquant._epoch_batches(buckets, 1, torch.Generator().manual_seed(0))
    assert [b.samples[int(rows)] for b, rows in singles] == torch.randperm(
        7, generator=torch.Generator().manual_seed(0)
    ).tolist()
    report = flatquant.calibrate(model, samples, epochs=2, batch_size=4)
    assert [r["steps"] for r in report] == [6, 6]


def test_batched_calibration_is_as_good_as_one_sample_per_step_on_planted_outliers():
    # FlatQuant's own setting (4 sequences per step, lr 5e-3) against ours (1 per step, lr 1e-3), held-out MSE
    # summed over the layers. Seen over three calibration draws (seeds 0, 2, 4): batched 0.00676 / 0.00667 /
    # 0.00634 vs one per step 0.00692 / 0.00666 / 0.00669; per layer either may lead by up to 5% (which epoch
    # beats the init is a coin toss at 4 bits). Batched at lr 1e-3 was worse (0.00705 / 0.00723 / 0.00669):
    # fewer steps want the larger rate.
    calib, held_out = _samples(6), _samples(8, seed=1)
    single, batched = planted_w4a4kv4(), planted_w4a4kv4()
    flatquant.calibrate(single, calib, epochs=5, lr=1e-3)
    report = flatquant.calibrate(batched, calib, epochs=5, lr=5e-3, batch_size=4)
    assert [r["steps"] for r in report] == [10, 10]  # 5 epochs x ceil(6 / 4)
    mse_single, mse_batched = (
        flatquant.layer_output_mse(single, held_out),
        flatquant.layer_output_mse(batched, held_out),
    )
    print(mse_single, mse_batched)
    assert sum(mse_batched) <= 1.01 * sum(mse_single)


def test_merging_once_per_step_gives_the_per_reader_loss_and_gradients():
    model = planted_w4a4kv4()
    layer = model.model.layers[0].float()
    buckets = flatquant._buckets(capture_inputs(model, _samples(2)))
    calib = flatquant._install(layer, flatquant._fp_targets(layer, buckets, 1), 0.5, 0)
    trained = [p for _, t in transforms(layer) for p in t.parameters()] + [c.weight_clip for c in calib.values()]
    for p in trained:
        p.requires_grad_(True)
    b = buckets[0]

    def loss_and_grads(step):
        for p in trained:
            p.grad = None
        if step is not None:
            step.refresh()
        loss = flatquant._mse_loss(layer, b.hidden[:2], b.targets[:2], b.kwargs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    loss, grads = loss_and_grads(None)
    with flatquant._StepMerge(layer, calib) as step:
        assert len(step.groups) == 4  # q/k/v, gate/up, o, down
        merged_loss, merged_grads = loss_and_grads(step)
    torch.testing.assert_close(merged_loss, loss, rtol=1e-5, atol=0)
    for g, mg in zip(grads, merged_grads):
        torch.testing.assert_close(mg, g, rtol=1e-4, atol=1e-4 * g.abs().max().item())
    assert all(c.step_weight is None for c in calib.values())
