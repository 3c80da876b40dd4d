"""Recipe validation: every malformed recipe gives exit 2, one line per problem naming its key path,
no traceback, and no artifacts root; overrides; human messages from pydantic errors."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import stages
from pipeline.recipe import RecipeError, load_recipe, parse_recipe

from conftest import TINY_MODEL

GOOD = {"name": "t", "seed": 0, "model": TINY_MODEL,
        "stages": {"teacher": {"type": "make", "value": 3},
                   "g": {"type": "gate", "src": "teacher"},
                   "student": {"type": "make", "src": "teacher", "when": "g"}}}


def with_(path: str, value, base=GOOD) -> dict:
    """A deep copy of `base` with the dotted key `path` set to `value` (or removed, for DELETE)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()

# (id, recipe text or data, extra CLI args, the one expected line, or its start)
MALFORMED = [
    ("yaml-syntax", "name: t\nseed: 0\nmodel: a: b\n", [],
     "{path}: line 3: could not parse YAML (mapping values are not allowed here)"),
    ("duplicate-key", "name: t\nseed: 0\nseed: 1\n", [], "{path}: line 3: could not parse YAML (duplicate key 'seed')"),
    ("not-a-mapping", "- a\n- b\n", [], "{path}: expected a mapping of recipe keys, got a list"),
    ("unknown-top-key", with_("sead", 1), [], "sead: unknown key (did you mean 'seed'?)"),
    ("missing-stages", with_("stages", DELETE), [], "stages: required"),
    ("bad-seed", with_("seed", "abc"), [], "seed: expected an integer, got 'abc'"),
    ("bad-name", with_("name", "a/b"), [], "name: must be a folder name (letters, digits, _ . -), got 'a/b'"),
    ("model-int", with_("model.arch.hidden_size", "abc"), [],
     "model.arch.hidden_size: expected an integer, got 'abc'"),
    ("model-two-sources", with_("model.path", "org/name"), [],
     "model: give exactly one of `path` (a pretrained model) or `arch` (build from scratch)"),
    ("model-unknown-key", with_("model.arch.hiden_size", 8), [],
     "model.arch.hiden_size: unknown key (did you mean 'hidden_size'?)"),
    ("quant-bound", with_("quant", {"weights": {"num_bits": 0}}), [], "quant.weights.num_bits: must be >= 1"),
    ("data-literal", with_("data", {"task": "gsm9k"}), [], "data.task: must be one of"),
    ("stage-not-mapping", with_("stages.teacher", "make"), [],
     "stages.teacher: expected a mapping with a `type`, got 'make'"),
    ("stage-no-type", with_("stages.teacher.type", DELETE), [], "stages.teacher.type: required"),
    ("stage-unknown-type", with_("stages.teacher.type", "mak"), [],
     "stages.teacher.type: unknown stage type 'mak' (did you mean 'make'?)"),
    ("stage-type-unavailable", with_("stages.teacher.type", "ghost"), [],
     "stages.teacher.type: stage type 'ghost' is not available in this version"),
    ("stage-unknown-key", with_("stages.teacher.valu", 2), [],
     "stages.teacher.valu: unknown key (did you mean 'value'?)"),
    ("stage-bound", with_("stages.teacher.lr", -1), [], "stages.teacher.lr: must be > 0"),
    ("stage-int", with_("stages.teacher.value", "abc"), [], "stages.teacher.value: expected an integer, got 'abc'"),
    ("reserved-name", with_("stages.model", {"type": "make"}), [],
     "stages.model: the name 'model' is reserved (it means the recipe's base model)"),
    ("bad-stage-name", with_("stages.Big One", {"type": "make"}), [],
     "stages.Big One: stage names use only a-z, 0-9, _ and -"),
    ("unknown-ref", with_("stages.student.src", "techer"), [],
     "stages.student.src: no stage named 'techer' (did you mean 'teacher'?)"),
    ("when-not-gate", with_("stages.student.when", "teacher"), [],
     "stages.student.when: 'teacher' is a make stage, not a gate"),
    ("self-ref", with_("stages.teacher.src", "teacher"), [],
     "stages.teacher.src: a stage cannot take its own output as input"),
    ("cycle", with_("stages", {"a": {"type": "make", "src": "b"}, "b": {"type": "make", "src": "a"}}), [],
     "stages: cycle a -> b -> a"),
    ("check-hook", with_("stages.teacher.value", 13), [], "stages.teacher.value: 13 is unlucky"),
    ("group-size-misfit", {"name": "t", "quant": "w3g128",
                           "model": {"arch": {**TINY_MODEL["arch"], "hidden_size": 100}, "dtype": "float32"},
                           "stages": {"teacher": {"type": "sft"},
                                      "ptq": {"type": "ptq", "model": "teacher", "method": "rtn",
                                              "calibration_source": "generic"}}}, [],
     "quant.weights.group_size: model.layers.0.self_attn.q_proj: 128 does not divide in_features 100, "
     "nor does any smaller multiple of 32 (and 4 more layers)"),
    ("missing-model-path", with_("model", {"path": "./no/such/model"}), [],
     "model.path: no such directory: ./no/such/model"),
    ("set-unknown-stage", GOOD, ["--set", "stages.techer.lr=1"],
     "--set stages.techer.lr: no stage named 'techer' (did you mean 'teacher'?)"),
    ("set-unknown-top", GOOD, ["--set", "sed=1"], "--set sed: no recipe key 'sed' (did you mean 'seed'?)"),
    ("set-no-equals", GOOD, ["--set", "seed"], "--set seed: expected KEY=VALUE"),
    ("set-into-scalar", GOOD, ["--set", "seed.x=1"], "--set seed.x: seed is 0, not a mapping"),
    ("set-bad-value", GOOD, ["--set", "stages.teacher.lr=abc"], "stages.teacher.lr: expected a number, got 'abc'"),
    ("set-unknown-key", GOOD, ["--set", "stages.teacher.lrr=1"],
     "stages.teacher.lrr: unknown key (did you mean 'lr'?)"),
]


@pytest.mark.parametrize("text,extra,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_malformed_recipe(command, text, extra, expected, fake_stages, monkeypatch, tmp_path, run_cli):
    monkeypatch.setattr(stages, "STAGE_TYPES", (*stages.STAGE_TYPES, "ghost"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False))
    art = tmp_path / "art"
    args = [command, path, *extra] + (["--artifacts", art] if command == "run" else [])
    code, out, err = run_cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(expected.format(path=path)), lines[0]
    assert "Traceback" not in out + err
    assert not art.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    assert fake_stages.calls == []


def test_every_error_is_reported_in_check_order(fake_stages, tmp_path, run_cli):
    data = with_("sead", 1)
    data["quant"] = {"weights": {"num_bits": 0, "group_size": "big"}}
    data["stages"]["teacher"]["lr"] = 0
    data["stages"]["teacher"]["valu"] = 1
    data["stages"]["student"]["src"] = "techer"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    code, _, err = run_cli("validate", path)
    assert code == 2
    assert err.strip().splitlines() == [
        "sead: unknown key (did you mean 'seed'?)",
        "quant.weights.num_bits: must be >= 1",
        "quant.weights.group_size: expected an integer, got 'big'",
        "stages.teacher.lr: must be > 0",
        "stages.teacher.valu: unknown key (did you mean 'value'?)",
        "stages.student.src: no stage named 'techer' (did you mean 'teacher'?)",
    ]


def test_missing_file(tmp_path, run_cli):
    code, _, err = run_cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and err.strip() == f"{tmp_path}/nope.yaml: no such file"


def test_valid_recipe_and_overrides(fake_stages):
    recipe = parse_recipe(GOOD, overrides=["stages.teacher.lr=1e-5", "seed=3", "quant.weights.group_size=null"])
    assert recipe.stages["teacher"].lr == 1e-5 and recipe.seed == 3
    assert recipe.quant.weights.group_size is None
    assert recipe.refs("student") == {"src": "teacher", "when": "g"}
    assert recipe.section("seed") == 3 and recipe.section("model")["arch"]["hidden_size"] == 64
    assert list(recipe.stages) == ["teacher", "g", "student"]


def test_hub_ids_and_existing_local_paths_are_allowed(fake_stages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_recipe(with_("model", {"path": "Qwen/Qwen3-0.6B"})).model.path == "Qwen/Qwen3-0.6B"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text('{"model_type": "qwen3"}')
    save_file({"w": torch.zeros(1)}, tmp_path / "models" / "mine" / "model.safetensors")
    assert parse_recipe(with_("model", {"path": "models/mine"})).model.path == "models/mine"
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_("model", {"path": "models/theirs"}))  # an existing parent: a local path
    assert e.value.errors == [("model.path", "no such directory: models/theirs")]


def test_yaml_floats_without_a_dot_are_numbers(fake_stages, tmp_path):
    # PyYAML reads 1e-5 as a string; the schema still sees a number
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("value: 3", "value: 3\n    lr: 1e-5"))
    assert load_recipe(path).stages["teacher"].lr == 1e-5
