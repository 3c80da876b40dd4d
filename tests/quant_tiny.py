"""Tiny Qwen3 models and a byte-level tokenizer for the quantization tests (CPU, seconds).

Hidden width 256 so that groups of 128 (and 32, 64) divide every Linear; random weights, fixed seed.
`FAMILIES`: one tiny model of each architecture family users bring, shaped like the real ones where it
matters to quantization (biases, q/k norms, head_dim, tied embeddings, widths 128 does not divide, Hadamard
sizes that are not powers of 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    # sorted: alphabet() comes from a hash set, in an order that changes from process to process
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides) -> Qwen3Config:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config(vocab_size, **overrides)).eval()


FAMILIES = {
    # Qwen3: q/k norms, head_dim 128, attention width 4 × 128 = 512 ≠ hidden; 384 = 32 · 12 (a Paley block)
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    ),
    # Qwen2 = DeepSeek-R1-Distill-Qwen: q/k/v biases, no q/k norms; head_dim 32; 96 = 8 · 12 and 192 = 16 · 12,
    # widths 128 does not divide (groups of 96)
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(hidden_size=96, intermediate_size=192, num_attention_heads=3, num_key_value_heads=1),
    ),
    # Llama = SmolLM2 / R1-Distill-Llama: no biases, no q/k norms, head_dim 64, tied embeddings; 192 and
    # 320 = 16 · 20 (groups of 96 and 64)
    "llama": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            hidden_size=192,
            intermediate_size=320,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=64,
            tie_word_embeddings=True,
        ),
    ),
}


def family_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny random model of `family` (a FAMILIES key), two layers, float32, eval mode."""
    model_cls, config_cls, shape = FAMILIES[family]
    kwargs = dict(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
    kwargs.update(shape)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).eval()


def save_tiny(path: Path, seed: int = 0, dtype=torch.float32, family: str | None = None, **overrides) -> Path:
    """A tiny model + tokenizer saved as a Hugging Face directory, as a teacher stage leaves it: the Qwen3 of
    `tiny_model`, or a FAMILIES model."""
    tok = tiny_tokenizer()
    if family is None:
        model = tiny_model(len(tok), seed, **overrides).to(dtype)
    else:
        model = family_model(family, len(tok), seed, **overrides).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def moves_whole(model) -> bool:
    """Every tensor the forward uses follows `model.to(device)` (what `eval` on CUDA needs of a loaded model): on
    the meta device a forward on meta inputs gives meta logits, where a tensor left out of the parameters and
    buffers, or a module that sends its inputs back to where it was loaded (compressed-tensors' offloading did),
    fails the forward on mixed devices. Leaves the model on meta."""
    model.to("meta")
    with torch.no_grad():
        return model(torch.zeros(1, 5, dtype=torch.long, device="meta")).logits.device.type == "meta"


def write_traces(path: Path, n: int = 8) -> Path:
    """A traces artifact (`traces.jsonl`) of n short arithmetic chains."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    with open(path / "traces.jsonl", "w") as f:
        for i in range(n):
            a, b = 3 + i, 7 * i + 2
            completion = (
                f"<think>{a} plus {b} is {a + b}. Then times 2 gives {2 * (a + b)}.</think> \\boxed{{{2 * (a + b)}}}"
            )
            row = {
                "id": str(i),
                "question": f"What is ({a} + {b}) * 2?",
                "answer": str(2 * (a + b)),
                "completion": completion,
                "correct": True,
                "num_tokens": len(completion),
                "sample": 0,
                "truncated": False,
            }
            f.write(json.dumps(row) + "\n")
    return path


def planted_outliers_model() -> Qwen3ForCausalLM:
    """A tiny model (vocab 300, MLP 384) with outlier channels in both norms' outputs of every layer (30x the
    others), as real LLMs have: the case SmoothQuant's per-channel scaling, QuaRot's rotation and FlatQuant's
    learned smoothing are for. Not also in the down_proj input (up_proj rows x40, as test_flatquant once
    planted): those make the layer MSE a few tokens' (5 of 144 carried half of it), and which tokens changes
    with the rounding of the CPU's kernels (a 1e-6 relative change of the weights moved QuaRot's layer-0 MSE
    from 0.031 to 0.045), so no ordering of the methods held on every machine."""
    model = tiny_model(300, intermediate_size=384)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 77]] = 30.0
            layer.post_attention_layernorm.weight[[5, 150]] = 30.0
    return model


def planted_w4a4kv4() -> Qwen3ForCausalLM:
    """`planted_outliers_model`, prepared for W4A4KV4 fake quantization (not calibrated)."""
    from pipeline.quant.apply import prepare
    from pipeline.quant.scheme import QuantSpec

    model = planted_outliers_model()
    prepare(model, QuantSpec.model_validate("w4a4kv4"))
    return model


def planted_rtn_and_quarot() -> tuple[Qwen3ForCausalLM, Qwen3ForCausalLM]:
    """The baselines the outlier tests compare methods with: W4A4KV4 of `planted_outliers_model` by RTN
    and by QuaRot (rotated), both calibrated."""
    from pipeline.quant.apply import calibrate
    from pipeline.quant.methods import quarot

    rtn = planted_w4a4kv4()
    calibrate(rtn)
    rot = planted_w4a4kv4()
    quarot.rotate(rot)
    calibrate(rot)
    return rtn, rot


def generate_and_full_forward(model, x: torch.Tensor, max_new_tokens: int):
    """(greedy `model.generate` output with its per-step logits, logits of one full forward over its
    sequences), after asserting each decoding step's logits equal the full forward's at that position."""
    with torch.no_grad():
        out = model.generate(
            x,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        full = model(out.sequences).logits
    last_prompt = x.shape[1] - 1
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, last_prompt + step], atol=1e-4, rtol=0)
    return out, full


def one_thread():
    """Context for CPU-heavy tests: one intra-op thread (the test machines share 2 cores; more threads
    than cores make llmcompressor's per-column GPTQ loop ~20x slower)."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()
