"""The closed registry of stage types: a recipe's `type:` picks one of these modules, nothing else.

Each type is the module `stages/<type>.py` (contract: pipeline/engine/stage_api.py). The set is fixed here,
so a recipe can never import code by name; a type listed but not shipped yet is reported as not
available in this version.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_TYPES = ("sft", "traces", "ptq", "kd_qat", "gate", "rl", "export", "eval")


class StageTypeUnavailable(Exception):
    """A known stage type whose module is not part of this version."""


def stage_module(stage_type: str) -> ModuleType:
    """The module of `stage_type`; KeyError if the type is unknown, StageTypeUnavailable if not shipped."""
    if stage_type not in STAGE_TYPES:
        raise KeyError(stage_type)
    name = f"{__name__}.{stage_type}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the stage exists but one of its own imports is missing: a real error
            raise
        raise StageTypeUnavailable(f"stage type '{stage_type}' is not available in this version") from None
