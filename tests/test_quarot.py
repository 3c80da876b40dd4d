"""QuaRot: rotations preserve the function (quantization off), survive save/load, and hold through cached
generation with the 4-bit KV cache on rotated keys; QuaRot lowers W4A4KV4 layer error against RTN."""

import pytest
import torch

import pipeline
from pipeline.quant.methods import flatquant, quarot
from pipeline.quant.apply import calibrate, prepare, set_fake_quant
from pipeline.quant.methods.gptq import gptq_layerwise
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.scheme import QuantSpec
from quant_tiny import (
    generate_and_full_forward,
    one_thread,
    planted_rtn_and_quarot,
    planted_w4a4kv4,
    tiny_model,
    tiny_tokenizer,
)

W4A4KV4 = QuantSpec.model_validate("w4a4kv4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _batch(seed=0, shape=(2, 19)):
    return torch.randint(0, 250, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_with_quantization_off_keeps_the_logits(tied):
    # hidden 256, intermediate 384 = 2^5 · 12: the down_proj Hadamard has a Paley block
    reference = tiny_model(300, intermediate_size=384, tie_word_embeddings=tied).double()
    model = tiny_model(300, intermediate_size=384, tie_word_embeddings=tied).double()
    prepare(model, W4A4KV4)
    calibrate(model)
    set_fake_quant(model, False)  # weights, activations and KV cache; the online rotations stay
    quarot.rotate(model, seed=1)
    x = _batch()
    with torch.no_grad():
        expected, got = reference(x).logits, model(x).logits
    # float64 weights; Qwen3's RMSNorm and RoPE compute in float32, which bounds the agreement
    assert (got - expected).abs().max() < 1e-5
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.down_proj.input_transform is not None
    assert model.model.layers[0].self_attn.o_proj.input_transform is not None  # mixes the heads
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight
    )


def test_generation_with_rotated_4bit_kv_equals_full_forward_argmax(tmp_path):
    model = tiny_model(300, intermediate_size=384)
    prepare(model, W4A4KV4)
    quarot.rotate(model)
    calibrate(model)
    x = _batch(1, (1, 10))
    out, full = generate_and_full_forward(model, x, max_new_tokens=8)
    for step in range(len(out.logits)):
        assert int(full[0, 9 + step].argmax()) == int(out.sequences[0, 10 + step])

    save_quantized(model, tiny_tokenizer(), tmp_path / "model", W4A4KV4)
    loaded = pipeline.load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(out.sequences).logits, full)


def test_quarot_beats_rtn_and_gptq_improves_it():
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 250, (48,), generator=g).tolist() for _ in range(6)]

    # outlier channels in the norm outputs, as real LLMs have
    rtn, rot = planted_rtn_and_quarot()
    rot_gptq = planted_w4a4kv4()
    quarot.rotate(rot_gptq)
    names = gptq_layerwise(rot_gptq, samples[:4])
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    mse = {
        k: sum(flatquant.layer_output_mse(m, samples[4:]))
        for k, m in [("rtn", rtn), ("quarot", rot), ("quarot+gptq", rot_gptq)]
    }
    assert mse["quarot"] < 0.5 * mse["rtn"]
    assert mse["quarot+gptq"] < mse["quarot"]


def test_rotate_needs_a_prepared_model():
    with pytest.raises(ValueError, match="prepared"):
        quarot.rotate(tiny_model(300))
