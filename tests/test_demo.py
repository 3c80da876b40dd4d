"""The shipped demo recipe end to end through the CLI, at toy sizes: every stage type runs (or is
skipped by its gate), status and report read the result, and the exported checkpoint loads in
stock transformers. The recipe's own sizes are what `reasoning-qat run recipes/demo.yaml` trains."""

import json
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "pipeline" / "recipes" / "demo.yaml"
TOY = [
    "data.testbed.train_size=200",
    "data.testbed.test_size=8",
    "stages.teacher.steps=8",
    "stages.teacher.warmup_steps=1",
    "stages.teacher.batch_size=8",
    "stages.traces.count=16",
    "stages.traces.generation.max_new_tokens=32",
    "stages.ptq.nsamples=8",
    "stages.ptq.seqlen=64",
    "stages.kd_qat.steps=4",
    "stages.kd_qat.batch_size=4",
    "stages.kd_qat.warmup_steps=1",
    "stages.kd_qat.only_correct=false",
    "stages.gate.limit=4",
    "stages.gate.generation.max_new_tokens=32",
    "stages.gate.min_accuracy=1.0",
    "stages.rl.steps=1",
    "stages.rl.batch_size=4",
    "stages.rl.num_generations=2",
    "stages.rl.count=4",
    "stages.rl.max_completion_length=16",
    *[
        f"stages.{s}.{k}"
        for s in ("teacher_eval", "ptq_eval", "eval")
        for k in ("limit=4", "generation.max_new_tokens=32")
    ],
]


def cli(*args):
    sets = [a for s in TOY for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args, *sets],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )


def test_demo_recipe_runs_every_stage_type_and_reports(tmp_path):
    art = tmp_path / "art"
    run = cli("run", DEMO, "--artifacts", art)
    assert run.returncode == 0, run.stderr[-3000:]

    status = json.loads(cli("status", DEMO, "--artifacts", art, "--json").stdout)
    states = {s["name"]: (s["type"], s["state"]) for s in status["stages"]}
    assert {t for t, _ in states.values()} == {"sft", "eval", "traces", "ptq", "kd_qat", "gate", "rl", "export"}
    # an 8-step student does not solve all 4 gate problems: the gate (min_accuracy 1.0) skips RL
    assert states["rl"] == ("rl", "skipped")
    assert all(state == "complete" for name, (_, state) in states.items() if name != "rl")
    export = json.loads((art / "demo" / "export" / "manifest.json").read_text())
    assert export["input_stages"] == {"model": "kd_qat"}  # the last stage that ran

    report = cli("report", DEMO, "--artifacts", art)
    assert report.returncode == 0, report.stderr[-2000:]
    out = art / "demo" / "report"
    assert {"report.md", "report.json", "training.png", "accuracy.png"} <= {p.name for p in out.iterdir()}
    rows = {r["stage"]: r for r in json.loads((out / "report.json").read_text())["stages"]}
    assert rows["eval"]["of"] == "export" and 0.0 <= rows["eval"]["metrics"]["accuracy"] <= 1.0
    assert all(rows[s]["metrics"]["perplexity"] > 1.0 for s in ("teacher_eval", "ptq_eval", "eval"))
    assert rows["export"]["metrics"]["bits_per_weight"] < 3.5

    # the W3G128 checkpoint is a plain compressed-tensors one: stock transformers loads it
    load = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys; from transformers import AutoModelForCausalLM; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
                "print(m.config.quantization_config.to_dict()['format'])"
            ),
            str(art / "demo" / "export" / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert load.returncode == 0, load.stderr[-2000:]
    assert load.stdout.strip().endswith("pack-quantized")
