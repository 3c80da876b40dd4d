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
from pipeline.engine.store import Store
from pipeline.loading import CustomCodeRefused
from pipeline.models import check_model_dir, load_model, load_tokenizer, save_model
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.formats.layout import FORMAT, FORMAT_VERSION, QUANT_CONFIG
from pipeline.quant.scheme import QuantSpec

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
    config = {
        "model_type": "evil_thing",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }
    if layout == "compressed-tensors":
        config["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    )
    (path / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    if layout == "ours":
        record = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": W4_CHANNEL.model_dump(mode="json"),
            "modules": [],
        }
        (path / QUANT_CONFIG).write_text(json.dumps(record))
    return path


def _recipe(tmp_path: Path, model: dict, stage: dict | None = None, **top) -> Path:
    recipe = tmp_path / "r.yaml"
    stage = stage or {"type": "ptq", "method": "rtn"}
    recipe.write_text(yaml.safe_dump({"name": "r", "model": model, **top, "stages": {"s": stage}}))
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
        load_model(evil)  # quantized layouts go through pipeline.quant.formats.io.load_quantized
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
    argv = {
        "validate": ["validate", _recipe(tmp_path, {"path": str(evil)})],
        "eval": ["eval", evil, "--limit", "1"],
        "export": ["export", evil, "--out", tmp_path / "out"],
    }[command]
    code, _, stderr = run_cli(*argv)
    where, allow = {
        "validate": ("model.path", "set model.trust_remote_code: true"),
        "eval": ("MODEL_DIR", "pass --trust-remote-code"),
        "export": ("stage_dir", "pass --trust-remote-code"),
    }[command]
    _one_line(code, stderr, f"{where}: {evil} needs custom code (auto_map); {allow} to allow it")
    assert not marker.exists() and not (tmp_path / "out").exists()


DRIVER = """
import json, sys
# import-time warnings of the environment first
import pipeline.evaluation, pipeline.quant.formats.export, pipeline.engine.recipe
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
    commands = [
        ["validate", str(_recipe(tmp_path, {"path": str(evil)}))],
        ["eval", str(evil), "--limit", "1"],
        ["export", str(evil), "--out", str(tmp_path / "out")],
    ]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        input="y\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert results == [{"validate": 2}, {"eval": 2}, {"export": 2}, {"stdin left": "y\n"}]
    per_command = done.stderr.split("--- ")[1:]
    assert [text.splitlines()[0] for text in per_command] == ["validate", "eval", "export"]
    assert all(len(text.strip().splitlines()) == 2 for text in per_command), done.stderr  # name + one line
    assert all("needs custom code (auto_map)" in text for text in per_command)
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- 2. corrupted stage folders --------------------------------------------------------------------


def _stage(tmp_path: Path, quantized: bool) -> Path:
    """A stage directory committed by the store (manifest with sha256s): a tiny model, quantized or not."""
    store = Store(tmp_path / "artifacts", "r")
    store.prepare("s", "fingerprint", {})
    model, tokenizer = tiny_lm.model(), tiny_lm.tokenizer()
    if quantized:
        quantize_rtn(model, W4_CHANNEL)
        save_quantized(model, tokenizer, store.out_dir("s") / "model", W4_CHANNEL)
    else:
        save_model(model, tokenizer, store.out_dir("s") / "model")
    store.commit("s", {"status": "complete"})
    return store.stage_dir("s")


def _flip_tail(path: Path, n: int = 4096) -> None:
    """Invert the last `n` bytes (tensor data; the safetensors header is at the front): same size, new sha256."""
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(b ^ 0xFF for b in data[-n:])
    path.write_bytes(bytes(data))


def _corrupt_message(where: str, stage: Path) -> str:
    return (
        f"{where}: {stage}: model/model.safetensors changed on disk since it was written "
        "(checked against its manifest.json); re-run the stage that wrote it"
    )


@pytest.mark.parametrize("inner", [False, True], ids=["stage-dir", "its-model-dir"])
def test_eval_refuses_a_corrupted_stage(tmp_path, run_cli, capsys, inner):
    stage = _stage(tmp_path, quantized=False)
    capsys.readouterr()  # the save's progress bar
    target = stage / "model" if inner else stage
    assert check_model_dir(target, "MODEL_DIR") == str(stage / "model")  # intact: accepted
    _flip_tail(stage / "model" / "model.safetensors")
    code, _, stderr = run_cli("eval", target, "--limit", "1", "--out", tmp_path / "samples.jsonl")
    _one_line(code, stderr, _corrupt_message("MODEL_DIR", stage))
    assert not (tmp_path / "samples.jsonl").exists()


def test_export_refuses_a_corrupted_quantized_stage(tmp_path, run_cli, capsys):
    stage = _stage(tmp_path, quantized=True)
    capsys.readouterr()
    _flip_tail(stage / "model" / "model.safetensors")
    code, _, stderr = run_cli("export", stage, "--out", tmp_path / "ckpt")
    _one_line(code, stderr, _corrupt_message("stage_dir", stage))
    assert not (tmp_path / "ckpt").exists()


def test_a_recipe_on_a_corrupted_stage_fails_validation(tmp_path, run_cli, capsys):
    """A run from another recipe's quantized stage (model.path) checks it before anything runs."""
    stage = _stage(tmp_path, quantized=True)
    capsys.readouterr()
    # a quantized base model is evaluated (a ptq stage would be refused: it needs a full-precision model)
    recipe = _recipe(
        tmp_path,
        {"path": str(stage)},
        {"type": "eval", "model": "model", "bench": "testbed", "limit": 2},
        quant=W4_CHANNEL.model_dump(mode="json"),
    )
    assert run_cli("validate", recipe)[0] == 0  # intact: accepted
    _flip_tail(stage / "model" / "model.safetensors")
    code, _, stderr = run_cli("run", recipe, "--artifacts", tmp_path / "out")
    _one_line(code, stderr, _corrupt_message("model.path", stage))
    assert not (tmp_path / "out").exists()


# -- 3. pickled weights ----------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _pickle_dir(tmp_path: Path, marker: Path, quantized: bool) -> Path:
    """A model folder (config, tokenizer) whose only weights are a pytorch_model.bin that writes `marker`."""
    path = tmp_path / "pickled"
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    if quantized:  # as a compressed-tensors export's config says
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {},
        }
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_pickle_does_run_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads((_pickle_dir(tmp_path, marker, quantized=False) / "pytorch_model.bin").read_bytes())
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "compressed-tensors"])
def test_pickle_weights_are_refused_everywhere(tmp_path, run_cli, capsys, monkeypatch, quantized):
    marker = tmp_path / "marker"
    folder = _pickle_dir(tmp_path, marker, quantized)
    capsys.readouterr()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    expected = (
        f"{folder} has pickle weights only (pytorch_model.bin); they are never loaded, save the model as safetensors"
    )
    argv = ["export", folder, "--out", tmp_path / "ckpt"] if quantized else ["eval", folder, "--limit", "1"]
    code, _, stderr = run_cli(*argv)
    _one_line(code, stderr, f"{'stage_dir' if quantized else 'MODEL_DIR'}: {expected}")
    code, _, stderr = run_cli("validate", _recipe(tmp_path, {"path": str(folder)}))
    _one_line(code, stderr, f"model.path: {expected}")
    with pytest.raises(OSError, match="model.safetensors"):  # the loader itself reads safetensors only
        load_model(folder)
    assert loads == [] and not marker.exists() and not (tmp_path / "ckpt").exists()


# -- 4. bad model paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, problem",
    [
        ("file", " is a file, not a model directory"),
        ("empty", " holds no model (no config.json in it or in its model/ folder)"),
        ("config-only", " has a config.json but no weights (*.safetensors)"),
        ("bad-json", "/config.json is not valid JSON"),
        ("unknown-type", ": The checkpoint you are trying to load has model type `no_such_type`"),
    ],
)
def test_bad_model_path_is_one_line_at_validate_and_run_writes_nothing(tmp_path, run_cli, case, problem):
    path = tmp_path / "m"
    if case == "file":
        path.write_text("not a model")
    else:
        path.mkdir()
    if case == "config-only":
        (path / "config.json").write_text(tiny_lm.model().config.to_json_string())
    if case in ("bad-json", "unknown-type"):
        (path / "config.json").write_text("{" if case == "bad-json" else '{"model_type": "no_such_type"}')
        save_file({"w": torch.zeros(1)}, path / "model.safetensors")
        tiny_lm.tokenizer().save_pretrained(path)  # the folder's one problem is its config
    recipe = _recipe(tmp_path, {"path": str(path)})
    code, _, stderr = run_cli("validate", recipe)
    assert code == 2 and stderr.startswith(f"model.path: {path}{problem}") and len(stderr.splitlines()) == 1, stderr
    code, _, stderr = run_cli("run", recipe, "--artifacts", tmp_path / "out")
    assert code == 2 and stderr.startswith("model.path: ") and not (tmp_path / "out").exists()
