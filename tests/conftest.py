"""Shared fixtures: test-only stage types registered in the closed registry, recipe files, the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import fake_gate
import fake_make
import stages
from pipeline import cli

TINY_MODEL = {
    "arch": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
    },
    "dtype": "float32",
}


@pytest.fixture
def fake_stages(monkeypatch):
    """Register `make` (a new type) and a fake `gate` in the registry for this test; yields `make`."""
    monkeypatch.setattr(stages, "STAGE_TYPES", (*stages.STAGE_TYPES, "make"))
    monkeypatch.setitem(sys.modules, "stages.make", fake_make)
    monkeypatch.setitem(sys.modules, "stages.gate", fake_gate)
    fake_make.calls.clear()
    yield fake_make
    fake_make.calls.clear()


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(stages, **top_level) -> path of a recipe YAML in tmp_path."""

    def write(stage_map: dict, name: str = "t", **top) -> Path:
        recipe = {"name": name, "seed": 0, "model": TINY_MODEL, **top, "stages": stage_map}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `reasoning-qat` in this process."""

    def invoke(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke
