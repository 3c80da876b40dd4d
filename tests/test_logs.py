"""pipeline.engine.logs through the CLI: a GPTQ ptq run shows our progress lines and none of llmcompressor's or
DeepSpeed's chatter, an export and its eval none of compressed-tensors' progress bars; --verbose brings them back."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.engine.logs import QUIET_ENV
from quant_tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
CHATTER = ("METRIC", "No accelerator available", "Setting accelerator to CPU")
BARS = ("Compressing model", "Applying quantization config", "Dispatching model", "Decompressing model")
"""compressed-tensors' tqdm bars: saving an export, and transformers loading it (the last two pass disable=False)."""


def _tiny_recipe(tmp_path: Path, quant, stages: dict) -> Path:
    """A recipe of `stages` on a tiny saved model, the test benchmarks as its data."""
    recipe = tmp_path / "r.yaml"
    model = {"path": str(save_tiny(tmp_path / "model")), "dtype": "float32"}
    data = {"task": "gsm8k", "benchmarks_dir": str(ROOT / "tests" / "data")}
    recipe.write_text(
        yaml.safe_dump({"name": "r", "seed": 0, "model": model, "quant": quant, "data": data, "stages": stages})
    )
    return recipe


def _run(recipe: Path, artifacts: Path, *extra: str) -> subprocess.CompletedProcess:
    # without the settings an in-process CLI call of another test left in this process's environment
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env |= {"PYTHONPATH": str(ROOT), "REASONING_QAT_PROGRESS_EVERY": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--artifacts", str(artifacts), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_gptq_run_is_quiet_unless_verbose(tmp_path):
    ptq = {
        "type": "ptq",
        "model": "model",
        "method": "gptq",
        "calibration_source": "generic",
        "nsamples": 2,
        "seqlen": 32,
        "sqnr_samples": 1,
    }
    recipe = _tiny_recipe(tmp_path, {"weights": {"num_bits": 3, "group_size": 128, "symmetric": False}}, {"ptq": ptq})
    quiet = _run(recipe, tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    both = quiet.stdout + quiet.stderr
    assert not [c for c in CHATTER if c in both]
    assert "progress: gptq: layers 2/2" in quiet.stderr
    verbose = _run(recipe, tmp_path / "b", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "METRIC" in verbose.stdout + verbose.stderr and "No accelerator available" in verbose.stdout + verbose.stderr


def test_export_and_its_eval_show_no_library_progress_bars_unless_verbose(tmp_path):
    ppl = {"type": "eval", "model": "export", "bench": "gsm8k", "limit": 1, "generate": False, "perplexity": True}
    stages = {
        "rtn": {"type": "ptq", "method": "rtn", "nsamples": 2, "seqlen": 32, "sqnr_samples": 0},
        "export": {"type": "export", "model": "rtn"},
        "export_eval": ppl,
    }
    recipe = _tiny_recipe(tmp_path, "w3g128", stages)
    quiet = _run(recipe, tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    assert not [bar for bar in BARS if bar in quiet.stdout + quiet.stderr], quiet.stderr
    assert "stages.export_eval: done" in quiet.stderr
    verbose = _run(recipe, tmp_path / "b", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert [bar for bar in BARS if bar in verbose.stderr] == list(BARS)
