"""The contract between the runner and a stage module.

A stage type is one module `stages/<type>.py` that defines:

    CODE_VERSION: int             # bump by hand when the stage's outputs would change
    USES: tuple[str, ...]         # recipe-wide sections folded into the fingerprint, from
                                  # ("seed", "model", "quant", "data")
    OUTPUT: str                   # what the stage writes, one of the output kinds below
    class Config(StageConfig):    # strict schema; `type: Literal["<type>"]`
        ...                       # fields typed `StageRef` name another stage (or "model");
                                  # `stage_ref(QUANTIZED)` names one whose OUTPUT is a quantized model;
                                  # or a VariantConfig: one schema per value of a key (ptq: per `method`)
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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, TypeAdapter
from pydantic.fields import FieldInfo
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

    @classmethod
    def result_fields(cls) -> dict[str, FieldInfo]:
        """The fields `result_config` reads a dump of this config by: its own. A config whose dump holds more keys
        than it has (ptq's per-method configs dump the flat key set) returns those keys' fields."""
        return cls.model_fields


# -- stage configs with one schema per value of a key ------------------------------------------------


@dataclass(frozen=True)
class Variants:
    """The variants of a VariantConfig base: `key` picks one (`default` when absent)."""

    key: str
    default: str
    members: dict[str, type["VariantConfig"]]
    """Value of `key` -> its schema (a subclass of the base)."""
    order: tuple[str, ...]
    """Every key of every variant, in the order the documentation (and a flat dump) lists them."""
    adapter: TypeAdapter

    def fields(self, base: type["VariantConfig"]) -> dict[str, FieldInfo]:
        """Key -> field, for every key of every variant in `order`; a key of the base (`key` itself: a Literal of
        every value) as the base declares it, another as the first variant that has it does."""
        found = dict(base.model_fields)
        for member in self.members.values():
            for name, info in member.model_fields.items():
                found.setdefault(name, info)
        return {name: found[name] for name in self.order}

    def applies_to(self, name: str) -> list[str]:
        """The values of `key` whose schema has the key `name`."""
        return [tag for tag, member in self.members.items() if name in member.model_fields]


_VARIANTS: dict[type, Variants] = {}


class _BuildsVariant(type(BaseModel)):
    """`Base(**keys)` of a VariantConfig base with registered variants builds the variant its key names."""

    def __call__(cls, /, **data):
        if cls in _VARIANTS:
            return cls.model_validate(data)
        return super().__call__(**data)


class VariantConfig(StageConfig, metaclass=_BuildsVariant):
    """Base of a stage `Config` with one schema per value of one key (ptq: one per `method`).

    The stage module's `Config` subclasses this and holds the keys every variant shares; each variant subclasses
    `Config`, adds its own keys and narrows the key to one `Literal` value. `register_variants` makes `Config` a
    pydantic discriminated union on that key: `Config(...)` and `Config.model_validate(...)` return the chosen
    variant's instance, which refuses (extra="forbid") a key that only other variants have. `Config` itself stays
    a StageConfig subclass with the stage's `type` Literal (the module contract); `config_classes` lists the variants.
    """

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        variants = _VARIANTS.get(cls)
        if variants is None:
            return super().model_validate(obj, **kwargs)
        return variants.adapter.validate_python(obj, **kwargs)


def register_variants(
    base: type[VariantConfig], key: str, default: str, members: tuple[type[VariantConfig], ...], order: tuple[str, ...]
) -> Variants:
    """Make `base` the discriminated union of `members` on `key` (see VariantConfig); `order`: every key, listed."""
    tags = {typing.get_args(m.model_fields[key].annotation)[0]: m for m in members}
    assert all(issubclass(m, base) for m in members) and len(tags) == len(members)
    every = {name for m in members for name in m.model_fields}
    assert set(order) == every and len(order) == len(every), f"order must list every key once: {sorted(every)}"

    def tag(value: Any) -> Any:
        return value.get(key, default) if isinstance(value, dict) else getattr(value, key, None)

    union = Union[tuple(Annotated[m, Tag(t)] for t, m in tags.items())]
    adapter = TypeAdapter(Annotated[union, Discriminator(tag)], config=ConfigDict(title=base.__qualname__))
    _VARIANTS[base] = Variants(key, default, tags, order, adapter)
    return _VARIANTS[base]


def config_variants(config_cls: type) -> Variants | None:
    """The variants of a stage's `Config` (VariantConfig), or None for a Config of one schema."""
    return _VARIANTS.get(config_cls)


def config_classes(config_cls: type[StageConfig]) -> tuple[type[StageConfig], ...]:
    """The schemas a stage's `Config` validates into: its variants, or itself."""
    variants = _VARIANTS.get(config_cls)
    return tuple(variants.members.values()) if variants else (config_cls,)


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
    depend on it: each field marked OPERATIONAL at its default, each ADDED_KEY at its default left out. The
    fingerprint hashes this, the runner
    compares recorded configs through it, and training loops sign their checkpoints with it.

    Held at the default rather than dropped, so that a config that never changed such a field hashes exactly
    as it did before the field was marked: the artifacts on disk, their checkpoints and the checkpoints'
    signatures stay valid. (Artifacts recorded with another value stay valid too: the runner judges a manifest
    by its parts, not by its fingerprint alone.) Fields of a stage's own Config, inherited ones included (its
    `result_fields`: ptq's per-method configs name the flat key set they dump);
    nested models are not searched.
    """
    out = dict(data)
    fields = config_cls.result_fields() if issubclass(config_cls, StageConfig) else config_cls.model_fields
    for name, info in fields.items():
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
        metadata = [
            *info.metadata,
            *(m for arg in getattr(info.annotation, "__args__", ()) or () for m in getattr(arg, "__metadata__", ())),
        ]
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
    return [
        (f, "the recipe's model is built untrained from model.arch; name the stage that trains it")
        for f in fields
        if getattr(config, f) == BASE_MODEL_REF
    ]
