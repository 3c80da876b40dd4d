"""Recipe validation: every malformed recipe gives exit 2, one line per problem naming its key path,
no traceback, and no artifacts root; overrides; human messages from pydantic errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TINY_MODEL
from safetensors.torch import save_file

import stages
from pipeline.engine.recipe import RecipeError, load_recipe, parse_recipe

GOOD = {
    "name": "t",
    "seed": 0,
    "model": TINY_MODEL,
    "stages": {
        "teacher": {"type": "make", "value": 3},
        "g": {"type": "gate", "src": "teacher"},
        "student": {"type": "make", "src": "teacher", "when": "g"},
    },
}


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

# Real stage types, for what each reference reads: sft teacher -> eval, traces -> ptq -> kd_qat -> export
REAL = {
    "name": "t",
    "model": TINY_MODEL,
    "quant": {"weights": {"num_bits": 4, "group_size": 32}},
    "stages": {
        "teacher": {"type": "sft"},
        "teacher_eval": {"type": "eval", "model": "teacher"},
        "traces": {"type": "traces", "model": "teacher"},
        "ptq": {"type": "ptq", "model": "teacher", "calibration": "traces"},
        "kd_qat": {"type": "kd_qat", "init": "ptq", "teacher": "teacher", "data": "traces"},
        "export": {"type": "export", "model": "kd_qat"},
    },
}
QUANTIZED_WRITERS = "(written by ptq, kd_qat, rl or export stages)"
# 9 levels of 9 aliases: 1 KB of YAML standing for 9^9 strings ("billion laughs")
ALIAS_BOMB = (
    "name: t\na: &a ["
    + ", ".join(["lol"] * 9)
    + "]\n"
    + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
)

# (id, recipe text or data, extra CLI args, the one expected line, or its start)
MALFORMED = [
    (
        "yaml-syntax",
        "name: t\nseed: 0\nmodel: a: b\n",
        [],
        "{path}: line 3: could not parse YAML (mapping values are not allowed here)",
    ),
    ("duplicate-key", "name: t\nseed: 0\nseed: 1\n", [], "{path}: line 3: could not parse YAML (duplicate key 'seed')"),
    ("not-a-mapping", "- a\n- b\n", [], "{path}: expected a mapping of recipe keys, got a list"),
    ("unknown-top-key", with_("sead", 1), [], "sead: unknown key (did you mean 'seed'?)"),
    ("missing-stages", with_("stages", DELETE), [], "stages: required"),
    ("bad-seed", with_("seed", "abc"), [], "seed: expected an integer, got 'abc'"),
    ("bad-name", with_("name", "a/b"), [], "name: must be a folder name (letters, digits, _ . -), got 'a/b'"),
    ("model-int", with_("model.arch.hidden_size", "abc"), [], "model.arch.hidden_size: expected an integer, got 'abc'"),
    (
        "model-two-sources",
        with_("model.path", "org/name"),
        [],
        "model: give exactly one of `path` (a pretrained model) or `arch` (build from scratch)",
    ),
    (
        "model-unknown-key",
        with_("model.arch.hiden_size", 8),
        [],
        "model.arch.hiden_size: unknown key (did you mean 'hidden_size'?)",
    ),
    ("quant-bound", with_("quant", {"weights": {"num_bits": 0}}), [], "quant.weights.num_bits: must be >= 1"),
    ("data-literal", with_("data", {"task": "gsm9k"}), [], "data.task: must be one of"),
    (
        "stage-not-mapping",
        with_("stages.teacher", "make"),
        [],
        "stages.teacher: expected a mapping with a `type`, got 'make'",
    ),
    ("stage-no-type", with_("stages.teacher.type", DELETE), [], "stages.teacher.type: required"),
    (
        "stage-unknown-type",
        with_("stages.teacher.type", "mak"),
        [],
        "stages.teacher.type: unknown stage type 'mak' (did you mean 'make'?)",
    ),
    (
        "stage-type-unavailable",
        with_("stages.teacher.type", "ghost"),
        [],
        "stages.teacher.type: stage type 'ghost' is not available in this version",
    ),
    (
        "stage-unknown-key",
        with_("stages.teacher.valu", 2),
        [],
        "stages.teacher.valu: unknown key (did you mean 'value'?)",
    ),
    ("stage-bound", with_("stages.teacher.lr", -1), [], "stages.teacher.lr: must be > 0"),
    ("stage-int", with_("stages.teacher.value", "abc"), [], "stages.teacher.value: expected an integer, got 'abc'"),
    (
        "reserved-name",
        with_("stages.model", {"type": "make"}),
        [],
        "stages.model: the name 'model' is reserved (it means the recipe's base model)",
    ),
    (
        "bad-stage-name",
        with_("stages.Big One", {"type": "make"}),
        [],
        "stages.Big One: stage names use only a-z, 0-9, _ and -",
    ),
    (
        "unknown-ref",
        with_("stages.student.src", "techer"),
        [],
        "stages.student.src: no stage named 'techer' (did you mean 'teacher'?)",
    ),
    (
        "when-not-gate",
        with_("stages.student.when", "teacher"),
        [],
        "stages.student.when: 'teacher' is a make stage, not a gate",
    ),
    (
        "self-ref",
        with_("stages.teacher.src", "teacher"),
        [],
        "stages.teacher.src: a stage cannot take its own output as input",
    ),
    (
        "cycle",
        with_("stages", {"a": {"type": "make", "src": "b"}, "b": {"type": "make", "src": "a"}}),
        [],
        "stages: cycle a -> b -> a",
    ),
    ("check-hook", with_("stages.teacher.value", 13), [], "stages.teacher.value: 13 is unlucky"),
    (
        "group-size-misfit",
        {
            "name": "t",
            "quant": "w3g128",
            "model": {"arch": {**TINY_MODEL["arch"], "hidden_size": 100}, "dtype": "float32"},
            "stages": {
                "teacher": {"type": "sft"},
                "ptq": {"type": "ptq", "model": "teacher", "method": "rtn", "calibration_source": "generic"},
            },
        },
        [],
        "quant.weights.group_size: model.layers.0.self_attn.q_proj: 128 does not divide in_features 100, "
        "nor does any smaller multiple of 32 (and 4 more layers)",
    ),
    (
        "missing-model-path",
        with_("model", {"path": "./no/such/model"}),
        [],
        "model.path: no such directory: ./no/such/model",
    ),
    (
        "set-unknown-stage",
        GOOD,
        ["--set", "stages.techer.lr=1"],
        "--set stages.techer.lr: no stage named 'techer' (did you mean 'teacher'?)",
    ),
    ("set-unknown-top", GOOD, ["--set", "sed=1"], "--set sed: no recipe key 'sed' (did you mean 'seed'?)"),
    ("set-no-equals", GOOD, ["--set", "seed"], "--set seed: expected KEY=VALUE"),
    ("set-into-scalar", GOOD, ["--set", "seed.x=1"], "--set seed.x: seed is 0, not a mapping"),
    ("set-bad-value", GOOD, ["--set", "stages.teacher.lr=abc"], "stages.teacher.lr: expected a number, got 'abc'"),
    (
        "set-unknown-key",
        GOOD,
        ["--set", "stages.teacher.lrr=1"],
        "stages.teacher.lrr: unknown key (did you mean 'lr'?)",
    ),
    # the file itself
    (
        "alias-bomb",
        ALIAS_BOMB,
        [],
        "{path}: line 7: could not parse YAML (more than 100000 values once aliases are expanded)",
    ),
    (
        "recursive-alias",
        "name: t\nx: &a [1, *a]\n",
        [],
        "{path}: line 2: could not parse YAML (an alias refers to a collection that contains it)",
    ),
    (
        "nul-byte",
        "name: t\x00\nseed: 0\n",
        [],
        "{path}: line 1: could not parse YAML (character U+0000 is not allowed)",
    ),
    ("too-deep", "x: " + "[" * 5000 + "]" * 5000 + "\n", [], "{path}: could not parse YAML (nested too deeply)"),
    ("too-large", "#" * (1 << 20) + "\n", [], "{path}: larger than 1024 KiB, too large for a recipe"),
    ("binary", b"\x1f\x8b\x08\x00\xff", [], "{path}: not UTF-8 text (byte 1)"),
    (
        "set-alias-bomb",
        GOOD,
        ["--set", "seed=" + ALIAS_BOMB.replace("\n", ", ").replace("name: t, ", "{") + "}"],
        "--set seed: line 1: could not parse YAML (more than 100000 values once aliases are expanded)",
    ),
    # numbers lax parsing would let through
    ("set-inf", GOOD, ["--set", "stages.teacher.lr=.inf"], "stages.teacher.lr: must be a finite number, got inf"),
    (
        "nan-in-file",
        with_("model.arch.rope_theta", float("nan")),
        [],
        "model.arch.rope_theta: must be a finite number, got nan",
    ),
    ("nan-string", with_("stages.teacher.lr", "nan"), [], "stages.teacher.lr: must be a finite number, got 'nan'"),
    (
        "inf-for-int",
        with_("stages.teacher.value", float("inf")),
        [],
        "stages.teacher.value: must be a finite number, got inf",
    ),
    ("float-for-int", with_("stages.teacher.value", 3.0), [], "stages.teacher.value: expected an integer, got 3.0"),
    ("bool-for-int", with_("stages.teacher.value", True), [], "stages.teacher.value: expected an integer, got True"),
    ("bool-for-float", with_("stages.teacher.lr", True), [], "stages.teacher.lr: expected a number, got True"),
    ("seed-too-large", with_("seed", 2**32), [], "seed: must be <= 4294967295 (numpy takes 32-bit seeds)"),
    ("seed-negative", with_("seed", -1), [], "seed: must be >= 0"),
    (
        "train-size-huge",
        with_("data", {"testbed": {"train_size": 1e15}}),
        [],
        "data.testbed.train_size: must be <= 1000000",
    ),
    (
        "train-size-float",
        with_("data", {"testbed": {"train_size": 1000.0}}),
        [],
        "data.testbed.train_size: expected an integer, got 1000.0",
    ),
    (
        "max-factor-huge",
        with_("data", {"testbed": {"max_factor": 10**15}}),
        [],
        "data.testbed.max_factor: must be <= 1000",
    ),
    # stages and names
    ("stages-null", with_("stages", None), [], "stages: expected a mapping of stage name to stage, got nothing"),
    ("stages-empty", with_("stages", {}), [], "stages: needs at least one stage"),
    (
        "name-too-long",
        with_("name", "a" * 300),
        [],
        "name: must be at most 100 characters (it names a folder), got 300",
    ),
    ("name-dotdot", with_("name", ".."), [], "name: must be a folder name (letters, digits, _ . -), got '..'"),
    ("name-newline", with_("name", "t\n"), [], "name: must be a folder name (letters, digits, _ . -), got 't\\n'"),
    (
        "stage-name-too-long",
        with_("stages." + "a" * 101, {"type": "make"}),
        [],
        f"stages.{'a' * 101}: stage names use only a-z, 0-9, _ and - (at most 100 of them)",
    ),
    (
        "reserved-report",
        with_("stages.report", {"type": "make"}),
        [],
        "stages.report: the name 'report' is reserved (`reasoning-qat report` writes artifacts/<recipe>/report/)",
    ),
    # what each reference reads
    (
        "export-of-sft",
        with_("stages.export.model", "teacher", REAL),
        [],
        f"stages.export.model: 'teacher' (sft stage) writes a full-precision model; needs a quantized model "
        f"{QUANTIZED_WRITERS}",
    ),
    (
        "init-from-eval",
        with_("stages.kd_qat.init", "teacher_eval", REAL),
        [],
        f"stages.kd_qat.init: 'teacher_eval' (eval stage) writes evaluation samples; needs a quantized model "
        f"{QUANTIZED_WRITERS}",
    ),
    (
        "calibration-not-traces",
        with_("stages.ptq.calibration", "teacher", REAL),
        [],
        "stages.ptq.calibration: 'teacher' (sft stage) writes a full-precision model; needs traces (written by "
        "traces stages)",
    ),
    (
        "teacher-is-traces",
        with_("stages.kd_qat.teacher", "traces", REAL),
        [],
        "stages.kd_qat.teacher: 'traces' (traces stage) writes traces; needs a full-precision model or a quantized "
        "model "
        "(written by sft, ptq, kd_qat, rl or export stages)",
    ),
    (
        "eval-of-a-gptq-export",
        with_("stages.export_eval", {"type": "eval", "model": "export"}, with_("stages.export.format", "gptq", REAL)),
        [],
        "stages.export_eval.model: 'export' writes the GPTQ format, for vLLM / SGLang (docs/serving.md); evaluate "
        "'kd_qat', the stage it exports, or an export in the pack-quantized format",
    ),
    (
        "export-of-base",
        with_("stages.export.model", "model", REAL),
        [],
        "stages.export.model: 'model' (the recipe's base model) is a full-precision model; needs a quantized model",
    ),
]


@pytest.mark.parametrize("text,extra,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_malformed_recipe(command, text, extra, expected, fake_stages, monkeypatch, tmp_path, run_cli):
    monkeypatch.setattr(stages, "STAGE_TYPES", (*stages.STAGE_TYPES, "ghost"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
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


CHAT_TOKENIZER_CONFIG = '{"chat_template": "{{ messages }}"}'
"""What validation reads of a model folder's tokenizer: that it is there, with a chat template."""


def test_hub_ids_and_existing_local_paths_are_allowed(fake_stages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_recipe(with_("model", {"path": "Qwen/Qwen3-0.6B"})).model.path == "Qwen/Qwen3-0.6B"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text('{"model_type": "qwen3"}')
    save_file({"w": torch.zeros(1)}, tmp_path / "models" / "mine" / "model.safetensors")
    (tmp_path / "models" / "mine" / "tokenizer_config.json").write_text(CHAT_TOKENIZER_CONFIG)
    assert parse_recipe(with_("model", {"path": "models/mine"})).model.path == "models/mine"
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_("model", {"path": "models/theirs"}))  # an existing parent: a local path
    assert e.value.errors == [("model.path", "no such directory: models/theirs")]


def test_yaml_floats_without_a_dot_are_numbers(fake_stages, tmp_path):
    # PyYAML reads 1e-5 as a string; the schema still sees a number
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD).replace("value: 3", "value: 3\n    lr: 1e-5"))
    assert load_recipe(path).stages["teacher"].lr == 1e-5


def test_references_read_what_the_stage_they_name_writes(fake_stages):
    """An sft stage that continues a quantized model writes one (SFT-QAT), which export then takes."""
    sft_qat = with_("stages.sft_qat", {"type": "sft", "init": "ptq", "data": "traces"}, REAL)
    assert parse_recipe(with_("stages.export.model", "sft_qat", sft_qat)).stages["export"].model == "sft_qat"
    assert parse_recipe(with_("stages.teacher_eval.model", "export", REAL))  # eval reads any model
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_("stages.export.model", "teacher", sft_qat))
    assert e.value.lines() == [
        f"stages.export.model: 'teacher' (sft stage) writes a full-precision model; needs a "
        f"quantized model {QUANTIZED_WRITERS}"
    ]


def test_bad_data_files_are_found_at_validation(fake_stages, tmp_path, run_cli):
    """Rows a stage would choke on, in the benchmark or prompts file a recipe names: exit 2, file and line."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    prompts = data_dir / "prompts.jsonl"
    prompts.write_text('{"question": "q", "answer": 1}\n{"question": "r"}\n')
    model_dir = tmp_path / "model"  # a folder that passes the model checks (config, safetensors, a chat tokenizer)
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "qwen3"}')
    save_file({"w": torch.zeros(1)}, model_dir / "model.safetensors")
    (model_dir / "tokenizer_config.json").write_text(CHAT_TOKENIZER_CONFIG)
    # a teacher from model.path solves the user's prompts; traces graded (only_correct) need answers
    on_prompts = {
        "name": "t",
        "model": {"path": str(model_dir)},
        "data": {"task": "jsonl", "prompts_file": str(prompts)},
        "stages": {"traces": {"type": "traces", "model": "model", "only_correct": True}},
    }
    cases = [
        (
            with_("stages.teacher_eval.bench", "gsm8k", with_("data", {"benchmarks_dir": str(data_dir)}, REAL)),
            f"stages.teacher_eval.bench: {data_dir}/gsm8k_test.jsonl:2: no `answer`",
        ),
        (
            on_prompts,
            f"stages.traces.only_correct: {prompts}: prompt 'prompt-1' has no `answer`, so it cannot be graded",
        ),
    ]
    for recipe, expected in cases:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        for command in (["validate", path], ["run", path, "--artifacts", tmp_path / "art"]):
            code, _, err = run_cli(*command)
            assert (code, err.strip()) == (2, expected)
            assert not (tmp_path / "art").exists()
    # ungraded traces need no answers
    assert parse_recipe(with_("stages.traces.only_correct", False, on_prompts)).data.prompts_file == str(prompts)


def test_stages_on_the_same_benchmark_read_its_file_once(tmp_path, monkeypatch):
    """Validation reads and parses a benchmark file once however many stages' checks load it (two evals and
    a gate here); a later load reads it again (the file may have changed in between)."""
    from pipeline.data import rows

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    reads = []
    real = rows._jsonl_located
    monkeypatch.setattr(rows, "_jsonl_located", lambda path, where: reads.append(path) or real(path, where))
    recipe = with_("stages.teacher_eval.bench", "gsm8k", with_("data", {"benchmarks_dir": str(data_dir)}, REAL))
    recipe["stages"]["student_eval"] = {"type": "eval", "model": "kd_qat", "bench": "gsm8k", "limit": 1}
    recipe["stages"]["student_gate"] = {"type": "gate", "model": "kd_qat", "bench": "gsm8k", "min_accuracy": 0.5}
    parse_recipe(recipe)
    assert reads == [data_dir / "gsm8k_test.jsonl"]
    parse_recipe(recipe)
    assert len(reads) == 2
