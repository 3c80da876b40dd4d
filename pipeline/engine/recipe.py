"""Recipes: load a YAML file, apply `--set` overrides, validate everything, report every error at once.

A recipe is a declaration (like DVC's `dvc.yaml`): the recipe-wide sections `seed`, `model`, `quant`,
`data`, and `stages`, a mapping of stage name to `type` plus that type's keys. The type picks its
pydantic `Config` from the closed registry in `stages/`; nothing in a YAML file can import code.

    recipe = load_recipe("recipes/demo.yaml", overrides=["stages.teacher.lr=1e-3"])
    recipe = load_recipe("demo")   # a shipped recipe (pipeline/recipes/, in the wheel) by name


`load_recipe` raises `RecipeError` holding every problem found, each as (key path, message), in the
order the checks run: YAML -> top-level keys -> sections -> each stage's type and schema ->
references -> cycles -> the base model's local path and chat template -> what each reference reads
(`export.model` must name a stage that writes a quantized model) -> each stage type's `check` hook.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

import stages as stage_registry
from pipeline.data.spec import DataSpec
from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import (
    BASE_MODEL_REF,
    MODEL,
    QUANTIZED,
    SEED_MAX,
    StageConfig,
    config_variants,
    stage_ref_accepts,
    stage_ref_fields,
)
from pipeline.model_spec import ModelSpec
from pipeline.quant.scheme import QuantSpec

SECTIONS: dict[str, type[BaseModel]] = {"model": ModelSpec, "quant": QuantSpec, "data": DataSpec}
TOP_KEYS = ("name", "seed", "model", "quant", "data", "stages")
REQUIRED_KEYS = ("name", "model", "stages")
STAGE_NAME = re.compile(r"[a-z0-9_-]+")
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX = 100
"""Longest recipe or stage name: each names a folder under the artifacts root."""
RESERVED_STAGE_NAMES = {
    BASE_MODEL_REF: "it means the recipe's base model",
    "report": "`reasoning-qat report` writes artifacts/<recipe>/report/",
}
GATE_TYPE = "gate"
MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a page of YAML; a larger file is something else named by mistake."""
MAX_YAML_NODES = 100_000
"""Most values a recipe may hold once its aliases are expanded; the shipped ones hold a few hundred."""
SHIPPED_DIR = Path(__file__).parents[1] / "recipes"
"""The shipped recipes: package data, so an installed wheel has them (`recipes/` in a checkout links here)."""


class RecipeError(Exception):
    """Every problem found in a recipe, each as (key path, message)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(dict.fromkeys(errors))  # two stages' checks may find the same bad file
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{where}: {message}" if where else message for where, message in self.errors]


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    model: ModelSpec
    quant: QuantSpec
    data: DataSpec
    stages: dict[str, StageConfig]
    """Stage name -> validated config, in the order the file lists them."""
    source: str = "<recipe>"
    modules: dict[str, types.ModuleType] = field(default_factory=dict, repr=False, compare=False)
    """Stage name -> its stage type's module."""

    def section(self, key: str) -> Any:
        """A recipe-wide section (`seed`, `model`, `quant`, `data`) as plain JSON-able data."""
        if key == "seed":
            return self.seed
        return getattr(self, key).model_dump(mode="json")

    def refs(self, stage: str) -> dict[str, str]:
        """Field name -> referenced stage (or "model") of each StageRef field set on `stage`."""
        config = self.stages[stage]
        return _refs_of(config)


def _refs_of(config: StageConfig) -> dict[str, str]:
    out = {}
    for name in stage_ref_fields(type(config)):
        value = getattr(config, name)
        if value is not None:
            out[name] = value
    return out


# -- entry points ------------------------------------------------------------------------------


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of each shipped recipe, by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def shipped_summary(path: Path) -> str:
    """What a shipped recipe is for: its header comment up to the first colon or full stop."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    return re.split(r"[:.](?:\s|$)", " ".join(header), maxsplit=1)[0]


def resolve_recipe(path: str | Path) -> Path:
    """`path` itself, or the shipped recipe it names when no such file exists and it is a bare name."""
    name = str(path).removesuffix(".yaml")
    if not Path(path).exists() and Path(name).parent == Path(".") and name in shipped_recipes():
        return shipped_recipes()[name]
    return Path(path)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file, or the shipped recipe `path` names; RecipeError lists
    every problem."""
    path = resolve_recipe(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError([(source, "no such file")]) from None
    except OSError as e:
        raise RecipeError([(source, f"cannot read ({e.__class__.__name__})")]) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError([(source, f"larger than {MAX_RECIPE_BYTES >> 10} KiB, too large for a recipe")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([(source, f"not UTF-8 text (byte {e.start})")]) from None
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise RecipeError([(source, f"expected a mapping of recipe keys, got {_describe(raw)}")])
    return parse_recipe(raw, source=source, overrides=overrides)


def parse_recipe(raw: dict, source: str = "<recipe>", overrides: typing.Sequence[str] = ()) -> Recipe:
    """Validate recipe data (as loaded from YAML) after applying `--set` overrides."""
    raw = _deep_copy(raw)
    errors = apply_overrides(raw, overrides)
    errors += _check_top_level(raw)
    sections, section_errors = _validate_sections(raw)
    errors += section_errors
    configs, modules, stage_errors = _validate_stage_graph(raw)
    errors += stage_errors

    if errors or len(sections) < len(SECTIONS):
        if "model" in sections:
            errors += _check_model_path(sections["model"])
        raise RecipeError(errors)

    recipe = Recipe(
        name=raw["name"],
        seed=raw.get("seed", 0),
        model=sections["model"],
        quant=sections["quant"],
        data=sections["data"],
        stages=configs,
        source=source,
        modules=modules,
    )
    # Semantic checks presuppose a well-formed recipe, so they run only once everything above passed.
    model_errors = _check_model_path(recipe.model)  # once: it may hash a stage folder's weights
    from pipeline.data.chat import check_tokenizer  # the data layer's check: loaded when a recipe is validated

    # the base model's problems first: every stage starts from it, and `init` validates a recipe written for it
    errors += model_errors or check_tokenizer(recipe.model)
    errors += check_input_kinds(recipe, model_ok=not model_errors)
    from pipeline.data.rows import reading_each_file_once  # the data layer's reader: loaded when a recipe is validated

    with reading_each_file_once():  # stage checks that name the same benchmark or prompts file read it once
        errors += _run_stage_checks(recipe)
    if errors:
        raise RecipeError(errors)
    return recipe


def _validate_sections(raw: dict) -> tuple[dict[str, BaseModel], list[tuple[str, str]]]:
    """The recipe-wide sections (model, quant, data) that validate, and the errors of the others."""
    sections: dict[str, BaseModel] = {}
    errors: list[tuple[str, str]] = []
    for key, cls in SECTIONS.items():
        if key in REQUIRED_KEYS and key not in raw:
            continue  # already reported as missing
        value = raw.get(key)
        if value is None and key not in REQUIRED_KEYS:
            value = {}  # `quant:` with nothing under it means the defaults
        try:
            sections[key] = cls.model_validate(value)
            errors += lax_value_errors(value, sections[key], key)
        except ValidationError as e:
            errors += pydantic_errors(e, key, cls)
    return sections, errors


def _validate_stage_graph(raw: dict):
    """(valid stage configs, their modules, errors): each stage's type and schema, then references
    and cycles. A missing `stages` was reported with the top-level keys."""
    configs, modules, declared, errors = _validate_stages(raw["stages"]) if "stages" in raw else ({}, {}, {}, [])
    errors += check_references(configs, declared)
    cycle = find_cycle(configs)
    if cycle:
        errors.append(("stages", f"cycle {' -> '.join(cycle)}"))
    return configs, modules, errors


def _run_stage_checks(recipe: Recipe) -> list[tuple[str, str]]:
    """Each stage type's `check` hook on its stage, its errors under the stage's key path."""
    errors: list[tuple[str, str]] = []
    for name, config in recipe.stages.items():
        check = getattr(recipe.modules[name], "check", None)
        if check is None:
            continue
        try:
            found = check(config, recipe)
        except InputError as e:
            found = [(e.where, e.message)]
        # a check may blame a key inside a recipe-wide section (`quant.weights.group_size` does not fit
        # the model): that path stays as it is; a bare `model` is the stage's own field of that name
        errors += [
            (where if "." in where and where.split(".")[0] in SECTIONS else _join(f"stages.{name}", where), message)
            for where, message in found
        ]
    return errors


# -- YAML ----------------------------------------------------------------------------------------


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> data; a RecipeError blaming `where` with one line when it is not a recipe's YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise RecipeError([(where, _yaml_message(e, text))]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError([(where, "could not parse YAML (nested too deeply)")]) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one) and documents whose
    aliases expand past MAX_YAML_NODES values (see _check_expanded_size)."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Refuse a document whose aliases stand for more than MAX_YAML_NODES values, or for infinitely many.

    PyYAML builds an anchored node once and every alias shares it, so a 1 KB "billion laughs" file
    loads at once; but validation (and the copy taken of the data) visits each alias's expansion:
    billions of values. PyYAML has no such limit, so sizes are counted here, once per distinct node.
    """
    sizes: dict[int, int] = {}  # id(node) -> expanded size; -1 while its children are being counted

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise yaml.constructor.ConstructorError(
                    None, None, "an alias refers to a collection that contains it", node.start_mark
                )
            return sizes[id(node)]
        sizes[id(node)] = -1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {MAX_YAML_NODES} values once aliases are expanded", node.start_mark
            )
        sizes[id(node)] = total
        return total

    size(root)


def _yaml_message(e: yaml.YAMLError, text: str) -> str:
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow, e.g. a NUL byte
        line = text.count("\n", 0, e.position) + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"line {line}: could not parse YAML (character U+{code:04X} is not allowed)"
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{where}could not parse YAML ({problem})"


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


# -- overrides -----------------------------------------------------------------------------------


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> list[tuple[str, str]]:
    """Apply `key.path=value` overrides in place (value read as YAML); return the errors.

    The top-level key and the stage name must exist already (an override cannot invent a stage);
    deeper keys may be new, and the schema then judges them like any key written in the file.
    """
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        where = f"--set {key}"
        if not sep or not all(parts):
            errors.append((f"--set {item}", "expected KEY=VALUE, e.g. stages.kd_qat.lr=1e-5"))
            continue
        try:
            value = parse_yaml(text, where)
        except RecipeError as e:
            errors += e.errors
            continue
        if parts[0] not in TOP_KEYS:
            errors.append((where, f"no recipe key '{parts[0]}'{did_you_mean(parts[0], TOP_KEYS)}"))
            continue
        if parts[0] == "stages" and len(parts) > 1 and parts[1] not in (raw.get("stages") or {}):
            known = list(raw.get("stages") or {}) if isinstance(raw.get("stages"), dict) else []
            errors.append((where, f"no stage named '{parts[1]}'{did_you_mean(parts[1], known)}"))
            continue
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                errors.append((where, f"{'.'.join(parts[: depth + 1])} is {_describe(node)}, not a mapping"))
                break
        else:
            node[parts[-1]] = value
    return errors


# -- top level and stages --------------------------------------------------------------------------


def _check_top_level(raw: dict) -> list[tuple[str, str]]:
    errors = []
    for key in raw:
        if key not in TOP_KEYS:
            errors.append((str(key), f"unknown key{did_you_mean(str(key), TOP_KEYS)}"))
    for key in REQUIRED_KEYS:
        if key not in raw:
            errors.append((key, "required"))
    name = raw.get("name")
    if "name" in raw and not (isinstance(name, str) and RECIPE_NAME.fullmatch(name)):
        errors.append(("name", f"must be a folder name (letters, digits, _ . -), got {_describe(name)}"))
    elif "name" in raw and len(name) > NAME_MAX:
        errors.append(("name", f"must be at most {NAME_MAX} characters (it names a folder), got {len(name)}"))
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        errors.append(("seed", f"expected an integer, got {_describe(seed)}"))
    elif seed < 0:
        errors.append(("seed", "must be >= 0"))
    elif seed > SEED_MAX:
        errors.append(("seed", f"must be <= {SEED_MAX} (numpy takes 32-bit seeds)"))
    return errors


def _validate_stages(raw_stages: Any):
    """(valid configs, their modules, every well-named stage -> its declared type, errors)."""
    configs: dict[str, StageConfig] = {}
    modules: dict[str, types.ModuleType] = {}
    declared: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    if not isinstance(raw_stages, dict):
        return (
            configs,
            modules,
            declared,
            [("stages", f"expected a mapping of stage name to stage, got {_describe(raw_stages)}")],
        )
    if not raw_stages:
        return configs, modules, declared, [("stages", "needs at least one stage")]
    for name, body in raw_stages.items():
        where = f"stages.{name}"
        name_error = _stage_name_error(name)
        if name_error:
            errors.append((where, name_error))
            continue
        declared[name] = body.get("type") if isinstance(body, dict) else None
        module, type_error = _stage_type_module(where, body)
        if type_error:
            errors.append(type_error)
            continue
        try:
            configs[name] = module.Config.model_validate(body)
            modules[name] = module
            errors += lax_value_errors(body, configs[name], where)
        except ValidationError as e:
            errors += pydantic_errors(e, where, module.Config)
    return configs, modules, declared, errors


def _stage_name_error(name: Any) -> str | None:
    """Why `name` cannot name a stage (reserved, or not a-z 0-9 _ - within NAME_MAX), or None."""
    if name in RESERVED_STAGE_NAMES:
        return f"the name '{name}' is reserved ({RESERVED_STAGE_NAMES[name]})"
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or len(name) > NAME_MAX:
        return f"stage names use only a-z, 0-9, _ and - (at most {NAME_MAX} of them)"
    return None


def _stage_type_module(where: str, body: Any) -> tuple[types.ModuleType | None, tuple[str, str] | None]:
    """(the module of the stage type `body` declares, None) or (None, the error at `where`)."""
    if not isinstance(body, dict):
        return None, (where, f"expected a mapping with a `type`, got {_describe(body)}")
    stage_type = body.get("type")
    if stage_type is None:
        return None, (f"{where}.type", f"required (one of {', '.join(stage_registry.STAGE_TYPES)})")
    try:
        module = stage_registry.stage_module(stage_type) if isinstance(stage_type, str) else None
    except KeyError:
        module = None
    except stage_registry.StageTypeUnavailable as e:
        return None, (f"{where}.type", str(e))
    if module is None:
        return None, (
            f"{where}.type",
            f"unknown stage type {_describe(stage_type)}"
            f"{did_you_mean(str(stage_type), stage_registry.STAGE_TYPES)}"
            f" (one of {', '.join(stage_registry.STAGE_TYPES)})",
        )
    return module, None


def check_references(configs: dict[str, StageConfig], declared: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Each StageRef names a stage of the recipe or "model"; `when` names a gate stage.

    `declared`: every stage the file names, with its declared type, so that a reference to a stage
    whose own config is invalid is not reported a second time.
    """
    declared = {name: c.type for name, c in configs.items()} if declared is None else declared
    errors = []
    for name, config in configs.items():
        for field_name, target in _refs_of(config).items():
            where = f"stages.{name}.{field_name}"
            if field_name == "when" and target == BASE_MODEL_REF:
                errors.append((where, "must name a gate stage, not the base model"))
            elif target not in declared and target != BASE_MODEL_REF:
                candidates = list(declared) if field_name == "when" else [*declared, BASE_MODEL_REF]
                errors.append((where, f"no stage named '{target}'{did_you_mean(target, candidates)}"))
            elif field_name == "when" and declared[target] not in (GATE_TYPE, None) and target in configs:
                errors.append((where, f"'{target}' is a {declared[target]} stage, not a gate"))
            elif target == name:
                errors.append((where, "a stage cannot take its own output as input"))
    return errors


def find_cycle(configs: dict[str, StageConfig]) -> list[str] | None:
    """A cycle among stage references as [a, b, ..., a], or None."""
    # a stage naming itself is reported by check_references
    graph = {name: [t for t in _refs_of(c).values() if t in configs and t != name] for name, c in configs.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def check_input_kinds(recipe: Recipe, model_ok: bool = True) -> list[tuple[str, str]]:
    """Each reference names a stage whose output its field reads (stage_api's output kinds):
    `export.model` a quantized model, `ptq.calibration` traces, never an eval stage's samples.

    Runs on a valid, acyclic recipe; a stage module without OUTPUT or `output` is not judged, nor is a base model
    that `_check_model_path` refused (`model_ok` False): what is wrong with it is said once, there."""
    kinds: dict[str, str | None] = {BASE_MODEL_REF: _base_model_kind(recipe.model) if model_ok else None}

    def kind_of(target: str) -> str | None:
        if target not in kinds:
            module, config = recipe.modules[target], recipe.stages[target]
            if hasattr(module, "output"):
                inputs = {f: kind_of(t) for f, t in recipe.refs(target).items() if f != "when"}
                kinds[target] = module.output(config, inputs)
            else:
                kinds[target] = getattr(module, "OUTPUT", None)
        return kinds[target]

    errors = []
    for name, config in recipe.stages.items():
        for field_name, accepts in stage_ref_accepts(type(config)).items():
            target = getattr(config, field_name)
            if target is None or not accepts or kind_of(target) in (None, *accepts):
                continue
            what = (
                "(the recipe's base model) is"
                if target == BASE_MODEL_REF
                else f"({recipe.stages[target].type} stage) writes"
            )
            errors.append(
                (
                    f"stages.{name}.{field_name}",
                    f"'{target}' {what} {kind_of(target)}; needs {' or '.join(accepts)}{_writers(accepts)}",
                )
            )
    return errors


def _base_model_kind(model: ModelSpec) -> str:
    """A local `model.path` may hold a quantized model (a student from another recipe)."""
    if model.path is not None and Path(model.path).is_dir():
        from pipeline.quant.formats.layout import is_quantized  # file reads only: no torch to validate a recipe

        if is_quantized(model.path):
            return QUANTIZED
    return MODEL


def _writers(kinds: tuple[str, ...]) -> str:
    """` (written by ptq, kd_qat, rl or export stages)`: the stage types whose OUTPUT is one of `kinds`."""
    types = []
    for stage_type in stage_registry.STAGE_TYPES:
        try:
            module = stage_registry.stage_module(stage_type)
        except stage_registry.StageTypeUnavailable:
            continue
        if getattr(module, "OUTPUT", None) in kinds:
            types.append(stage_type)
    if not types:
        return ""
    listed = types[0] if len(types) == 1 else f"{', '.join(types[:-1])} or {types[-1]}"
    return f" (written by {listed} stages)"


def _check_model_path(model: ModelSpec) -> list[tuple[str, str]]:
    """A `model.path` that is clearly a local path must exist and hold a model we load
    (pipeline.models.check_model_dir); `org/name` hub ids are left to the hub."""
    if model.path is None:
        return []
    path = Path(model.path).expanduser()
    looks_local = (
        path.is_absolute()
        or model.path.startswith(("./", "../", "~"))
        or (len(path.parts) > 1 and path.parent.is_dir())
    )
    if looks_local and not path.exists():
        return [("model.path", f"no such directory: {model.path}")]
    from pipeline.models import check_model_dir  # transformers: only when a recipe names a local model

    try:
        check_model_dir(model.path, "model.path", model.trust_remote_code)
    except InputError as e:
        return [(e.where, e.message)]
    return []


# -- pydantic errors as key paths ----------------------------------------------------------------


def lax_value_errors(raw: Any, value: Any, where: str) -> list[tuple[str, str]]:
    """What pydantic's lax mode lets through but a recipe must not say: inf or nan anywhere, a float
    where an integer is needed (`train_size: 1.0e15` validates as an int), a boolean where a number
    is (`steps: true` as 1). `raw` is the YAML data that validated into `value`, at key path `where`.

    Lax mode stays because PyYAML reads `1e-5` as a string, which only lax mode takes as a float."""
    if isinstance(value, BaseModel) and isinstance(raw, dict):
        return [
            e
            for key, item in raw.items()
            if key in type(value).model_fields
            for e in lax_value_errors(item, getattr(value, key), _join(where, str(key)))
        ]
    if isinstance(value, (list, tuple)) and isinstance(raw, list) and len(raw) == len(value):
        return [
            e for i, (item, v) in enumerate(zip(raw, value)) for e in lax_value_errors(item, v, _join(where, str(i)))
        ]
    if isinstance(value, float) and not math.isfinite(value):
        return [(where, f"must be a finite number, got {_describe(raw)}")]
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(raw, bool) or (isinstance(raw, float) and isinstance(value, int)))
    ):
        return [(where, f"expected {'an integer' if isinstance(value, int) else 'a number'}, got {_describe(raw)}")]
    return []


def pydantic_errors(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[tuple[str, str]]:
    """ValidationError -> [(key path, human message)], one per distinct key path."""
    out: dict[str, str] = {}
    variants = config_variants(model)
    for err in exc.errors(include_url=False):
        loc = [part for part in err["loc"] if isinstance(part, int) or _is_key(part)]
        schema, message = model, None
        if variants is not None:  # a stage Config with one schema per value of a key (ptq's `method`)
            schema, loc, message = _variant_error(err, variants, loc)
        where = _join(prefix, ".".join(str(p) for p in loc))
        if where not in out:
            out[where] = message or _message(err, schema, loc)
    return list(out.items())


def _variant_error(err: dict, variants, loc: list) -> tuple[Any, list, str | None]:
    """(the variant's schema, `loc` without the union's tag, a message where the variants need their own) of an
    error of a VariantConfig: the key naming no variant, or a key that only other variants have."""
    key = variants.key
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        value = err["input"].get(key) if isinstance(err.get("input"), dict) else None
        tags = [f"'{t}'" for t in variants.members]
        return None, [key], f"must be one of {', '.join(tags[:-1])} or {tags[-1]}, got {_describe(value)}"
    tag, loc = (loc[0], loc[1:]) if loc and loc[0] in variants.members else (None, loc)
    schema = variants.members.get(tag)
    if err["type"] == "extra_forbidden" and tag is not None and len(loc) == 1:
        others = variants.applies_to(str(loc[0]))
        if others:  # a key of another method, not a typo
            named = f"{key}s {', '.join(others[:-1])} and {others[-1]}" if len(others) > 1 else f"{key} {others[0]}"
            return schema, loc, f"is a key of {named}, not of {key} {tag}"
    return schema, loc, None


def _is_key(part: str) -> bool:
    # pydantic puts union member tags such as `int` or `function-after[...]` into locations
    return not any(c in part for c in "[]()") and part not in ("int", "float", "str", "bool", "list", "dict")


def _message(err: dict, model: type[BaseModel], loc: list) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return f"unknown key{did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))}"
    if kind == "finite_number" or (kind in bounds and _is_nan(value)):  # nan fails every bound
        return f"must be a finite number, got {_describe(value)}"
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {_describe(value)}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {_describe(value)}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {_describe(value)}"
    if kind in ("string_type",):
        return f"expected a string, got {_describe(value)}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected')}, got {_describe(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping, got {_describe(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_describe(value)}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    return err["msg"][:1].lower() + err["msg"][1:]


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """Field names of the (nested) pydantic model found at `loc` under `model`."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        cls = _model_of(cls.model_fields[part].annotation)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# -- small helpers --------------------------------------------------------------------------------


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if prefix and rest else prefix or rest
