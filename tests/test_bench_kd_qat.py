"""bench/kd_qat.py under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), as the 8B run on 2 GPUs launches it: both models
partitioned, the step timed, and its MFU counted from the whole models' parameters (a partitioned parameter's numel()
is 0). With the optimizer offloaded too (ZeRO-Offload: DeepSpeedCPUAdam, a C++ op DeepSpeed builds on first use, about
2 minutes here, cached after). Needs deepspeed (not a dependency of the project)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kd_qat", ROOT / "bench" / "kd_qat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_parameters(bench) -> tuple[int, int]:
    """(student, teacher) parameters of the bench's tiny shape, built whole here, the student quantized as the bench
    quantizes it."""
    from pipeline.quant.apply import quantize_rtn
    from pipeline.quant.scheme import QuantSpec

    student, teacher = bench.build("tiny", 0, "cpu"), bench.build("tiny", 1, "cpu")
    quantize_rtn(student, QuantSpec.model_validate("w3g128"))
    return sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters())


@pytest.mark.parametrize("offload", [False, True], ids=["zero3", "zero3-offload-optimizer"])
def test_tiny_step_under_zero3_on_two_cpu_ranks_reports_tokens_per_s_and_the_mfu_of_the_whole_models(tmp_path, offload):
    pytest.importorskip("deepspeed")
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}  # every parameter partitioned
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    batch_keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps({"zero_optimization": zero, **dict.fromkeys((*batch_keys, "gradient_clipping"), "auto")})
    )
    # `accelerate launch` gives one process on a CPU-only machine unless told how many and where to meet
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file"]
    launch += [str(config), "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port())]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "kd.json"
    bench_args = [str(ROOT / "bench" / "kd_qat.py"), "--tiny", "--ours-only", "--out", str(out)]
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([*launch, *bench_args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads(out.read_text())
    assert (result["processes"], result["distributed"]) == (2, "DistributedType.DEEPSPEED")
    ours = result["ours"]
    assert ours["tokens_per_s"] > 0 and ours["estimate_gib"] > 0
    bench = _bench()
    n_student, n_teacher = _tiny_parameters(bench)
    # per process: the student's forward and backward (6·N·T) and the teacher's forward (2·N·T), whole models
    expected = (6 * n_student + 2 * n_teacher) * ours["tokens_per_s"] / bench.H200_BF16_FLOPS / 2
    assert ours["mfu"] == pytest.approx(expected, rel=1e-9)


def test_profile_writes_the_operators_of_the_timed_steps_and_a_trace(tmp_path, monkeypatch):
    """--profile: the profiler records the timed steps only (one optimizer step each, none of the warm-up one), the
    table lists the operators with their call counts, and the trace is gzipped Chrome-trace JSON."""
    import gzip

    bench = _bench()
    prof = tmp_path / "prof"
    argv = ["kd_qat.py", "--tiny", "--ours-only", "--profile", str(prof)]  # --tiny: 1 warm-up step, 3 timed
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    table = (prof / "ours_ops.txt").read_text()
    assert "# of Calls" in table and "aten::mm" in table
    step_row = next(line for line in table.splitlines() if line.strip().startswith("Optimizer.step#"))
    assert step_row.split()[-1] == "3"  # the three timed steps
    trace = json.loads(gzip.open(prof / "ours_trace.json.gz").read())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert not (prof / "plain_ops.txt").exists()  # --ours-only
