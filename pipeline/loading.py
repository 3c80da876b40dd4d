"""Closed loading: every transformers load of a config or model goes through here (pipeline.models and
pipeline.quant.formats.io both load with it).

Every call gets the caller's `trust_remote_code` (False unless the recipe sets it); a model whose loading would run
its own Python (config.json `auto_map`) is refused as CustomCodeRefused (bad input, exit 2); weights are read
with `use_safetensors=True` (a pickled pytorch_model.bin is never unpickled); importing this module makes
transformers refuse, rather than ask on stdin, wherever a call leaves trust_remote_code unset.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import transformers.dynamic_module_utils
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.engine.errors import InputError
from pipeline.quant.formats.layout import model_dir

# transformers asks "Do you wish to run the custom code? [y/N]" on stdin when a call leaves
# trust_remote_code unset and the model has custom code. At 0 it refuses instead (the switch its own CI
# uses). Our calls all pass the recipe's value; this covers calls inside transformers that do not
# forward it, so that stdin is never read and custom code runs only when the recipe allows it.
transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0


class CustomCodeRefused(InputError):
    """Loading the model at `path` would run Python from it (config.json `auto_map`), and trust_remote_code is off."""

    def __init__(self, path: str | Path, where: str = "model.path", allow: str = "set model.trust_remote_code: true"):
        super().__init__(where, f"{path} needs custom code (auto_map); {allow} to allow it")
        self.path = path


@contextmanager
def _refusing_custom_code(path: str | Path) -> Iterator[None]:
    """transformers' refusal of untrusted custom code as CustomCodeRefused: a plain ValueError, told
    apart by the `trust_remote_code=True` every one of its refusal messages asks for."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code=True" not in str(e):
            raise
        raise CustomCodeRefused(path) from None


def load_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of the model at `path` (stage directory, model directory or hub id); no weights read."""
    where = model_dir(path)
    with _refusing_custom_code(where):
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)


def load_pretrained(path: str | Path, trust_remote_code: bool = False, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` as every model load here calls it: safetensors only (never
    the pickle of a pytorch_model.bin), trust_remote_code as given. `kwargs` go to from_pretrained."""
    where = model_dir(path)
    with _refusing_custom_code(where):
        return AutoModelForCausalLM.from_pretrained(
            where, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
