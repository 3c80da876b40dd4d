"""Loading is closed: custom code runs only when the recipe trusts it and stdin is never read; pickled
weights are never unpickled; a stage folder whose files no longer match its manifest is refused; a
model.path that holds no usable model is one line at validate time. Each refusal: exit 2, one line."""
import builtins
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
import yaml
from safetensors.torch import save_file
from transformers import AutoConfig

import tiny_lm
from pipeline.models import CustomCodeRefused, check_model_dir, load_model, load_tokenizer, save_model
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.io import FORMAT, FORMAT_VERSION, QUANT_CONFIG, save_quantized
from pipeline.quant.scheme import QuantSpec
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]
W4_CHANNEL = QuantSpec.model_validate({"weights": {"num_bits": 4, "group_size": None, "symmetric": True}})
EVIL_CODE = """
open({marker!r}, "w").write("custom code ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil_thing"
"""


@pytest.fixture
def no_prompt(monkeypatch):
    """Fails the test if anything calls input(); transformers' [y/N] prompt does."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    yield
    assert asked == [], "something prompted on stdin"


def _evil_dir(path: Path, marker: Path, layout: str = "plain") -> Path:
    """A model folder whose config and tokenizer load only through its own evil.py, which writes `marker`."""
    path.mkdir(parents=True)
    config = {"model_type": "evil_thing",
              "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    if layout == "compressed-tensors":
        config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (path / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    if layout == "ours":
        record = {"format": FORMAT, "version": FORMAT_VERSION, "spec": W4_CHANNEL.model_dump(mode="json"),
                  "modules": []}
        (path / QUANT_CONFIG).write_text(json.dumps(record))
    return path


def _recipe(tmp_path: Path, model: dict, stages: dict | None = None) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": model,
                                      "stages": stages or {"ptq": {"type": "ptq", "method": "rtn"}}}))
    return recipe


def _one_line(code: int, stderr: str, expected: str) -> None:
    assert code == 2 and stderr.strip() == expected, stderr


# -- 1. custom code -------------------------------------------------------------------------------

def test_the_evil_folder_does_run_its_code_when_trusted(tmp_path, monkeypatch):
    """The fixture is a real attack: with trust_remote_code on, loading its config runs evil.py."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    evil = _evil_dir(tmp_path / "evil", marker)
    assert check_model_dir(evil, "model.path", trust_remote_code=True) == str(evil)
    assert marker.read_text() == "custom code ran"


@pytest.mark.parametrize("layout", ["plain", "ours", "compressed-tensors"])
def test_loaders_refuse_custom_code_without_asking(tmp_path, no_prompt, layout):
    marker = tmp_path / "marker"
    evil = _evil_dir(tmp_path / "evil", marker, layout)
    with pytest.raises(CustomCodeRefused) as e:
        load_model(evil)  # quantized layouts go through pipeline.quant.io.load_quantized
    assert e.value.where == "model.path" and "needs custom code (auto_map)" in e.value.message
    with pytest.raises(CustomCodeRefused):
        load_tokenizer(evil)
    assert not marker.exists()


def test_a_call_that_leaves_trust_unset_refuses_instead_of_prompting(tmp_path, no_prompt):
    """transformers prompts when trust_remote_code is None; once pipeline.models is imported it refuses."""
    marker = tmp_path / "marker"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoConfig.from_pretrained(_evil_dir(tmp_path / "evil", marker))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["validate", "eval", "export"])
def test_cli_refuses_custom_code_in_one_line(tmp_path, run_cli, no_prompt, command):
    marker = tmp_path / "marker"
    evil = _evil_dir(tmp_path / "evil", marker, "ours")
    argv = {"validate": ["validate", _recipe(tmp_path, {"path": str(evil)})],
            "eval": ["eval", evil, "--limit", "1"],
            "export": ["export", evil, "--out", tmp_path / "out"]}[command]
    code, _, stderr = run_cli(*argv)
    where, allow = {"validate": ("model.path", "set model.trust_remote_code: true"),
                    "eval": ("MODEL_DIR", "pass --trust-remote-code"),
                    "export": ("stage_dir", "pass --trust-remote-code")}[command]
    _one_line(code, stderr, f"{where}: {evil} needs custom code (auto_map); {allow} to allow it")
    assert not marker.exists() and not (tmp_path / "out").exists()


DRIVER = """
import json, sys
import pipeline.evaluate, pipeline.quant.export, pipeline.recipe  # import-time warnings of the environment first
from pipeline import cli
for argv in json.loads(sys.argv[1]):
    print("--- " + argv[0], file=sys.stderr, flush=True)
    print(json.dumps({argv[0]: cli.main(argv)}), flush=True)
print(json.dumps({"stdin left": sys.stdin.read()}))
"""


def test_cli_processes_with_y_on_stdin_refuse_and_leave_stdin_unread(tmp_path):
    """The three commands in one real process (one interpreter start instead of three), stdin a pipe
    holding "y\\n": each exits 2 with one line, the marker is never written, and "y\\n" is still unread."""
    marker = tmp_path / "marker"
    evil = _evil_dir(tmp_path / "evil", marker, "ours")
    commands = [["validate", str(_recipe(tmp_path, {"path": str(evil)}))], ["eval", str(evil), "--limit", "1"],
                ["export", str(evil), "--out", str(tmp_path / "out")]]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], input="y\n", capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert results == [{"validate": 2}, {"eval": 2}, {"export": 2}, {"stdin left": "y\n"}]
    per_command = done.stderr.split("--- ")[1:]
    assert [text.splitlines()[0] for text in per_command] == ["validate", "eval", "export"]
    assert all(len(text.strip().splitlines()) == 2 for text in per_command), done.stderr  # name + one line
    assert all("needs custom code (auto_map)" in text for text in per_command)
    assert not marker.exists() and not (tmp_path / "out").exists()
