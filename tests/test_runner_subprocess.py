"""The runner in real processes with the real `sft` stage: kill -9 and resume, two ranks under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _sft_recipe(path: Path) -> Path:
    path.write_text("""\
name: tiny
seed: 0
model:
  arch: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
         num_key_value_heads: 1, head_dim: 16}
  dtype: float32
data:
  task: testbed
  testbed: {train_size: 64, test_size: 8}
stages:
  teacher: {type: sft, steps: 150, batch_size: 4, warmup_steps: 2, checkpoint_every: 10}
""")
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, run_cli):
    pytest.importorskip("stages.sft")
    recipe = _sft_recipe(tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    # the reference run goes alongside, in its own process with the same settings
    reference = subprocess.Popen(_cli("run", str(recipe), "--artifacts", str(clean)), env=env, cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cli("run", str(recipe), "--artifacts", str(killed)), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "tiny" / ".partial" / "teacher" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tiny" / "teacher").exists()
    step = int(sorted(checkpoints.glob("step-*"))[-1].name.split("-")[1])
    assert 10 <= step < 150

    code, out, _ = run_cli("status", recipe, "--artifacts", killed, "--json")
    assert code == 0
    assert json.loads(out)["stages"][0] == {"name": "teacher", "type": "sft", "state": "pending",
                                            "reason": f"never run; resumes from step {step}"}

    resumed = subprocess.run(_cli("run", str(recipe), "--artifacts", str(killed)), env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from the checkpoint at step {step}" in (killed / "tiny" / "run.log").read_text()
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    a = load_file(killed / "tiny" / "teacher" / "model" / "model.safetensors")
    b = load_file(clean / "tiny" / "teacher" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / "tiny" / ".partial").exists()


def test_two_processes_share_one_run(tmp_path, run_cli):
    """torchrun (as `accelerate launch` does) with 2 CPU ranks: one lock, one writer, both finish."""
    pytest.importorskip("stages.sft")
    recipe = _sft_recipe(tmp_path / "tiny.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline.cli",
               "run", str(recipe), "--artifacts", str(tmp_path / "art"), "--set", "stages.teacher.steps=8"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "art" / "tiny" / "teacher" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 8
    log = (tmp_path / "art" / "tiny" / "run.log").read_text()
    assert log.count("stages.teacher: running (never run)") == 1  # only the main rank writes run.log
    assert "in use by another run" not in done.stdout + done.stderr

    code, out, _ = run_cli("status", recipe, "--artifacts", tmp_path / "art", "--json",
                           "--set", "stages.teacher.steps=8")
    assert code == 0 and json.loads(out)["stages"][0]["state"] == "complete"
