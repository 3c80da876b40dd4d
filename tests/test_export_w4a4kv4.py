"""W4A4KV4 export: int4 packed weights + activation/KV schemes in a valid compressed-tensors config +
transforms as tensors; pipeline.load_quantized reproduces the pre-export logits; stock transformers
refuses the directory instead of silently running it without its transforms."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pipeline
from pipeline.models import load_model
from pipeline.quant.methods import flatquant, quarot
from pipeline.quant.apply import calibrate, prepare
from pipeline.cli.export import add_arguments as add_export_arguments, run as cli_export
from pipeline.quant.formats.export import TRANSFORMS_FILE
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.online import transforms
from pipeline.quant.scheme import QuantSpec
from quant_tiny import one_thread, tiny_model, tiny_tokenizer

W4A4KV4 = QuantSpec.model_validate("w4a4kv4")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("method, clip_ratio", [("quarot", 1.0), ("quarot", 0.9), ("flatquant", 1.0)])
def test_export_reload_and_stock_refusal(tmp_path, method, clip_ratio):
    """`--scheme w4a4kv4` names the storage format; a recipe's activation clip ratio is part of the
    model's spec, travels in the reasoning_qat block and is applied again on load."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), intermediate_size=384, tie_word_embeddings=True)
    spec = QuantSpec.model_validate({"preset": "w4a4kv4", "activations": {"clip_ratio": clip_ratio}})
    prepare(model, spec)
    x = torch.randint(0, 200, (2, 21), generator=torch.Generator().manual_seed(0))
    if method == "quarot":
        quarot.rotate(model)
        calibrate(model)
    else:
        flatquant.calibrate(model, [x[0].tolist()], epochs=1)
    with torch.no_grad():
        before = model(x).logits
    save_quantized(model, tok, tmp_path / "ptq" / "model", spec)

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "ckpt"
    assert cli_export(parser.parse_args([str(tmp_path / "ptq"), "--scheme", "w4a4kv4", "--out", str(out)])) == 0

    config = json.loads((out / "config.json").read_text())
    from compressed_tensors.quantization import QuantizationConfig

    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    group = qconfig.config_groups["group_0"]
    assert (group.weights.num_bits, group.weights.strategy, group.weights.symmetric) == (4, "channel", True)
    assert (group.input_activations.num_bits, group.input_activations.strategy, group.input_activations.dynamic) == (
        4,
        "token",
        True,
    )
    assert qconfig.kv_cache_scheme.num_bits == 4 and qconfig.format == "pack-quantized"
    assert config["model_type"] == "reasoning_qat" and config["reasoning_qat"]["base_model_type"] == "qwen3"
    readme = (out / "README.md").read_text()
    assert (
        "pipeline.load_quantized" in readme and "reasoning-qat eval" in readme and "https://github.com/ —" not in readme
    )
    assert config["reasoning_qat"]["loader"].startswith("pipeline.load_quantized(DIR) or `reasoning-qat eval DIR`")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_packed").dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.weight" not in keys and not any("transform" in k for k in keys)
    with safe_open(out / TRANSFORMS_FILE, "pt") as f:
        assert "model.layers.0.mlp.down_proj.input_transform.left" in f.keys()

    loaded = pipeline.load_quantized(out)
    assert len(transforms(loaded)) == len(transforms(model))
    with torch.no_grad():
        after = loaded(x).logits
        assert (after - before).abs().max() <= 1e-3
        assert torch.equal(load_model(out)(x).logits, after)  # what `reasoning-qat eval DIR` loads

    with pytest.raises(ValueError, match="reasoning_qat"):
        AutoModelForCausalLM.from_pretrained(out)
