"""Export a QuantLinear model as a compressed-tensors `pack-quantized` checkpoint.

The packing is compressed-tensors' own (`ModelCompressor` with the pack-quantized compressor): the
latent weights are quantized with the model's scales and zero points to the same integer codes our
fake quantization uses, packed into int32 (`weight_packed`, 32 / num_bits codes per word), with
`weight_scale`, packed `weight_zero_point` (asymmetric only) and `weight_shape`, and the
`quantization_config` written into config.json. Stock transformers + compressed-tensors load the
result (`AutoModelForCausalLM.from_pretrained(DIR)`) and compute the same logits as our fake-quant
model; `pipeline.load_quantized(DIR)` reads it back into QuantLinears.

    reasoning-qat export artifacts/demo/ptq --scheme w3g128 --out ckpt/
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from torch import nn

from pipeline.errors import InputError

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def export_pack_quantized(model: nn.Module, tokenizer, spec, out_dir: str | Path) -> dict[str, float]:
    """Write `model` (QuantLinears, modified in place into compressed-tensors modules) to `out_dir`.

    Returns the checkpoint's size: bytes on disk, and bits per weight of the quantized Linears
    (packed codes + scales + zero points over their weight count) and of the whole model.
    """
    from compressed_tensors.compressors import ModelCompressor

    from pipeline.quant.apply import to_compressed_tensors

    out_dir = Path(out_dir)
    to_compressed_tensors(model, spec)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return checkpoint_size(out_dir)


def checkpoint_size(path: str | Path) -> dict[str, float]:
    """Bytes on disk and bits per weight, read from the safetensors headers of a checkpoint.

    bits_per_weight: the quantized Linears' tensors (packed codes, scales, zero points, shapes) over
    their weight count. bits_per_param: every tensor over every parameter (embeddings, norms and the
    BF16 lm_head included).
    """
    from safetensors import safe_open

    path = Path(path)
    quant_bits = quant_weights = total_bits = total_params = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                bits = math.prod(tensor.get_shape()) * _DTYPE_BITS[tensor.get_dtype()]
                total_bits += bits
                if key.endswith(PACKED_SUFFIXES):
                    quant_bits += bits
                    if key.endswith("weight_shape"):
                        quant_weights += math.prod(f.get_tensor(key).tolist())
                else:
                    total_params += math.prod(tensor.get_shape())
    total_params += quant_weights
    return {
        "bytes_on_disk": float(sum(p.stat().st_size for p in path.iterdir() if p.is_file())),
        "safetensors_bytes": float(sum(p.stat().st_size for p in path.glob("*.safetensors"))),
        "bits_per_weight": quant_bits / quant_weights,
        "bits_per_param": total_bits / total_params,
        "quantized_weights": float(quant_weights),
    }


_DTYPE_BITS = {"F64": 64, "F32": 32, "BF16": 16, "F16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}


def resolve_scheme(scheme: str | None, model_spec):
    """The spec to export with: the model's own, after checking that `scheme` (a preset) names it."""
    from pipeline.quant.scheme import PRESETS, QuantSpec

    if scheme is None:
        return model_spec
    if scheme not in PRESETS:
        raise InputError("scheme", f"unknown scheme {scheme!r}; known: {', '.join(PRESETS)}")
    wanted = QuantSpec.model_validate(scheme)
    if (wanted.weights, wanted.activations, wanted.kv_cache) != (
        model_spec.weights, model_spec.activations, model_spec.kv_cache
    ):
        raise InputError(
            "scheme", f"{scheme} ({_describe(wanted)}) does not match the model's scheme ({_describe(model_spec)})"
        )
    return model_spec


def _describe(spec) -> str:
    w = spec.weights
    text = f"w{w.num_bits} g{w.group_size or 'channel'} {'sym' if w.symmetric else 'asym'}"
    if spec.activations is not None:
        text += f", a{spec.activations.num_bits}"
    if spec.kv_cache is not None:
        text += f", kv{spec.kv_cache.num_bits}"
    return text


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `reasoning-qat export`."""
    parser.add_argument("stage_dir", help="a quantized model: a stage directory (ptq, kd_qat, ...) or a model directory")
    parser.add_argument("--scheme", default=None, help="preset the model must be quantized with (default: the model's own)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--format", default="pack-quantized", choices=["pack-quantized"])


def cli_export(args: argparse.Namespace) -> int:
    """`reasoning-qat export`: returns 0; bad input raises InputError (exit 2), nothing written."""
    from transformers import AutoTokenizer

    from pipeline.quant.io import is_quantized, load_quantized, model_dir, read_quant_spec

    source, out = Path(args.stage_dir), Path(args.out)
    if not source.exists():
        raise InputError("stage_dir", f"{source} does not exist")
    if not is_quantized(source):
        raise InputError("stage_dir", f"{source} holds no quantized model (run a ptq stage first)")
    if out.exists() and any(out.iterdir()):
        raise InputError("--out", f"{out} exists and is not empty")
    spec = resolve_scheme(args.scheme, read_quant_spec(source))
    model = load_quantized(source)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(source))
    size = export_pack_quantized(model, tokenizer, spec, out)
    print(
        f"exported {source} -> {out}: {size['bytes_on_disk'] / 2**20:.2f} MiB, "
        f"{size['bits_per_weight']:.3f} bits per quantized weight, {size['bits_per_param']:.3f} bits per parameter"
    )
    return 0
