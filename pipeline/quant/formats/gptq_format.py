"""Export a weight-only QuantLinear model as a GPTQ ("v1") checkpoint that vLLM's `gptq` method runs.

Why: vLLM's and SGLang's compressed-tensors W*A16 kernels take 4 and 8 bits only, so our W3G128
pack-quantized export runs nowhere faster than transformers' bf16 decompression. vLLM's plain GPTQ
method (`GPTQLinearMethod`, vllm/model_executor/layers/quantization/gptq.py) takes 2/3/4/8 bits and
runs the exllama `gptq_gemm` CUDA kernels (csrc/quantization/gptq/q_gemm.cu) on them.

The format followed (vLLM gptq.py `create_weights`, q_gemm.cu, AutoGPTQ's `QuantLinear.pack`), per Linear
with W [out, in], group size g (-1: one group per row), n_groups = in / g:

    qweight [in * bits / 32, out] int32   unsigned codes u in [0, 2^bits - 1], packed along `in`
    qzeros  [n_groups, out * bits / 32]   int32, zero points stored minus one ("v1"), packed along `out`
    scales  [n_groups, out] float16
    g_idx   [in] int32                    group of each input column (i // g; no act-order)
    weight  = (u - (qzeros + 1)) * scale  (q_gemm.cu: `zeros[i] + 1` before dequantizing)

Packing: consecutive values fill each int32 from bit 0 upwards, little-endian across words, so at 3
bits 32 values take 3 words and values 10 and 21 straddle two of them (AutoGPTQ's 3-bit pack; vLLM's
`reconstruct_exllama_3bit_kernel` reads it back). At 2/4/8 bits this is the plain `32 / bits` per word.

Our codes are signed, q in [-2^(b-1), 2^(b-1) - 1] with int8 zero point z (pipeline.quant.fake), so
u = q + 2^(b-1) and the GPTQ zero point is z + 2^(b-1) (symmetric: z = 0, i.e. 2^(b-1), GPTQ's own);
(u - zp) = (q - z) and the dequantized weights are ours, codes bit for bit. Scales become float16:
exact for a bf16 model whose scales lie in float16's normal range [2^-14, 65504] (bf16's 8 significant
bits fit in float16's 11), else within half a float16 ulp (relative 2^-11; absolute 2^-25 below 2^-14).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.engine.errors import InputError

GPTQ_BITS = (2, 3, 4, 8)
"""Bit widths of vLLM's GPTQConfig (anything else raises there)."""
KERNEL_K_STEP = 32
"""gptq_gemm walks the input dimension 32 rows at a time and changes group only on those steps
(q_gemm.cu: `k += 32`, `if (k == nextgroup)`), so a group must span a multiple of 32 columns."""


def gptq_refusal(model: nn.Module, spec, lowered: dict[str, int]) -> str | None:
    """Why `model` cannot be written as a GPTQ checkpoint vLLM runs (None: it can)."""
    from pipeline.quant.apply import quant_linears
    from pipeline.quant.online import describe

    w = spec.weights
    if spec.activations is not None or spec.kv_cache is not None or any(describe(model).values()):
        return (
            "GPTQ checkpoints hold weight-only models; this one quantizes activations / the KV cache or has online "
            "transforms (W4A4KV4)"
        )
    if w.num_bits not in GPTQ_BITS:
        return f"GPTQ takes {'/'.join(map(str, GPTQ_BITS))}-bit weights, the model has {w.num_bits}"
    if w.group_size is not None and w.group_size % KERNEL_K_STEP:
        return f"vLLM's gptq_gemm takes group sizes that are multiples of {KERNEL_K_STEP}, the model has {w.group_size}"
    if lowered:
        return (
            f"GPTQ has one group size per checkpoint; {len(lowered)} layers use lowered ones "
            f"(e.g. {next(iter(lowered))}: {next(iter(lowered.values()))})"
        )
    block = _block_values(w.num_bits)
    for name, module in quant_linears(model):
        if module.in_features % block or module.out_features % block:
            widths = f"{module.in_features} x {module.out_features}"
            return f"{name}: widths {widths} are not multiples of {block} (GPTQ's packing)"
    unquantized = [
        name for name, m in model.named_modules() if type(m) is nn.Linear and m is not model.get_output_embeddings()
    ]
    if unquantized:
        listed = ", ".join(unquantized[:3])
        return f"vLLM's GPTQ loader expects every Linear but lm_head quantized; not quantized: {listed}"
    return None


def gptq_tensors(module, bits: int) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales and g_idx of one QuantLinear, from its own codes and zero points.
    Raises ValueError when a zero point is 0 in GPTQ terms: v1 stores it minus one and cannot."""
    from pipeline.quant import fake

    w = module.weights
    offset = 2 ** (bits - 1)
    codes = (
        fake.quantize(
            module.weight.detach(),
            module.weight_scale.detach(),
            module.weight_zero_point,
            bits,
            w.group_size,
            dtype=torch.int64,
        )
        + offset
    )
    zeros = (
        (
            torch.zeros_like(module.weight_scale, dtype=torch.int64)
            if module.weight_zero_point is None
            else module.weight_zero_point.to(torch.int64)
        )
        + offset
        - 1
    )
    if (zeros < 0).any():
        raise ValueError(
            f"{int((zeros < 0).sum())} groups have the zero point 0, which GPTQ v1 stores as -1 and cannot represent"
        )
    group_size = w.group_size or module.in_features
    return {
        "qweight": pack_bits(codes, bits).t().contiguous(),
        "qzeros": pack_bits(zeros.t(), bits).contiguous(),
        "scales": module.weight_scale.detach().t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(module.in_features) // group_size).to(torch.int32),
    }


def _block_values(bits: int) -> int:
    """How many values fill a whole number of int32 words (32 at 3 bits, 8 at 4)."""
    return 32 // math.gcd(32, bits)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] unsigned values < 2^bits -> [..., n * bits / 32] int32, each value at bit offset
    (k * bits) of a little-endian stream of words (GPTQ's layout, see the module docstring)."""
    block = _block_values(bits)
    v = values.to(torch.int64).unflatten(-1, (-1, block))
    words = torch.zeros(*v.shape[:-1], block * bits // 32, dtype=torch.int64)
    for k in range(block):
        word, shift = divmod(k * bits, 32)
        words[..., word] |= (v[..., k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value's high bits start the next word
            words[..., word + 1] |= v[..., k] >> (32 - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)  # int32's two's complement
    return words.flatten(-2).to(torch.int32)


def export_gptq(model: nn.Module, tokenizer, spec, out_dir: str | Path) -> None:
    """Write `model` (weight-only QuantLinears) to `out_dir` as a GPTQ v1 checkpoint: model.safetensors,
    config.json with `quantization_config` (and quantize_config.json, which older loaders read), the
    generation config, the tokenizer and a README. Raises InputError("format", ...) before writing anything
    when GPTQ cannot hold the model."""
    from safetensors.torch import save_file

    from pipeline.quant.apply import lowered_group_sizes, quant_linears

    bits = spec.weights.num_bits
    refusal = gptq_refusal(model, spec, lowered_group_sizes(model, spec))
    if refusal is None:
        try:
            state = {
                f"{name}.{key}": tensor
                for name, module in quant_linears(model)
                for key, tensor in gptq_tensors(module, bits).items()
            }
        except ValueError as e:
            refusal = str(e)
    if refusal is not None:
        # the way out every refusal shares: the default format holds whatever this project quantizes
        raise InputError("format", f"gptq: {refusal}; export it in the pack-quantized format (the default)")
    quantized = {name for name, _ in quant_linears(model)}
    for key, tensor in _plain_state(model).items():
        owner, _, leaf = key.rpartition(".")
        if owner not in quantized or leaf == "bias":
            state[key] = tensor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    qconfig = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": spec.weights.group_size or -1,
        "sym": spec.weights.symmetric,
        "desc_act": False,
        "checkpoint_format": "gptq",
        "lm_head": False,
    }
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = "float16"  # gptq_gemm computes in float16; vLLM refuses bfloat16 for this method
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        GPTQ_README.format(
            bits=bits,
            group_size=spec.weights.group_size or "channel",
            sym="symmetric" if spec.weights.symmetric else "asymmetric",
        )
    )


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors refuses tensors that share memory): a tied
    lm_head is left to `tie_word_embeddings`, as save_pretrained does."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.detach().contiguous()
    return state


GPTQ_README = """# reasoning-qat W{bits} checkpoint, GPTQ format

Weights: {bits}-bit integer codes, groups of {group_size} input columns, {sym}, float16 scales, in the GPTQ
("v1") layout: `qweight`, `qzeros` (zero point minus one), `scales`, `g_idx`; no act-order. The codes are the
ones the reasoning-qat model was trained and evaluated with. Embeddings, norms and lm_head: unquantized.

Serve it with vLLM, whose `gptq` method runs it with the exllama `gptq_gemm` kernels (float16 activations):

    vllm serve THIS_DIR --quantization gptq --dtype float16

vLLM's faster GPTQ kernels (Marlin, BitBLAS) take 4 and 8 bits only, so a 3-bit checkpoint stays on
`gptq_gemm`. To evaluate it with the project instead (`pip install reasoning-qat`), export the same model
with `--format pack-quantized` and run `reasoning-qat eval DIR`.
"""
