"""The command line: subcommands (one module each under pipeline/cli/), error lines and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.engine.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_validate_status_and_run_on_a_recipe(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe({"a": {"type": "make", "value": 2}, "b": {"type": "make", "src": "a"}})
    code, out, _ = run_cli("validate", recipe)
    assert code == 0 and out.strip() == f"{recipe}: ok: 2 stages: a (make), b (make)"
    code, out, _ = run_cli("status", recipe, "--artifacts", tmp_path / "art", "--json")
    assert code == 0 and json.loads(out) == {
        "stages": [
            {"name": "a", "type": "make", "state": "pending", "reason": "never run"},
            {"name": "b", "type": "make", "state": "pending", "reason": "never run"},
        ]
    }
    assert not (tmp_path / "art").exists()  # status writes nothing
    code, out, _ = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert code == 0
    rows = [line.split("│")[1:5] for line in out.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in row[:2]] + [row[3].strip()] for row in rows] == [
        ["a", "ran", "value 2"],
        ["b", "ran", "value 1"],
    ]
    code, out, _ = run_cli("status", recipe, "--artifacts", tmp_path / "art")
    assert code == 0 and out.count("complete") == 2 and "up to date" in out


def test_unknown_stage_for_from_and_only(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe({"teacher": {"type": "make"}})
    code, _, err = run_cli("run", recipe, "--artifacts", tmp_path / "art", "--from", "techer")
    assert code == 2 and err.strip() == "--from: no stage named 'techer' (did you mean 'teacher'?)"
    code, _, err = run_cli("run", recipe, "--artifacts", tmp_path / "art", "--only", "x")
    assert code == 2 and err.strip() == "--only: no stage named 'x'"
    assert not (tmp_path / "art").exists()
    with pytest.raises(SystemExit) as e:  # argparse: --from and --only exclude each other
        cli.main(["run", str(recipe), "--from", "teacher", "--only", "teacher"])
    assert e.value.code == 2


def test_subcommand_module_gets_its_arguments_and_input_errors_are_one_line(monkeypatch, run_cli):
    seen = {}

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model_dir")
        parser.add_argument("--limit", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        seen.update(vars(args))
        if args.limit < 0:
            raise InputError("--limit", "must be >= 0")
        return 0

    fake = types.ModuleType("fake_eval")
    fake.HELP, fake.add_arguments, fake.run = "eval", add_arguments, run
    monkeypatch.setitem(sys.modules, "fake_eval", fake)
    monkeypatch.setitem(cli.COMMANDS, "eval", "fake_eval")
    assert run_cli("eval", "m", "--limit", "3")[0] == 0
    assert seen["model_dir"] == "m" and seen["limit"] == 3
    code, out, err = run_cli("eval", "m", "--limit", "-1")
    assert code == 2 and err.strip() == "--limit: must be >= 0" and "Traceback" not in out + err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_its_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: reasoning-qat {command}")


def test_eval_decoding_flags_are_generation_spec_fields():
    """Every GenerationSpec field is an eval flag with the field's default; a value the spec refuses names the flag."""
    from pipeline.cli import eval as eval_command
    from pipeline.generate import GenerationSpec

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    args = parser.parse_args(["m"])
    assert eval_command.spec_from_args(args) == GenerationSpec()
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.dest in GenerationSpec.model_fields}
    assert flags.keys() == GenerationSpec.model_fields.keys()
    assert flags["num_samples"] == "--samples" and flags["top_p"] == "--top-p"
    with pytest.raises(InputError, match="^--top-p: "):
        eval_command.spec_from_args(parser.parse_args(["m", "--top-p", "2"]))


def test_help_and_version_import_no_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import sys\nfrom pipeline import cli\nfor argv in (['--help'], ['--version'], ['run', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False"


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0 and "--from STAGE" in done.stdout and "--dry-run" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "nonsense"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr
    assert not list(tmp_path.iterdir())


def test_version_comes_from_the_installed_package(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:  # argparse's version action prints and exits
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"reasoning-qat {version('reasoning-qat')}"
