"""Every shipped recipe validates, resolves by name and is in the wheel; every shipped stage module keeps the
stage contract."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import yaml
from real_shapes import REAL_SHAPES
from safetensors.torch import save_file

import stages
from pipeline.data.tokenizer import build_tokenizer
from pipeline.engine.recipe import SHIPPED_DIR, RecipeError, load_recipe, shipped_recipes
from pipeline.engine.stage_api import StageConfig, config_classes
from pipeline.models import Qwen3Arch, build_model, save_model
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.scheme import resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPES = list(shipped_recipes().values())
SHIPPED = [t for t in stages.STAGE_TYPES if (ROOT / "stages" / f"{t}.py").is_file()]


def test_recipes_exist_and_the_top_level_folder_links_to_them():
    assert SHIPPED_DIR / "demo.yaml" in RECIPES and SHIPPED_DIR == ROOT / "pipeline" / "recipes"
    assert (ROOT / "recipes").resolve() == SHIPPED_DIR  # `reasoning-qat run recipes/demo.yaml` in a checkout


def test_a_shipped_recipe_resolves_by_name_where_no_file_has_it(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("demo").source == str(SHIPPED_DIR / "demo.yaml") == load_recipe("demo.yaml").source
    (tmp_path / "demo.yaml").write_text(
        (SHIPPED_DIR / "demo.yaml").read_text().replace("\nname: demo\n", "\nname: mine\n")
    )
    assert load_recipe("demo.yaml").name == "mine"  # an existing file wins
    with pytest.raises(RecipeError, match="sub/demo: no such file"):
        load_recipe("sub/demo")
    code, out, _ = run_cli("recipes")
    listed = dict(line.split(maxsplit=1) for line in out.splitlines())
    assert code == 0 and list(listed) == list(shipped_recipes())
    assert listed["demo"] == "The whole workflow on the built-in testbed, on a laptop CPU, in minutes"


def test_the_wheel_carries_the_shipped_recipes(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    # a copy of what the wheel is built from: setuptools writes build/ and *.egg-info/ beside pyproject.toml
    source = tmp_path / "src"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("reasoning_qat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("pipeline/recipes/")) == [
        f"pipeline/recipes/{p.name}" for p in RECIPES
    ]


DEMO_GPU_TEACHER = "artifacts/demo-gpu/teacher/model"


def stand_in(raw: dict, out: Path) -> Path:
    """A local model folder with the shapes of the recipe's `model.path`, in its place. Validation reads
    config.json (the ptq stage's scheme check instantiates it on the meta device) and checks a tokenizer with a chat
    template is there, so for a real base model the folder holds that file and the testbed's tokenizer."""
    model_path = raw["model"]["path"]
    if model_path in REAL_SHAPES:
        from transformers import AutoConfig

        model_type, shapes = REAL_SHAPES[model_path]
        AutoConfig.for_model(model_type, **shapes).save_pretrained(out)
        # validation reads config.json alone, but refuses a folder without safetensors weights: a placeholder
        save_file({"placeholder": torch.zeros(1)}, out / "model.safetensors")
        build_tokenizer().save_pretrained(out)
        return out
    # another recipe's artifact (demo-gpu-w4a4kv4 starts from demo-gpu's teacher, its -rl recipe from a
    # student of it): a model of demo-gpu's widths, quantized (RTN, the recipe's scheme) where the
    # recipe starts from a student
    assert model_path.startswith("artifacts/demo-gpu"), f"{model_path}: add its shapes to REAL_SHAPES"
    arch = yaml.safe_load((SHIPPED_DIR / "demo-gpu.yaml").read_text())["model"]["arch"]
    tokenizer = build_tokenizer()
    model = build_model(Qwen3Arch(**arch), tokenizer)
    if any(st.get("init") == "model" for st in raw["stages"].values()):  # rl from model.path's student
        spec = resolve(raw["quant"])
        quantize_rtn(model, spec)
        save_quantized(model, tokenizer, out, spec)
    else:
        save_model(model, tokenizer, out)
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path, monkeypatch, tmp_path):
    """Against a stand-in of the recipe's real base model (so the scheme is checked against its layer
    widths) and the benchmark slices in tests/data (the real files need not be on this machine)."""
    monkeypatch.chdir(ROOT)  # recipes name local paths relative to the project root
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(ROOT / "tests" / "data"))
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if raw["model"].get("path"):
        overrides = [f"model.path={stand_in(raw, tmp_path / 'model')}"]
    recipe = load_recipe(path.relative_to(ROOT), overrides)
    assert recipe.stages and recipe.name


def test_stand_in_is_checked(monkeypatch, tmp_path):
    """The stand-in carries the real widths: SmolLM2's 576 is not a multiple of 128 (refused when the recipe
    asks for exact group sizes)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(ROOT / "tests" / "data"))
    path = SHIPPED_DIR / "smollm2-w3.yaml"
    model = stand_in(yaml.safe_load(path.read_text()), tmp_path / "model")
    with pytest.raises(RecipeError) as e:
        load_recipe(
            path.relative_to(ROOT),
            [f"model.path={model}", "quant.weights.group_size=128", "quant.weights.group_size_policy=exact"],
        )
    assert "128 does not divide in_features 576 (group_size_policy: exact)" in e.value.lines()[0]


@pytest.mark.parametrize("stage_type", SHIPPED)
def test_stage_module_contract(stage_type):
    module = stages.stage_module(stage_type)
    assert isinstance(module.CODE_VERSION, int)
    assert set(module.USES) <= {"seed", "model", "quant", "data"}
    assert callable(module.run)
    # a Config with one schema per value of a key (ptq: per method, a discriminated union; stage_api.VariantConfig)
    # validates into its variants: each of them, as well as the Config, is held to the contract
    for config in {module.Config, *config_classes(module.Config)}:
        assert issubclass(config, StageConfig)
        assert config.model_config.get("extra") == "forbid"
        assert typing.get_args(config.model_fields["type"].annotation) == (stage_type,)
        if hasattr(module, "PASSTHROUGH"):
            assert module.PASSTHROUGH in config.model_fields
    headline = getattr(module, "HEADLINE", None)
    assert headline is None or isinstance(headline, str) or all(isinstance(k, str) for k in headline)


FINGERPRINTS = ROOT / "tests" / "data" / "shipped_fingerprints.json"


def stage_fingerprints(path: Path, model_dir: Path) -> dict[str, str]:
    """Each stage's fingerprint, less its inputs' (which hash the base model folder, here a stand-in): what the
    stage's own config (as `result_config` reads it), its recipe sections and its CODE_VERSION hash to. The
    model section is the recipe's own text, since the stand-in's path and files are not the real model's."""
    from pipeline.engine.stage_api import result_config
    from pipeline.engine.store import fingerprint

    raw = yaml.safe_load(path.read_text())
    overrides = [f"model.path={stand_in(raw, model_dir)}"] if raw["model"].get("path") else []
    recipe = load_recipe(path.relative_to(ROOT), overrides)
    out = {}
    for name, config in recipe.stages.items():
        module = recipe.modules[name]
        sections = {s: raw["model"] if s == "model" else recipe.section(s) for s in module.USES}
        out[name] = fingerprint(
            config.type,
            result_config(type(config), config.model_dump(mode="json")),
            sections,
            recipe.refs(name),
            module.CODE_VERSION,
        )
    return out


def test_refactors_keep_the_fingerprints_of_shipped_stages(monkeypatch, tmp_path):
    """A change of layout or of how a config is declared must not re-run anyone's finished stages: every shipped
    recipe's stages hash as recorded. A change that alters a stage's output bumps its CODE_VERSION and this file,
    rewritten with REASONING_QAT_WRITE_FINGERPRINTS=1 (and says so in its commit)."""
    import json
    import os

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("REASONING_QAT_BENCHMARKS", str(ROOT / "tests" / "data"))
    now = {p.name: stage_fingerprints(p, tmp_path / p.stem) for p in RECIPES}
    if os.environ.get("REASONING_QAT_WRITE_FINGERPRINTS"):
        FINGERPRINTS.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    assert now == json.loads(FINGERPRINTS.read_text())
