"""QuaRot (Ashkboos et al. 2024): Hadamard rotations that spread activation outliers over all channels,
so that 4-bit per-token activations and KV cache lose less. The weaker W4A4KV4 baseline
(docs/results/w4a4kv4/README.md).

    prepare(model, spec)      # QuantLinears in place (not calibrated)
    rotate(model, seed)       # function-preserving: logits unchanged with quantization off
    calibrate(model) / gptq_transformed(model, ...)   # then RTN or GPTQ on the rotated weights

What `rotate` does to a Llama/Qwen-style decoder (all products in float64, cast back once):
1. untie lm_head from the embeddings (they get different rotations: the embedding's output side, the
   head's input side);
2. fold every RMSNorm's scale γ into the Linears that read it (W ← W diag γ; γ ← 1): a rotation commutes
   with RMSNorm only without a per-channel scale (‖xQ‖ = ‖x‖);
3. the residual stream h -> hQ, Q = diag(±1)·H (random Hadamard, pipeline.quant.hadamard): embeddings
   E ← EQ; readers of the stream (q, k, v, gate, up, lm_head) W ← WQ; writers (o_proj, down_proj) W ← QᵀW;
4. values and o_proj's input per head: v_h -> v_h H_d fused into v_proj (W_v,h ← H_dᵀ W_v,h) and o_proj
   (W_o,h ← W_o,h H_d), exact because attention mixes values linearly per head (GQA: every query head
   of a KV group reads the same rotated values);
5. online: the down_proj input x -> x H_i (H_i of the intermediate width, Kronecker-factored; 3072 =
   2^8·12 with a Paley block, see pipeline.quant.hadamard), W_down ← W_down H_i; the o_proj input
   (heads × head_dim wide) likewise, W_o ← W_o H; and queries and keys after RoPE, q -> qH_d, k -> kH_d
   (scores unchanged, the KV quantizer sees rotated keys). Qwen3's q_norm / k_norm act per head on
   q_proj / k_proj outputs, which step 3 leaves in the original basis, and before RoPE, so the online key
   rotation goes after them (pipeline.quant.kv).
The o_proj input's online rotation is QuaRot's H_{n_heads} ⊗ I across heads, here a Hadamard of the whole
width (the paper's is cheaper; both mix the heads, and H_d is already fused within them). Without it, the
GPU testbed's teacher under W4A4KV4 flipped 1.51% of its teacher-forced argmaxes instead of 1.28%.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.engine.progress import progress
from pipeline.quant.hadamard import kronecker_factors, random_hadamard
from pipeline.quant.linear import QuantLinear
from pipeline.quant.online import KroneckerTransform


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner.layers


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def untie(model: nn.Module) -> None:
    """Give lm_head its own copy of the embedding matrix (config updated so that reloads stay untied)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


def fold_norms(model: nn.Module) -> None:
    """W ← W diag(γ) for every Linear reading an RMSNorm, then γ ← 1."""

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        gamma = norm.weight.double()
        for linear in readers:
            _set(linear.weight, linear.weight.double() * gamma)
        _set(norm.weight, torch.ones_like(gamma))

    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.get_decoder().norm, [model.get_output_embeddings()])


def _check_prepared(model: nn.Module) -> None:
    layer = decoder_layers(model)[0]
    if not isinstance(layer.mlp.down_proj, QuantLinear):
        raise ValueError("rotate needs the model prepared (pipeline.quant.apply.prepare) with down_proj targeted")
    if any(hasattr(m, "qk_transform") for m in model.modules()):
        raise ValueError("the model is already rotated or transformed")


@torch.no_grad()
def rotate_values(attn: nn.Module, h_d: torch.Tensor) -> None:
    """v_h -> v_h H_d for every head, fused: rows of v_proj (its outputs) and columns of o_proj (its inputs)."""
    head_dim = h_d.shape[0]
    h_d = h_d.to(attn.v_proj.weight.device)
    w_v = attn.v_proj.weight.double().unflatten(0, (-1, head_dim))  # [kv_heads, head_dim, hidden]
    _set(attn.v_proj.weight, (h_d.T @ w_v).flatten(0, 1))
    if attn.v_proj.bias is not None:
        _set(attn.v_proj.bias, (attn.v_proj.bias.double().unflatten(0, (-1, head_dim)) @ h_d).flatten())
    w_o = attn.o_proj.weight.double().unflatten(1, (-1, head_dim))  # [hidden, heads, head_dim]
    _set(attn.o_proj.weight, (w_o @ h_d).flatten(1))


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0) -> None:
    """QuaRot's rotations, in place (see the module docstring); the model must be prepared."""
    _check_prepared(model)
    config = model.config.get_text_config()
    untie(model)
    fold_norms(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    device = embed.weight.device
    q = random_hadamard(config.hidden_size, seed).to(device)
    _set(embed.weight, embed.weight.double() @ q)
    _set(head.weight, head.weight.double() @ q)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h_d = torch.kron(*kronecker_factors(head_dim)).to(device)
    layers = decoder_layers(model)
    with progress("quarot", total=len(layers), unit="layers") as bar:
        for layer in layers:
            _rotate_layer(layer, q, h_d, seed)
            bar.advance(1)


def _rotate_layer(layer: nn.Module, q: torch.Tensor, h_d: torch.Tensor, seed: int) -> None:
    """One decoder layer's share of `rotate`: its weights in float64, its online transforms attached."""
    device, head_dim = q.device, h_d.shape[0]
    attn, mlp = layer.self_attn, layer.mlp
    for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        _set(reader.weight, reader.weight.double() @ q)
    for writer in (attn.o_proj, mlp.down_proj):
        _set(writer.weight, q.T @ writer.weight.double())
        if writer.bias is not None:
            _set(writer.bias, writer.bias.double() @ q)
    rotate_values(attn, h_d)

    for reader in (attn.o_proj, mlp.down_proj):
        online = KroneckerTransform(*kronecker_factors(reader.in_features, seed)).to(device)
        _set(reader.weight, online.inverse_transpose(reader.weight.double()))
        reader.input_transform = online.to(dtype=reader.weight.dtype).requires_grad_(False)
    attn.qk_transform = (
        KroneckerTransform(*kronecker_factors(head_dim))
        .to(device=device, dtype=attn.o_proj.weight.dtype)
        .requires_grad_(False)
    )
