"""Save and load the quantized model (QuantLinear representation) as a Hugging Face directory.

Our layout (`save_quantized`): `save_pretrained`'s config.json + safetensors, whose state dict holds
each QuantLinear's latent `weight`, `weight_scale` and `weight_zero_point`, plus `QUANT_CONFIG`
(JSON: the QuantSpec, the names of the quantized modules and, after QuaRot / FlatQuant, where the
online transforms and learned activation clips sit: pipeline.quant.online.describe) and the tokenizer. Nothing is parsed
out of a path; the JSON is the record.

`load_quantized(path)` also reads a compressed-tensors checkpoint (our `export` output, or any
integer group/channel weight-only one): stock transformers decompresses it and the decompressed
modules become QuantLinears whose latent weights are the dequantized weights.

`path` may be a stage directory (its `model/` is used) or a model directory (pipeline.quant.formats.layout, which
owns the file names, resolves it and tells the kinds apart). Loading follows
pipeline.models: trust_remote_code as given (off by default), weights from safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.quant.formats.layout import (
    EXPORT_KEY,
    FORMAT,
    FORMAT_VERSION,
    QUANT_CONFIG,
    TRANSFORMS_FILE,
    compressed_tensors_config,
    is_quantized,
    locate,
    model_dir,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QUANT_CONFIG",
    "is_quantized",
    "load_quantized",
    "model_dir",
    "read_quant_spec",
    "save_quantized",
    "saved_dtype",
]


def read_quant_spec(path: str | Path):
    """The QuantSpec of a quantized model directory (ours or compressed-tensors)."""
    from pipeline.quant.formats.compressed import weight_spec_from_args
    from pipeline.quant.scheme import QuantSpec

    path = model_dir(path)
    if (path / QUANT_CONFIG).exists():
        record = json.loads((path / QUANT_CONFIG).read_text())
        if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path / QUANT_CONFIG}: unknown format {record.get('format')} v{record.get('version')}")
        return QuantSpec.model_validate(record["spec"])
    qconfig = compressed_tensors_config(path)
    if qconfig is None:
        raise ValueError(f"{path} holds no quantized model")
    config = json.loads((path / "config.json").read_text())
    if EXPORT_KEY in config:
        return QuantSpec.model_validate(config[EXPORT_KEY]["spec"])
    from compressed_tensors.quantization import QuantizationScheme

    schemes = [QuantizationScheme.model_validate(g) for g in qconfig["config_groups"].values()]
    if any(s.input_activations is not None for s in schemes) or qconfig.get("kv_cache_scheme") is not None:
        raise ValueError(f"{path}: activation / KV-cache quantized checkpoints are not supported yet")
    # several groups that differ only in group size: one scheme whose group size some layers lower (our export of
    # a model whose widths the group size does not all divide); each layer keeps its own when loaded
    per_group = [weight_spec_from_args(s.weights) for s in schemes]
    weights = max(per_group, key=lambda w: w.group_size or 0)
    if any(w.model_copy(update={"group_size": weights.group_size}) != weights for w in per_group) or (
        len({w.group_size is None for w in per_group}) > 1
    ):
        raise ValueError(
            f"{path}: quantization config groups differ in more than their group size; one weight scheme is supported"
        )
    targets = tuple(dict.fromkeys(t for s in schemes for t in s.targets))
    return QuantSpec(weights=weights, targets=targets, ignore=tuple(qconfig.get("ignore") or ()))


def save_quantized(model: nn.Module, tokenizer, path: str | Path, spec) -> Path:
    """Write `model` (with QuantLinears), its QuantSpec and tokenizer to `path` in our layout."""
    from pipeline.quant.apply import lowered_group_sizes, quant_linears

    path = Path(path)
    names = [name for name, _ in quant_linears(model)]
    if not names:
        raise ValueError("the model has no QuantLinear: nothing quantized to save")
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    from pipeline.quant.online import describe

    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "modules": names,
        "lowered_group_sizes": lowered_group_sizes(model, spec),
        "online": describe(model),
    }
    (path / QUANT_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    return path


def saved_dtype(model: nn.Module, dtype: str) -> torch.dtype:
    """The dtype a trained quantized model is saved in: float32 when it carries online transforms
    (QuaRot / FlatQuant: in bf16 the merged rotations lose their orthogonality and the online ones
    cannot be inverted), else the recipe's `dtype`, as its teacher."""
    from pipeline.quant.online import transforms

    return torch.float32 if transforms(model) else getattr(torch, dtype)


def load_quantized(
    path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The quantized model at `path` with its QuantLinears calibrated, in eval mode, on `device`."""
    folder = locate(path)
    if folder.kind == "quantized":
        model = _load_ours(folder.path, trust_remote_code)
    elif folder.kind == "exported":
        model = _load_compressed_tensors(folder.path, trust_remote_code)
    else:
        raise ValueError(f"{folder.path} holds no quantized model")
    if device is not None:
        model.to(device)
    return model.eval()


def _load_ours(path: Path, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_config
    from pipeline.quant.apply import prepare, quant_linears

    spec = read_quant_spec(path)
    record = json.loads((path / QUANT_CONFIG).read_text())
    config = load_config(path, trust_remote_code)
    # parameters on meta (filled by assign below), buffers such as RoPE's inv_freq built for real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    names = prepare(model, spec, record.get("lowered_group_sizes"))  # records from before the policy have none
    if names != record["modules"]:
        raise ValueError(f"{path}: the spec selects {len(names)} modules, the checkpoint has {len(record['modules'])}")
    if "online" in record:  # records written before online transforms existed have none
        from pipeline.quant.online import install

        install(model, record["online"])
    _assign_checked(model, _read_safetensors(path), path)
    for _, module in quant_linears(model):
        module.calibrated = True
    return model


def _read_safetensors(path: Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name not in skip:
            state.update(load_file(file))
    return state


def _assign_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load `state` into a meta-built model (assign), which must match it but for tied weights."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not _is_tied(model, key)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if len(missing) != len(result.missing_keys):
        model.tie_weights()


def _is_tied(model: nn.Module, key: str) -> bool:
    return model.config.get_text_config().tie_word_embeddings and key == "lm_head.weight"


def _load_compressed_tensors(path: Path, trust_remote_code: bool) -> nn.Module:
    if EXPORT_KEY in json.loads((path / "config.json").read_text()):
        return _load_w4a4kv4_export(path, trust_remote_code)
    from pipeline.loading import load_pretrained
    from pipeline.quant.apply import from_compressed_tensors

    # stock transformers + compressed-tensors load the packed modules; decompressing now (rather
    # than in the hook it registers for the first forward) leaves Linears that carry
    # quantization_scheme / weight_scale / weight_zero_point and the dequantized weight
    from compressed_tensors.offload import remove_dispatch

    model = load_pretrained(path, trust_remote_code, dtype="auto")
    model.hf_quantizer.compressor.decompress_model(model)
    # decompress_model hands every module to compressed-tensors' offloading, which keeps the tensors where they
    # are at load (CPU) and moves each module's inputs there on every forward: `model.to("cuda")` would leave
    # the unconverted modules (embeddings, norms, lm_head) computing on the CPU
    remove_dispatch(model)
    from_compressed_tensors(model)
    # from here on it is our representation: no compressed-tensors quantizer behind save_pretrained
    model.hf_quantizer = None
    del model.config.quantization_config
    return model


def _load_w4a4kv4_export(path: Path, trust_remote_code: bool) -> nn.Module:
    """Our W4A4KV4 export: the stock model type restored, QuantLinears from the unpacked int4 weights
    (compressed-tensors' own unpacking and dequantization), then the online transforms and clips."""
    from accelerate import init_empty_weights
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.quant.apply import prepare, quant_linears
    from pipeline.quant.online import install
    from pipeline.quant.formats.compressed import weight_quantization_args
    from pipeline.quant.scheme import QuantSpec

    raw = json.loads((path / "config.json").read_text())
    block = raw.pop(EXPORT_KEY)
    raw.pop("quantization_config")
    raw["model_type"] = block["base_model_type"]
    config = AutoConfig.for_model(**raw)  # a stock config class: for_model never runs custom code
    spec = QuantSpec.model_validate(block["spec"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    prepare(model, spec, block.get("lowered_group_sizes"))
    state = _read_safetensors(path, skip=(TRANSFORMS_FILE,))
    for name, module in quant_linears(model):
        local = {k[len(name) + 1 :]: state.pop(k) for k in list(state) if k.startswith(name + ".")}
        scheme = QuantizationScheme(targets=[name], weights=weight_quantization_args(module.weights))
        local = PackedQuantizationCompressor.decompress(local, scheme)
        local.pop("weight_shape", None)
        for key, tensor in local.items():
            state[f"{name}.{key}"] = tensor.to(torch.int8) if key == "weight_zero_point" else tensor
    _assign_checked(model, state, path)
    install(model, block["online"])
    transforms = load_file(path / TRANSFORMS_FILE)
    result = model.load_state_dict(transforms, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected transform tensors {result.unexpected_keys[:5]}")
    for _, module in quant_linears(model):
        module.calibrated = True
    return model
