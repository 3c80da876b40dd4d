"""Our quantized-model layout: save, then pipeline.load_quantized gives the same model, logits to the bit."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.engine.errors import InputError
from pipeline.quant.apply import quant_linears, quantize_rtn
from pipeline.quant.formats.io import QUANT_CONFIG, is_quantized, read_quant_spec, save_quantized
from pipeline.quant.scheme import QuantSpec
from quant_tiny import save_tiny


@pytest.mark.parametrize("preset,tied", [("w3g128", False), ("w4a4kv4", True)])
def test_save_load_identical_logits(tmp_path, preset, tied):
    src = save_tiny(tmp_path / "teacher", tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec = QuantSpec.model_validate(preset)
    names = quantize_rtn(model, spec)
    stage = tmp_path / "ptq"
    save_quantized(model, AutoTokenizer.from_pretrained(src), stage / "model", spec)

    assert is_quantized(stage) and is_quantized(stage / "model") and not is_quantized(src)
    assert read_quant_spec(stage) == spec
    assert json.loads((stage / "model" / QUANT_CONFIG).read_text())["modules"] == names
    loaded = pipeline.load_quantized(stage)  # a stage directory: its model/ is used
    assert [n for n, _ in quant_linears(loaded)] == names
    x = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if spec.kv_cache is not None:
        assert loaded.config._attn_implementation == model.config._attn_implementation == "kvq_sdpa"


def test_not_quantized_is_an_error(tmp_path):
    src = save_tiny(tmp_path / "teacher")
    with pytest.raises(InputError, match="holds no quantized model"):  # the API's bad-input error, one line
        pipeline.load_quantized(src)
