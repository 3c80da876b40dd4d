"""Building, saving and loading models: a real Qwen3 over the testbed vocabulary, safetensors only."""

import sys
import types

import pytest
import torch
from real_shapes import TINY_QWEN3
from transformers import Qwen3ForCausalLM

from pipeline.data.tokenizer import build_tokenizer
from pipeline.models import Qwen3Arch, build_model, load_model, load_tokenizer, save_model
from pipeline.quant.formats import layout

ARCH = Qwen3Arch(**TINY_QWEN3)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_build_is_qwen3_with_gqa_and_qk_norm_and_seeded(tokenizer):
    before = torch.get_rng_state()
    model = build_model(ARCH, tokenizer, seed=1)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is untouched
    assert isinstance(model, Qwen3ForCausalLM)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 4 * 16
    assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.shape == (16,)
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    again, other = build_model(ARCH, tokenizer, seed=1), build_model(ARCH, tokenizer, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_save_then_load_from_stage_or_model_dir(tokenizer, tmp_path):
    model = build_model(ARCH, tokenizer, seed=0)
    save_model(model, tokenizer, tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    ids = torch.tensor([[5, 9, 200, 17]])
    expected = model(ids).logits
    for where in (tmp_path, tmp_path / "model"):
        loaded = load_model(where)
        assert loaded.dtype == torch.float32 and not loaded.training
        assert torch.equal(loaded(ids).logits, expected)
        assert load_tokenizer(where).eos_token == "<|im_end|>"
    assert load_model(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    # greedy generation stops at <|im_end|> or <|endoftext|>, pads with <|endoftext|>
    generation = load_model(tmp_path).generation_config
    assert generation.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert generation.pad_token_id == tokenizer.pad_token_id and not generation.do_sample


def test_quantized_directories_go_to_quant_io(tokenizer, tmp_path, monkeypatch):
    save_model(build_model(ARCH, tokenizer), tokenizer, tmp_path / "model")
    sentinel = torch.nn.Linear(2, 2)
    fake = types.ModuleType("pipeline.quant.formats.io")
    fake.load_quantized = lambda path, trust_remote_code: sentinel
    monkeypatch.setitem(sys.modules, "pipeline.quant.formats.io", fake)
    monkeypatch.setattr(layout, "is_quantized", lambda path: str(path) == str(tmp_path / "model"))
    assert load_model(tmp_path) is sentinel and not sentinel.training
