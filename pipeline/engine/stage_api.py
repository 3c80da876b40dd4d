"""The contract between the runner and a stage module.

A stage type is one module `stages/<type>.py` that defines:

    CODE_VERSION: int             # bump by hand when the stage's outputs would change
    USES: tuple[str, ...]         # recipe-wide sections folded into the fingerprint, from
                                  # ("seed", "model", "quant", "data")
    OUTPUT: str                   # what the stage writes, one of the output kinds below
    class Config(StageConfig):    # strict schema; `type: Literal["<type>"]`
        ...                       # fields typed `StageRef` name another stage (or "model");
                                  # `stage_ref(QUANTIZED)` names one whose OUTPUT is a quantized model
    def check(config, recipe) -> list[tuple[str, str]]   # optional: semantic checks that need
                                  # more than the schema (shapes, paths); (key path, message) pairs,
                                  # key path relative to the stage, e.g. ("group_size", "must divide 1024")
    def run(ctx: StageContext) -> dict[str, float]       # does the work, returns metrics
    HEADLINE: str | tuple | None  # optional: the metric shown in the run summary (the first one present)
    PASSTHROUGH: str              # optional: for a stage that can be skipped by its gate, the
                                  # StageRef field whose artifact downstream stages read instead
    def output(config, input_kinds) -> str   # optional: what the stage writes when that depends
                                  # on its inputs (field -> output kind of each); OUTPUT is then the usual

A config field that cannot change what the stage writes (how often it saves a checkpoint) is marked
`Field(..., json_schema_extra=OPERATIONAL)`: changing it neither makes the stage stale nor throws away
its checkpoints (see `result_config`).

Stages meet only through artifacts: `ctx.inputs[field]` is the *directory* of the referenced stage
(or of the recipe's base model for the reference "model"); a stage never imports another stage.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_jsonable_python

if TYPE_CHECKING:
    from pipeline.engine.checkpoint import Checkpointer


# Output kinds: what a stage writes (its module's OUTPUT), and what a reference field reads. The
# recipe is checked against them before anything runs (`export.model` naming an eval stage is bad input).
MODEL = "a full-precision model"
QUANTIZED = "a quantized model"
TRACES = "traces"
VERDICT = "a gate verdict"
SAMPLES = "evaluation samples"
ANY_MODEL = (MODEL, QUANTIZED)


class _StageRefMarker:
    """Annotation marker: this field holds the name of another stage in the recipe, whose output is
    one of `accepts` (empty: any)."""

    def __init__(self, accepts: tuple[str, ...] = ()):
        self.accepts = accepts


def stage_ref(*accepts: str) -> Any:
    """The type of a field naming another stage (or "model") whose output is one of `accepts`."""
    return Annotated[str, _StageRefMarker(accepts)]


StageRef = stage_ref()
"""A reference to another stage by name, or "model" for the recipe's base model; any output."""

BASE_MODEL_REF = "model"

SEED_MAX = 2**32 - 1
"""Largest seed: numpy's generators (seeded by transformers and the runner) take 32-bit seeds."""


class StageConfig(BaseModel):
    """Base of every stage's config: extra keys are errors, defaults live in the schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    """The stage type: picks this schema."""
    when: StageRef | None = None
    """Name of a `gate` stage; this stage is skipped (state `skipped`) when that gate fails."""


OPERATIONAL = {"operational": True}
"""`json_schema_extra` of a config field that cannot change a stage's outputs (when checkpoints are saved).
Only what a run's trajectory and files do not depend on qualifies: batch sizes of decoding, gradient
accumulation, gradient checkpointing and the like change float rounding (or RNG draws) and are not operational;
held-out evaluation (kd_qat `eval_*`) writes metrics, so it is not either."""


ADDED_KEY = {"omit_at_default": True}
"""`json_schema_extra` of a field added to a stage type after artifacts of it existed, whose default does what the
stage did before the field was there: at its default it is left out of `result_config`, so those artifacts stay
up to date (a new key changes no result until someone sets it)."""


def result_config(config_cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a JSON dump of a `config_cls`, fresh or recorded in a manifest) as far as the stage's results
    depend on it: each field marked OPERATIONAL at its default, each ADDED_KEY at its default left out. The fingerprint hashes this, the runner
    compares recorded configs through it, and training loops sign their checkpoints with it.

    Held at the default rather than dropped, so that a config that never changed such a field hashes exactly
    as it did before the field was marked: the artifacts on disk, their checkpoints and the checkpoints'
    signatures stay valid. (Artifacts recorded with another value stay valid too: the runner judges a manifest
    by its parts, not by its fingerprint alone.) Fields of a stage's own Config, inherited ones included;
    nested models are not searched.
    """
    out = dict(data)
    for name, info in config_cls.model_fields.items():
        extra = info.json_schema_extra
        if name not in out or not isinstance(extra, dict):
            continue
        default = to_jsonable_python(info.get_default(call_default_factory=True))
        if extra.get("operational"):
            out[name] = default
        if extra.get("omit_at_default") and out[name] == default:  # both: an operational key added later
            del out[name]
    return out


def stage_ref_fields(config_cls: type[StageConfig]) -> list[str]:
    """Names of the fields of `config_cls` typed `StageRef` or `StageRef | None`."""
    return list(stage_ref_accepts(config_cls))


def stage_ref_accepts(config_cls: type[StageConfig]) -> dict[str, tuple[str, ...]]:
    """Field name -> the output kinds it accepts (empty: any), for each StageRef field of `config_cls`."""
    fields = {}
    for name, info in config_cls.model_fields.items():
        # `StageRef | None` keeps the marker on the inner Annotated type
        metadata = [*info.metadata, *(m for arg in getattr(info.annotation, "__args__", ()) or ()
                                      for m in getattr(arg, "__metadata__", ()))]
        marker = next((m for m in metadata if isinstance(m, _StageRefMarker)), None)
        if marker is not None:
            fields[name] = marker.accepts
    return fields


@dataclass
class StageContext:
    """What the runner hands to `run`."""

    name: str
    config: StageConfig
    recipe: Any
    """The validated recipe (a pipeline.engine.recipe.Recipe; not imported here: recipe.py builds on this contract,
    so the dependency runs one way)."""
    out_dir: Path
    """Temporary directory to write every output into; the runner renames it into place when `run`
    returns and writes the manifest (with each file's sha256) last."""
    inputs: dict[str, Path]
    """Field name of each StageRef -> directory of the referenced artifact. A reference to a stage its
    gate skipped resolves to what that stage would have read (its module's PASSTHROUGH field). For
    "model": `Path(recipe.model.path)` (a local directory or a hub id); absent when the model is built
    from `model.arch`. `when` is not an input."""
    input_manifests: dict[str, dict[str, Any]]
    """Field name -> manifest of the referenced stage ({} for the base model)."""
    checkpointer: "Checkpointer"
    """Mid-stage checkpoints that survive a killed run (see pipeline.engine.checkpoint)."""
    log: logging.Logger
    """Goes to the console and to `<root>/<recipe>/run.log`. Progress bars: `pipeline.engine.progress`."""


def untrained_base_model(config: StageConfig, recipe, *fields: str) -> list[tuple[str, str]]:
    """Errors for `fields` that read the base model ("model") when the recipe builds it untrained
    from `model.arch` (only an `sft` stage makes it worth running)."""
    if recipe.model.path is not None:
        return []
    return [(f, "the recipe's model is built untrained from model.arch; name the stage that trains it")
            for f in fields if getattr(config, f) == BASE_MODEL_REF]

