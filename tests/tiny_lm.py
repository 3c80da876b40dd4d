"""A tiny random Qwen3 over the testbed tokenizer, shared by the generation / evaluation / traces tests."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from pipeline.data.tokenizer import build_tokenizer


@lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer()


def model(seed: int = 0) -> Qwen3ForCausalLM:
    tok = tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    lm = Qwen3ForCausalLM(config).eval()
    lm.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id
    )
    return lm
