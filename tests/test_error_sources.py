"""scripts/error_sources.py: one row per quantizer setting, zero error where nothing is quantized that the
model's function depends on, and bad input answered in one line with exit code 2."""

import subprocess
import sys
from pathlib import Path

from quant_tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "error_sources.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )


def test_one_row_per_variant_with_error_measured_against_the_full_precision_model(tmp_path):
    model = save_tiny(tmp_path / "model", intermediate_size=128)
    out = run(model, "--problems", "2", "--clip", "0.9")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:44].strip(): line[44:].split() for line in out.stdout.splitlines()[2:]}
    assert len(rows) == 18 and "W4A4KV4, activation clip 0.9" in rows
    flips, sure, kl = rows["W4A4KV4"]
    assert 0 <= float(flips.rstrip("%")) <= 100 and float(kl) > 0  # a random tiny model is still perturbed
    # keys alone, values alone, both and neither are four different models
    kls = {float(rows[name][2]) for name in ("W4", "W4 + keys 4-bit", "W4 + values 4-bit", "W4 + KV4")}
    assert len(kls) == 4


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    out = run(tmp_path / "missing")
    assert out.returncode == 2 and "no such directory" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {testbed: {min_steps: -3}}\n")
    model = save_tiny(tmp_path / "model")
    out = run(model, "--recipe", bad)
    assert out.returncode == 2 and "data section" in out.stderr and "Traceback" not in out.stderr
