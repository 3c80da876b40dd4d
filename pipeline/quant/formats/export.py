"""Export a QuantLinear model as a compressed-tensors `pack-quantized` checkpoint.

The packing is compressed-tensors' own (`ModelCompressor` with the pack-quantized compressor): the
latent weights are quantized with the model's scales and zero points to the same integer codes our
fake quantization uses, packed into int32 (`weight_packed`, 32 / num_bits codes per word), with
`weight_scale`, packed `weight_zero_point` (asymmetric only) and `weight_shape`, and the
`quantization_config` written into config.json. Stock transformers + compressed-tensors load the
result (`AutoModelForCausalLM.from_pretrained(DIR)`) and compute the same logits as our fake-quant
model; `pipeline.load_quantized(DIR)` reads it back into QuantLinears.

W4A4KV4 (activations / KV cache quantized, online transforms after QuaRot / FlatQuant): the same packed
int4 weights (already merged with their transforms), and in config.json's `quantization_config` the
per-token dynamic input activations (`input_activations`, strategy token) and the KV cache
(`kv_cache_scheme`, dynamic per token; per head in our loader, see the `reasoning_qat` block). What
compressed-tensors has no field for goes beside it: the online transforms and learned activation clips
as tensors in `transforms.safetensors`, their layout and the exact QuantSpec in config.json's
`reasoning_qat` block. Stock transformers would load the weights, drop the transforms and compute
something else without a word; so `model_type` is rewritten to `reasoning_qat` (stock
`AutoModelForCausalLM.from_pretrained` refuses an unknown model type with its own error, naming it) and a
README.md in the directory says how to load it: `pipeline.load_quantized(DIR)` or `reasoning-qat eval DIR`.

`--format gptq` (pipeline.quant.formats.gptq_format): the same integer codes of a weight-only model in the GPTQ v1
layout, which vLLM serves with its `gptq` method at 2/3/4/8 bits; what that layout cannot hold is refused.
Every exported file gets the mode the umask gives (safetensors alone writes 0600).
`export_checkpoint` is what `pipeline.api.export` and `reasoning-qat export` (pipeline/cli/export.py) run:

    reasoning-qat export artifacts/demo/ptq --scheme w3g128 --out ckpt/
    reasoning-qat export artifacts/demo/ptq --format gptq --out ckpt-gptq/  # vllm serve ... --quantization gptq
    reasoning-qat export artifacts/gpu/ptq_flatquant --scheme w4a4kv4 --out ckpt/
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from pipeline.engine.errors import InputError
from pipeline.quant.formats.layout import EXPORT_KEY, MODEL_TYPE, TRANSFORMS_FILE

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = ("pack-quantized", "gptq")
"""Checkpoint formats of `reasoning-qat export --format` and the export stage's `format`."""
LOADER = "pipeline.load_quantized(DIR) or `reasoning-qat eval DIR` (reasoning-qat, installed from its repository)"
"""What runs a W4A4KV4 export: written into its config.json and README."""
README = """# reasoning-qat {scheme} checkpoint

Weights: int4 packed (compressed-tensors `pack-quantized`), merged with the online transforms.
Activations: {activations}. KV cache: {kv_cache}.
Online transforms ({n_transforms} tensors in `transforms.safetensors`, layout in config.json `reasoning_qat`)
must run at inference: stock transformers cannot, so config.json's `model_type` is `{model_type}` and
`AutoModelForCausalLM.from_pretrained` refuses this directory.

Loader: reasoning-qat only (the project this checkpoint came from; it is not on PyPI, so install it from
its repository: `pip install .` in a checkout). vLLM, SGLang and stock transformers do not run it.

    import pipeline
    model = pipeline.load_quantized("THIS_DIR")      # fake-quantized model with its transforms

    reasoning-qat eval THIS_DIR --bench gsm8k         # or evaluate it from the command line
"""


def export_pack_quantized(model: nn.Module, tokenizer, spec, out_dir: str | Path) -> dict[str, float]:
    """Write `model` (QuantLinears, modified in place into compressed-tensors modules) to `out_dir`.

    Returns the checkpoint's size: bytes on disk, and bits per weight of the quantized Linears
    (packed codes + scales + zero points over their weight count) and of the whole model.
    """
    from compressed_tensors.compressors import ModelCompressor

    from pipeline.quant.apply import lowered_group_sizes, to_compressed_tensors
    from pipeline.quant.online import describe

    out_dir = Path(out_dir)
    online = describe(model)
    lowered = lowered_group_sizes(model, spec)
    transform_state = _strip_online(model, online)
    to_compressed_tensors(model, spec)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if spec.activations is not None or spec.kv_cache is not None or transform_state:
        _write_w4a4kv4(out_dir, spec, online, transform_state, lowered)
    return checkpoint_size(out_dir)


def _strip_online(model: nn.Module, online: dict) -> dict:
    """Take the online transforms and activation clips out of `model` (so that its state dict is a plain
    compressed-tensors one, norms under their stock names); returns their tensors, named as in our
    model's state dict."""
    state = {}
    for name in online["transforms"]:
        owner, _, attr = name.rpartition(".")
        for key, tensor in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().contiguous()
        if attr == "transform":
            model.set_submodule(owner, model.get_submodule(owner).norm)
        else:
            setattr(model.get_submodule(owner), attr, None)
    for name in online["activation_clip"]:
        state[f"{name}.activation_clip"] = model.get_submodule(name).activation_clip.detach().contiguous()
    return state


def _write_w4a4kv4(out_dir: Path, spec, online: dict, transform_state: dict, lowered: dict[str, int]) -> None:
    import json

    from compressed_tensors.quantization import QuantizationArgs
    from safetensors.torch import save_file

    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    qconfig = config["quantization_config"]
    if spec.activations is not None:
        a = spec.activations
        args = QuantizationArgs(num_bits=a.num_bits, type="int", symmetric=a.symmetric, strategy="token", dynamic=True)
        for group in qconfig["config_groups"].values():
            group["input_activations"] = args.model_dump(mode="json")
    if spec.kv_cache is not None:
        kv = spec.kv_cache
        qconfig["kv_cache_scheme"] = QuantizationArgs(
            num_bits=kv.num_bits, type="int", symmetric=kv.symmetric, strategy="token", dynamic=True
        ).model_dump(mode="json")
    config[EXPORT_KEY] = {
        "base_model_type": config["model_type"],
        "spec": spec.model_dump(mode="json"),
        "online": online,
        "lowered_group_sizes": lowered,
        "loader": LOADER,
        "note": "KV cache: one scale per token and head (group_size None = head_dim), after RoPE and after "
        "self_attn.qk_transform; activation clips and online transforms in transforms.safetensors",
    }
    config["model_type"] = MODEL_TYPE
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(transform_state, out_dir / TRANSFORMS_FILE, metadata={"format": "pt"})
    (out_dir / "README.md").write_text(
        README.format(
            scheme=_describe(spec),
            activations=f"{spec.activations.num_bits}-bit per token, dynamic" if spec.activations else "BF16",
            kv_cache=f"{spec.kv_cache.num_bits}-bit per token and head, dynamic" if spec.kv_cache else "BF16",
            n_transforms=len(transform_state),
            model_type=MODEL_TYPE,
        )
    )


def checkpoint_size(path: str | Path) -> dict[str, float]:
    """Bytes on disk and bits per weight, read from the safetensors headers of a checkpoint.

    bits_per_weight: the quantized Linears' tensors (packed codes, scales, zero points, shapes) over
    their weight count. bits_per_param: every tensor over every parameter (embeddings, norms and the
    BF16 lm_head included).
    """
    import json

    from safetensors import safe_open

    path = Path(path)
    qconfig = json.loads((path / "config.json").read_text()).get("quantization_config", {})
    gptq_bits = qconfig["bits"] if qconfig.get("quant_method") == "gptq" else None
    suffixes = GPTQ_SUFFIXES if gptq_bits else PACKED_SUFFIXES
    quant_bits = quant_weights = total_bits = total_params = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                shape = tensor.get_shape()
                bits = math.prod(shape) * _DTYPE_BITS[tensor.get_dtype()]
                total_bits += bits
                if key.rpartition(".")[2] in suffixes:
                    quant_bits += bits
                    if key.endswith("weight_shape"):
                        quant_weights += math.prod(f.get_tensor(key).tolist())
                    elif key.endswith("qweight"):  # [in * bits / 32, out] int32
                        quant_weights += shape[0] * 32 // gptq_bits * shape[1]
                else:
                    total_params += math.prod(shape)
    total_params += quant_weights
    return {
        "bytes_on_disk": float(sum(p.stat().st_size for p in path.iterdir() if p.is_file())),
        "safetensors_bytes": float(sum(p.stat().st_size for p in path.glob("*.safetensors"))),
        "bits_per_weight": quant_bits / quant_weights,
        "bits_per_param": total_bits / total_params,
        "quantized_weights": float(quant_weights),
    }


_DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "BF16": 16,
    "F16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
}


def resolve_scheme(scheme: str | None, model_spec):
    """The spec to export with: the model's own, after checking that `scheme` (a preset) names it."""
    from pipeline.quant.scheme import PRESETS, QuantSpec

    if scheme is None:
        return model_spec
    if scheme not in PRESETS:
        raise InputError("scheme", f"unknown scheme {scheme!r}; known: {', '.join(PRESETS)}")
    wanted = QuantSpec.model_validate(scheme)
    if _format(wanted) != _format(model_spec):
        raise InputError(
            "scheme", f"{scheme} ({_describe(wanted)}) does not match the model's scheme ({_describe(model_spec)})"
        )
    return model_spec


def _format(spec) -> tuple:
    """What a preset fixes: bits, groups and symmetry; clip ratios and the group-size policy are the model's own
    (they travel in the checkpoint's reasoning_qat block / per-layer config groups)."""

    def fields(section):
        return None if section is None else section.model_dump(exclude={"clip_ratio"})

    return spec.weights.model_dump(exclude={"group_size_policy"}), fields(spec.activations), fields(spec.kv_cache)


def _describe(spec) -> str:
    w = spec.weights
    text = f"w{w.num_bits} g{w.group_size or 'channel'} {'sym' if w.symmetric else 'asym'}"
    for name, section in (("a", spec.activations), ("kv", spec.kv_cache)):
        if section is not None:
            text += f", {name}{section.num_bits} {'sym' if section.symmetric else 'asym'}"
            if section.clip_ratio != 1:
                text += f" clip {section.clip_ratio:g}"
    return text


def export_checkpoint(
    source: Path, scheme: str | None, out: Path, trust_remote_code: bool = False, format: str = "pack-quantized"
) -> dict[str, float]:
    """Export the quantized model at `source` (a stage or model directory) to `out` in `scheme` (None:
    its own) and `format` (FORMATS); returns the sizes. A scheme that does not match the model raises
    InputError("scheme", ...), a model the format cannot hold InputError("format", ...), before writing."""
    from pipeline.models import load_tokenizer
    from pipeline.quant.formats.io import load_quantized, read_quant_spec

    if format not in FORMATS:
        raise InputError("format", f"unknown format {format!r}; known: {', '.join(FORMATS)}")
    spec = resolve_scheme(scheme, read_quant_spec(source))
    model = load_quantized(source, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if format == "gptq":
        from pipeline.quant.formats.gptq_format import export_gptq

        export_gptq(model, tokenizer, spec, out)
    else:
        export_pack_quantized(model, tokenizer, spec, out)
    give_umask_modes(out)
    return checkpoint_size(out)


def give_umask_modes(out_dir: Path) -> None:
    """Give every file under `out_dir` the mode a plain open() would (0666 less the umask): safetensors
    writes its files 0600, which leaves a checkpoint unreadable to the serving engine's user or a
    shared cache."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for file in Path(out_dir).rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def describe_size(size: dict[str, float]) -> str:
    return (
        f"{size['bytes_on_disk'] / 2**20:.2f} MiB, {size['bits_per_weight']:.3f} bits per quantized weight, "
        f"{size['bits_per_param']:.3f} bits per parameter"
    )
