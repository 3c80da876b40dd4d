"""The stage reference, generated from the schemas: `reasoning-qat stages [TYPE]` and docs/stages.md.

Every key of each stage type's `Config` and of the recipe-wide sections (`model`, `quant`, `data`), nested
mappings included, with its type, bounds, default and doc: the attribute docstring under the key (the way
the schemas are written) or its `Field(description=...)`. docs/stages.md is `markdown()`; a test fails when
the file differs, so regenerate it after changing a schema:

    reasoning-qat stages --markdown > docs/stages.md
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

import stages as stage_registry
from pipeline.engine.recipe import SECTIONS
from pipeline.engine.stage_api import config_variants, stage_ref_accepts

UNDOCUMENTED = "(undocumented)"
HEADER = """# Stage reference

Generated from the stage schemas (`stages/*.py`, `pipeline/`): do not edit by hand; regenerate with
`reasoning-qat stages --markdown > docs/stages.md` (tests/test_reference.py fails when this file is out of date).
`reasoning-qat stages TYPE` prints one stage type with the recipe-wide sections it reads.

A recipe holds `name`, `seed` (an integer, default 0), the sections `model`, `quant` and `data` (at the end),
and `stages`: stage name -> `type` plus that type's keys. A key that names a stage also takes `model`,
the recipe's base model.
"""


def topics() -> tuple[str, ...]:
    """What `reasoning-qat stages TOPIC` accepts: the stage types, then the recipe-wide sections."""
    return (*stage_registry.STAGE_TYPES, *SECTIONS)


def summary(stage_type: str) -> str:
    """What a stage type does, in one line: the first line of its module's docstring."""
    first = (stage_registry.stage_module(stage_type).__doc__ or "").strip().splitlines()[0]
    text = first.removeprefix(f"Stage `{stage_type}`: ")
    return text[:1].upper() + text[1:]


def summaries() -> list[tuple[str, str]]:
    """(stage type, what it does), for every stage type."""
    return [(stage_type, summary(stage_type)) for stage_type in stage_registry.STAGE_TYPES]


def stage_section(stage_type: str) -> str:
    """The markdown section of one stage type: what it does, writes and reads, then every key."""
    module = stage_registry.stage_module(stage_type)
    output = getattr(module, "OUTPUT", "nothing")
    uses = ", ".join(f"`{s}`" for s in module.USES) or "none"
    lines = [
        f"## {stage_type}",
        "",
        summary(stage_type),
        "",
        f"Writes {output}. Recipe-wide sections it reads: {uses}.",
        "",
    ]
    return "\n".join(lines + config_key_lines(module.Config)) + "\n"


def section_section(key: str) -> str:
    """The markdown section of a recipe-wide section (`model`, `quant`, `data`)."""
    cls = SECTIONS[key]
    intro = " ".join((cls.__doc__ or "").split())
    if key == "quant":
        from pipeline.quant.scheme import PRESETS

        intro += " Presets: " + ", ".join(f"`{name}`" for name in PRESETS) + "."
    return "\n".join([f"## {key}", "", intro, "", *key_lines(cls, f"{key}.")]) + "\n"


def topic_text(topic: str) -> str:
    """`reasoning-qat stages TOPIC`: a stage type with the sections it reads, or one section."""
    if topic in SECTIONS:
        return section_section(topic)
    used = [s for s in stage_registry.stage_module(topic).USES if s in SECTIONS]
    return "\n".join([stage_section(topic), *(section_section(s) for s in used)])


def markdown() -> str:
    """docs/stages.md: the index, every stage type, then the recipe-wide sections."""
    index = ["| type | what it does |", "| --- | --- |", *(f"| [{t}](#{t}) | {s} |" for t, s in summaries())]
    parts = [
        HEADER,
        "\n".join(index) + "\n",
        *(stage_section(t) for t in stage_registry.STAGE_TYPES),
        "# Recipe-wide sections\n",
        *(section_section(k) for k in SECTIONS),
    ]
    return "\n".join(parts)


# -- keys ------------------------------------------------------------------------------------------


def config_key_lines(config_cls: type[BaseModel]) -> list[str]:
    """The keys of a stage type's `Config`; of one with a schema per value of a key (ptq's `method`), every
    variant's keys, each that not all variants have saying which it applies to (e.g. `only method flatquant`)."""
    variants = config_variants(config_cls)
    if variants is None:
        return key_lines(config_cls)
    docs: dict[str, str] = {}
    for member in variants.members.values():
        docs |= attribute_docs(member)
    notes = {}
    for name in variants.order:
        applies = variants.applies_to(name)
        if len(applies) < len(variants.members):
            notes[name] = f"; only {variants.key}{'s' if len(applies) > 1 else ''} {', '.join(applies)}"
    return key_lines(config_cls, fields=variants.fields(config_cls), docs=docs, notes=notes)


def key_lines(
    cls: type[BaseModel],
    prefix: str = "",
    fields: dict[str, FieldInfo] | None = None,
    docs: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
) -> list[str]:
    """One markdown list item per key of `cls` (or `fields`, with their `docs`), `prefix` before its name, `notes`
    after its default; nested models' keys follow theirs."""
    docs, refs = attribute_docs(cls) if docs is None else docs, stage_ref_accepts(cls)
    lines = []
    for name, info in (cls.model_fields if fields is None else fields).items():
        doc = info.description or docs.get(name) or UNDOCUMENTED
        kind = describe_type(info, refs.get(name))
        note = (notes or {}).get(name, "")
        lines.append(f"- `{prefix}{name}` ({kind}{_default(info)}{note}): {' '.join(doc.split())}")
        for nested in _models_in(info.annotation):
            lines += key_lines(nested, f"{prefix}{name}.")
    return lines


def attribute_docs(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> the string literal right under its annotation, in `cls` and its bases (nearest wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not issubclass(klass, BaseModel) or klass is BaseModel:
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (a class built at run time): Field descriptions only
            continue
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = after.value.value
    return docs


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def describe_type(info: FieldInfo, stage_ref: tuple[str, ...] | None = None) -> str:
    """`int, > 0`, `one of rtn, gptq`, `stage writing traces or null`, ... of a field; `stage_ref`: the output
    kinds it accepts when it names a stage (empty: any)."""
    bounds = [
        f"{sign} {getattr(m, attr)}" for m in info.metadata for kind, attr, sign in _BOUNDS if isinstance(m, kind)
    ]
    return ", ".join([_type_name(info.annotation, stage_ref), *bounds])


def _type_name(annotation: Any, stage_ref: tuple[str, ...] | None = None) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if stage_ref is not None and (annotation is str or origin is typing.Annotated):  # Annotated inside `| None`
        return "stage" + (f" writing {' or '.join(stage_ref)}" if stage_ref else "")
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, stage_ref) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(to_jsonable_python(a)) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "; required"
    if isinstance(value, BaseModel):
        return ""  # its keys follow, each with its own default
    value = to_jsonable_python(value)
    return f"; default `{value if isinstance(value, str) else json.dumps(value)}`"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    candidates = [annotation, *typing.get_args(annotation)]
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
