"""Model loading and building: the recipe's `model` section, Hugging Face models, the testbed's Qwen3.

    model = build_model(Qwen3Arch(), build_tokenizer(), seed=0)   # the testbed teacher, untrained
    save_model(model, tokenizer, "out/model")                     # HF layout, safetensors only
    model = load_model("artifacts/demo/teacher")                  # stage dir, model dir or hub id
    tokenizer = load_tokenizer("artifacts/demo/teacher")

Models are plain transformers models (Qwen3ForCausalLM for the testbed), so generation, TRL,
accelerate and DeepSpeed take them as they are. Weights are read and written as safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM)


class Qwen3Arch(BaseModel):
    """Size of a Qwen3-architecture model built from scratch (the testbed teacher)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(384, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(32, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _gqa(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelSpec(BaseModel):
    """The recipe's base model: a Hugging Face causal LM (`path`) or one built from scratch (`arch`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    """Hub id or local directory of a Hugging Face causal LM."""
    arch: Qwen3Arch | None = None
    """Build a Qwen3 model of this size from scratch (the testbed); the `sft` stage trains it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.arch is None):
            raise ValueError("give exactly one of `path` (a pretrained model) or `arch` (build from scratch)")
        return self


# -- building, loading, saving ------------------------------------------------------------------

def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"  # whatever the checkpoint was saved in
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_dir(path: str | Path) -> str:
    """The Hugging Face model directory (or hub id) behind `path`: a stage directory means `<path>/model`."""
    inner = Path(path) / "model"
    return str(inner) if (inner / "config.json").is_file() else str(path)


def build_model(arch: Qwen3Arch, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3 (GQA, q/k RMSNorm) of size `arch` over `tokenizer`'s vocabulary, fp32.

    Initialisation draws from a private RNG seeded with `seed`, so the global RNG is left as it was.
    """
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    # as Qwen3's generation_config: stop at end of turn or end of text, pad with <|endoftext|>
    eos = [tokenizer.eos_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id != tokenizer.eos_token_id else [])
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def is_quantized(path: str | Path) -> bool:
    """Whether `path` (stage or model directory) holds a quantized model, as pipeline.quant.io tells."""
    where = model_dir(path)
    try:
        import pipeline.quant.io as quant_io
    except ModuleNotFoundError as e:
        if e.name != "pipeline.quant.io":
            raise
        config = Path(where) / "config.json"
        if config.is_file() and "quantization_config" in json.loads(config.read_text()):
            raise ImportError(f"{where} holds a quantized model, which needs pipeline.quant.io") from e
        return False
    return quant_io.is_quantized(where)


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM from a stage directory, a model directory or a hub id.

    A quantized checkpoint (as `pipeline.quant.io.is_quantized` tells) is loaded by
    `pipeline.quant.io.load_quantized`, which returns the model with its QuantLinear modules.
    dtype None keeps the dtype it was saved in.
    """
    where = model_dir(path)
    if is_quantized(where):
        from pipeline.quant.io import load_quantized

        model = load_quantized(where)
        if dtype is not None:
            model = model.to(_torch_dtype(dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=_torch_dtype(dtype), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model (stage directory, model directory or hub id)."""
    return AutoTokenizer.from_pretrained(model_dir(path), trust_remote_code=trust_remote_code)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `out_dir`; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if any(out.glob("*.bin")) or not any(out.glob("*.safetensors")):
        raise RuntimeError(f"{out}: expected safetensors weights and no pickle files")
    return out
