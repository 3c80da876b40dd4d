"""The recipe's `model` section (`ModelSpec`) and the size of a Qwen3 built from scratch (`Qwen3Arch`): schema
only, no torch, so the engine validates recipes without loading ML libraries (pipeline.models loads models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Qwen3Arch(BaseModel):
    """Size of a Qwen3-architecture model built from scratch (the testbed teacher)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(128, gt=0)
    """Width of the residual stream."""
    intermediate_size: int = Field(384, gt=0)
    """Width of the MLP's hidden layer."""
    num_hidden_layers: int = Field(2, gt=0)
    """Decoder layers."""
    num_attention_heads: int = Field(4, gt=0)
    """Query heads."""
    num_key_value_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    head_dim: int = Field(32, gt=0)
    """Width of each attention head."""
    max_position_embeddings: int = Field(1024, gt=0)
    """Longest sequence (prompt + completion) in tokens."""
    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    tie_word_embeddings: bool = False
    """Share the input embedding with lm_head."""

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
    """Dtype the base model is loaded (or built) in."""
    trust_remote_code: bool = False
    """Allow a model whose loading runs Python from its folder (config.json `auto_map`); off, such a model is
    refused."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.arch is None):
            raise ValueError("give exactly one of `path` (a pretrained model) or `arch` (build from scratch)")
        return self
