"""Model loading and building: Hugging Face models, the testbed's Qwen3 (the recipe's `model` section is
pipeline.model_spec, the closed transformers calls pipeline.loading, what a folder holds pipeline.quant.formats.layout).

    model = build_model(Qwen3Arch(), build_tokenizer(), seed=0)   # the testbed teacher, untrained
    save_model(model, tokenizer, "out/model")                     # HF layout, safetensors only
    model = load_model("artifacts/demo/teacher")                  # stage dir, model dir or hub id
    tokenizer = load_tokenizer("artifacts/demo/teacher")

Models are plain transformers models (Qwen3ForCausalLM for the testbed), so generation, TRL,
accelerate and DeepSpeed take them as they are. Weights are read and written as safetensors only.

Loading is closed by default: every transformers call gets the recipe's `trust_remote_code` (False
unless the recipe sets it), a model whose loading would run its own Python (config.json `auto_map`)
is refused as CustomCodeRefused (bad input, exit 2), and models are read with `use_safetensors=True`
(a pickled pytorch_model.bin is never unpickled); importing this module makes transformers refuse,
rather than ask on stdin, wherever a call leaves trust_remote_code unset. `check_model_dir` checks a
user-given directory before anything is loaded: a model is there, its weights are safetensors, and,
inside a stage directory, its files still match the manifest's sha256s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pipeline.engine.errors import InputError
from pipeline.loading import CustomCodeRefused, _refusing_custom_code, load_config, load_pretrained
from pipeline.model_spec import Qwen3Arch
from pipeline.quant.formats.layout import model_dir

# -- building, loading, saving ------------------------------------------------------------------


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"  # whatever the checkpoint was saved in
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


PASS_TRUST_FLAG = "pass --trust-remote-code"
"""The way out of a custom-code refusal where trust_remote_code is an argument (CLI flag, API keyword)."""


def check_model_dir(
    path: str | Path,
    where: str,
    trust_remote_code: bool = False,
    verify_manifest: bool = True,
    allow: str | None = None,
) -> str:
    """The model directory behind a user-given `path` (recipe `model.path`, a CLI argument), checked
    before anything is loaded; each problem is InputError(where, ...), one line.

    A local path must be a model directory or a stage directory holding one, with config.json and
    safetensors weights; where it (or the stage directory around it) has a manifest.json, its files
    must match the manifest's sha256s (if `verify_manifest`); a config with custom code (`auto_map`)
    must be one transformers loads without running it, unless trust_remote_code is on (`allow`: the way out
    the refusal names, if not the recipe key). A path that does not exist is taken for a hub id and returned
    as it is.
    """
    local = Path(path).expanduser()
    if not local.exists():
        return str(path)
    if not local.is_dir():
        raise InputError(where, f"{path} is a file, not a model directory")
    inner = Path(model_dir(local))
    if verify_manifest:
        _check_manifests(inner, where)
    if not (inner / "config.json").is_file():
        raise InputError(where, f"{path} holds no model (no config.json in it or in its model/ folder)")
    _check_weights(inner, where)
    try:
        config = json.loads((inner / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(where, f"{inner / 'config.json'} is not valid JSON ({e})") from None
    if "auto_map" in config:  # transformers decides whether the code would run; it refuses it untrusted
        try:
            load_config(inner, trust_remote_code)
        except CustomCodeRefused:
            raise CustomCodeRefused(path, where, *([allow] if allow else [])) from None
    return str(inner)


def _check_weights(inner: Path, where: str) -> None:
    if any(inner.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in inner.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise InputError(
            where,
            f"{inner} has pickle weights only ({pickles[0]}); they are never loaded, save the model as safetensors",
        )
    raise InputError(where, f"{inner} has a config.json but no weights (*.safetensors)")


def _check_manifests(inner: Path, where: str) -> None:
    """The sha256s of the manifest.json in `inner` or in the stage directory around it (pipeline.engine.store)."""
    from pipeline.engine.store import MANIFEST, check_files, read_manifest

    for directory in (inner, inner.parent):
        manifest = read_manifest(directory)
        if manifest is None:
            continue
        problem = check_files(directory, manifest, deep=True)
        if problem is not None:
            raise InputError(
                where, f"{directory}: {problem} (checked against its {MANIFEST}); re-run the stage that wrote it"
            )


def build_model(arch: Qwen3Arch, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3 (GQA, q/k RMSNorm) of size `arch` over `tokenizer`'s vocabulary, fp32.

    Initialisation draws from a private RNG seeded with `seed`, so the global RNG is left as it was.
    """
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    # as Qwen3's generation_config: stop at end of turn or end of text, pad with <|endoftext|>
    eos = [tokenizer.eos_token_id] + (
        [tokenizer.pad_token_id] if tokenizer.pad_token_id != tokenizer.eos_token_id else []
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def is_quantized(path: str | Path) -> bool:
    """Whether `path` (stage or model directory) holds a quantized model: pipeline.quant.formats.io's answer (the
    one rule, pipeline.quant.formats.layout.is_quantized), looked up when called."""
    from pipeline.quant.formats.io import is_quantized as quantized

    return quantized(model_dir(path))


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM from a stage directory, a model directory or a hub id.

    A quantized checkpoint (as `pipeline.quant.formats.io.is_quantized` tells) is loaded by
    `pipeline.quant.formats.io.load_quantized`, which returns the model with its QuantLinear modules.
    dtype None keeps the dtype it was saved in.
    """
    where = str(model_dir(path))  # resolved here, once: io's functions find `where` is the model folder itself
    from pipeline.quant.formats.io import is_quantized as quantized, load_quantized

    if quantized(where):
        model = load_quantized(where, trust_remote_code=trust_remote_code)
        if dtype is not None:
            model = model.to(_torch_dtype(dtype))
    else:
        model = load_pretrained(where, trust_remote_code, dtype=_torch_dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model (stage directory, model directory or hub id)."""
    where = str(model_dir(path))
    with _refusing_custom_code(where):
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)


def load_for_decoding(
    path: str | Path, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a stage or model directory, the model in its saved dtype on this process's
    device: what a stage that decodes with it (eval, gate, traces) needs."""
    from accelerate import PartialState

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return load_model(path, device=PartialState().device, trust_remote_code=trust_remote_code), tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write model (safetensors), config, generation config and tokenizer to `out_dir`; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if any(out.glob("*.bin")) or not any(out.glob("*.safetensors")):
        raise RuntimeError(f"{out}: expected safetensors weights and no pickle files")
    return out
