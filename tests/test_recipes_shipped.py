"""Every shipped recipe validates; every shipped stage module keeps the stage contract."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

import stages
from pipeline.models import Qwen3Arch, build_model, save_model
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.io import save_quantized
from pipeline.quant.scheme import resolve
from pipeline.recipe import load_recipe
from pipeline.stage_api import StageConfig
from pipeline.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SHIPPED = [t for t in stages.STAGE_TYPES if (ROOT / "stages" / f"{t}.py").is_file()]


def test_recipes_exist():
    assert ROOT / "recipes" / "demo.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # recipes name local paths relative to the project root
    overrides = []
    raw = yaml.safe_load(path.read_text())
    model_path = (raw.get("model") or {}).get("path")
    if model_path and not Path(model_path).exists():
        # another recipe's artifact (demo-gpu-w4a4kv4 starts from demo-gpu's teacher, its -rl recipe from
        # a student of it): stand in a model of demo-gpu's widths, so the scheme is checked against the
        # real layer sizes, quantized (RTN, the recipe's scheme) where the recipe starts from a student
        arch = yaml.safe_load((ROOT / "recipes" / "demo-gpu.yaml").read_text())["model"]["arch"]
        tokenizer = build_tokenizer()
        model = build_model(Qwen3Arch(**arch), tokenizer)
        if any(st.get("init") == "model" for st in raw["stages"].values()):  # rl from model.path's student
            spec = resolve(raw["quant"])
            quantize_rtn(model, spec)
            save_quantized(model, tokenizer, tmp_path / "model", spec)
        else:
            save_model(model, tokenizer, tmp_path / "model")
        overrides = [f"model.path={tmp_path / 'model'}"]
    recipe = load_recipe(path.relative_to(ROOT), overrides)
    assert recipe.stages and recipe.name


@pytest.mark.parametrize("stage_type", SHIPPED)
def test_stage_module_contract(stage_type):
    module = stages.stage_module(stage_type)
    assert isinstance(module.CODE_VERSION, int)
    assert set(module.USES) <= {"seed", "model", "quant", "data"}
    assert callable(module.run)
    assert issubclass(module.Config, StageConfig)
    assert module.Config.model_config.get("extra") == "forbid"
    assert typing.get_args(module.Config.model_fields["type"].annotation) == (stage_type,)
    if hasattr(module, "PASSTHROUGH"):
        assert module.PASSTHROUGH in module.Config.model_fields
    headline = getattr(module, "HEADLINE", None)
    assert headline is None or isinstance(headline, str)
