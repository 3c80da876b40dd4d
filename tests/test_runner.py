"""The runner through the CLI: skipping, staleness and its reasons, --from/--only/--force/--dry-run,
corrupted artifacts, gates and passthrough, failures, interrupts and resume, the lock.

Stage types here are the test-only `make` and `gate` (tests/fake_make.py, tests/fake_gate.py); the
tests that need real processes and the real `sft` stage (kill -9, two ranks) are in
test_runner_subprocess.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

CHAIN = {
    "a": {"type": "make", "value": 3},
    "b": {"type": "make", "value": 4, "src": "a"},
    "c": {"type": "make", "value": 5, "src": "b"},
}


def states(run_cli, recipe, art, *extra):
    code, out, err = run_cli("status", recipe, "--artifacts", art, "--json", *extra)
    assert code == 0, err
    return {row["name"]: (row["state"], row["reason"]) for row in json.loads(out)["stages"]}


@pytest.fixture
def chain(fake_stages, write_recipe, tmp_path, run_cli):
    """A completed run of a -> b -> c; returns (recipe path, artifacts root)."""
    recipe, art = write_recipe(CHAIN), tmp_path / "art"
    code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 0, err
    assert fake_stages.calls == ["a", "b", "c"]
    fake_stages.calls.clear()
    return recipe, art


def test_run_writes_stages_and_a_second_run_skips_them(chain, fake_stages, run_cli):
    recipe, art = chain
    base = art / "t"
    assert (base / "c" / "out.txt").read_text() == "5<4<3"
    manifest = json.loads((base / "c" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["type"] == "make"
    assert manifest["metrics"] == {"value": 5.0, "resumed_from": 0.0}
    assert manifest["config"]["value"] == 5 and manifest["code_version"] == 1
    assert manifest["inputs"]["src"] == json.loads((base / "b" / "manifest.json").read_text())["fingerprint"]
    assert manifest["files"]["out.txt"]["size"] == 5 and len(manifest["files"]["out.txt"]["sha256"]) == 64
    assert set(manifest["files"]) == {"out.txt", "sub/start.txt"}
    assert not (base / ".partial").exists() and (base / "run.log").is_file()
    assert "stages.c: wrote 5<4<3" in (base / "run.log").read_text()

    assert states(run_cli, recipe, art) == {s: ("complete", "up to date") for s in "abc"}
    code, out, _ = run_cli("run", recipe, "--artifacts", art)
    assert code == 0 and fake_stages.calls == []
    assert "up to date" in out


def test_config_change_makes_that_stage_and_downstream_stale(chain, fake_stages, run_cli):
    recipe, art = chain
    got = states(run_cli, recipe, art, "--set", "stages.b.lr=1e-5")
    assert got["a"] == ("complete", "up to date")
    assert got["b"] == ("stale", "config changed: lr 0.0003 -> 1e-05")
    assert got["c"][0] == "stale" and got["c"][1].startswith("input 'src' changed")
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.b.lr=1e-5")
    assert code == 0, err
    assert fake_stages.calls == ["b", "c"]
    assert states(run_cli, recipe, art, "--set", "stages.b.lr=1e-5") == {s: ("complete", "up to date") for s in "abc"}
    assert states(run_cli, recipe, art)["b"] == ("stale", "config changed: lr 1e-05 -> 0.0003")


def test_an_operational_key_changes_no_fingerprint(chain, fake_stages, run_cli):
    """`checkpoint_every` (marked OPERATIONAL) cannot change what a stage writes: nothing re-runs, and the
    fingerprint of a stage at the default is what it was before the key was marked (the whole config)."""
    from pipeline.engine.store import fingerprint

    recipe, art = chain
    assert states(run_cli, recipe, art, "--set", "stages.b.checkpoint_every=7") == {
        s: ("complete", "up to date") for s in "abc"
    }
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.b.checkpoint_every=7")
    assert code == 0 and fake_stages.calls == [], err

    a = json.loads((art / "t" / "a" / "manifest.json").read_text())
    assert a["config"]["checkpoint_every"] == 0  # the default: hashed as the whole config always was
    before_added_keys = {k: v for k, v in a["config"].items() if k != "flavour"}  # see the ADDED_KEY test
    assert a["fingerprint"] == fingerprint("make", before_added_keys, {"seed": 0}, {}, 1)


def test_changing_an_operational_key_resumes_from_the_checkpoint(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe({"a": {"type": "make", "steps": 6, "interrupt_at": 3, "checkpoint_every": 2}})
    art = tmp_path / "art"
    code, _, _ = run_cli("run", recipe, "--artifacts", art)
    assert code == 130
    assert states(run_cli, recipe, art)["a"] == ("pending", "never run; resumes from step 3")
    again = ("--set", "stages.a.checkpoint_every=5")
    assert states(run_cli, recipe, art, *again)["a"] == ("pending", "never run; resumes from step 3")
    code, _, err = run_cli("run", recipe, "--artifacts", art, *again)  # from step 4: interrupt_at is behind it
    assert code == 0, err
    assert (art / "t" / "a" / "sub" / "start.txt").read_text() == "3"
    assert json.loads((art / "t" / "a" / "manifest.json").read_text())["config"]["checkpoint_every"] == 5


def test_artifacts_fingerprinted_before_a_key_was_operational_stay_up_to_date(chain, fake_stages, run_cli):
    """Artifacts written when checkpoint_every was still hashed at its value (here 7) keep their fingerprints;
    the runner compares their parts and hands downstream the fingerprint they recorded."""
    from pipeline.engine.store import fingerprint

    recipe, art = chain
    code, _, _ = run_cli("run", recipe, "--artifacts", art, "--force", "--set", "stages.a.checkpoint_every=7")
    assert code == 0
    upstream = {}
    for name in "abc":  # rewrite the chain as the earlier version would have written it
        path = art / "t" / name / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["inputs"] = {f: upstream[stage] for f, stage in manifest["input_stages"].items()}
        manifest["fingerprint"] = upstream[name] = fingerprint(
            "make", manifest["config"], manifest["sections"], manifest["inputs"], manifest["code_version"]
        )
        path.write_text(json.dumps(manifest))
    a_now = json.loads((art / "t" / "a" / "manifest.json").read_text())
    assert upstream["a"] != fingerprint("make", {**a_now["config"], "checkpoint_every": 0}, {"seed": 0}, {}, 1)
    fake_stages.calls.clear()
    assert states(run_cli, recipe, art) == {s: ("complete", "up to date") for s in "abc"}
    code, _, _ = run_cli("run", recipe, "--artifacts", art)
    assert code == 0 and fake_stages.calls == []
    assert states(run_cli, recipe, art, "--set", "stages.a.value=9")["b"][1].startswith("input 'src' changed")


def test_a_key_added_at_its_default_keeps_earlier_artifacts_up_to_date(chain, fake_stages, run_cli):
    """`flavour` (ADDED_KEY) is left out of the fingerprint at its default: the chain, written as if before the key
    existed, stays up to date whether or not the recipe names the default; another value re-runs that stage."""
    from pipeline.engine.store import fingerprint

    recipe, art = chain
    a = json.loads((art / "t" / "a" / "manifest.json").read_text())
    assert a["config"]["flavour"] == "plain"  # recorded, but hashed as the config was before the key existed
    assert a["fingerprint"] == fingerprint(
        "make", {k: v for k, v in a["config"].items() if k != "flavour"}, {"seed": 0}, {}, 1
    )
    assert states(run_cli, recipe, art, "--set", "stages.b.flavour=plain") == {
        s: ("complete", "up to date") for s in "abc"
    }
    assert states(run_cli, recipe, art, "--set", "stages.b.flavour=spicy")["b"] == (
        "stale",
        "config changed: flavour <unset> -> spicy",
    )


def test_code_version_change_makes_stages_stale(chain, fake_stages, run_cli, monkeypatch):
    recipe, art = chain
    monkeypatch.setattr(fake_stages, "CODE_VERSION", 2)
    got = states(run_cli, recipe, art)
    assert got["a"] == ("stale", "code version 1 -> 2")
    assert got["c"] == ("stale", "code version 1 -> 2")


def test_recipe_section_change_reaches_only_stages_that_use_it(chain, fake_stages, run_cli):
    recipe, art = chain
    got = states(run_cli, recipe, art, "--set", "seed=7")  # `make` declares USES = ("seed",)
    assert got["a"] == ("stale", "recipe section 'seed' changed: value 0 -> 7")
    got = states(run_cli, recipe, art, "--set", "quant.weights.num_bits=4")  # nobody uses quant
    assert all(state == "complete" for state, _ in got.values())


def test_from_reruns_stage_and_downstream(chain, fake_stages, run_cli):
    recipe, art = chain
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--from", "b")
    assert code == 0, err
    assert fake_stages.calls == ["b", "c"]


def test_only_runs_one_stage_and_needs_its_inputs(chain, fake_stages, run_cli):
    recipe, art = chain
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--only", "c")
    assert code == 0, err
    assert fake_stages.calls == ["c"]

    fake_stages.calls.clear()
    before = sorted(p.name for p in (art / "t").iterdir())
    code, out, err = run_cli("run", recipe, "--artifacts", art, "--only", "c", "--set", "stages.b.lr=1e-5")
    assert code == 2 and fake_stages.calls == []
    assert err.strip() == (
        "--only c: input 'src' (stage 'b') is not up to date (config changed: lr 0.0003 -> "
        "1e-05); run it first, or use --from"
    )
    assert sorted(p.name for p in (art / "t").iterdir()) == before

    # after an upstream re-run, downstream knows its input was re-run
    code, _, _ = run_cli("run", recipe, "--artifacts", art, "--only", "a")
    assert code == 0
    assert states(run_cli, recipe, art)["b"] == ("stale", "input 'src' was re-run")


def test_force_reruns_everything(chain, fake_stages, run_cli):
    recipe, art = chain
    code, _, _ = run_cli("run", recipe, "--artifacts", art, "--force")
    assert code == 0 and fake_stages.calls == ["a", "b", "c"]


def test_force_with_from_reruns_that_stage_and_downstream_not_its_upstream(chain, fake_stages, run_cli):
    """`--from b --force`: b and c run again; a, up to date, is not retrained."""
    recipe, art = chain
    code, out, _ = run_cli("run", recipe, "--artifacts", art, "--from", "b", "--force", "--dry-run")
    assert code == 0 and fake_stages.calls == []
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "skip" in lines["a"] and "--force" in lines["b"] and "--force" in lines["c"]
    code, _, _ = run_cli("run", recipe, "--artifacts", art, "--from", "b", "--force")
    assert code == 0 and fake_stages.calls == ["b", "c"]


def test_dry_run_prints_the_plan_and_writes_nothing(fake_stages, write_recipe, tmp_path, run_cli, chain):
    recipe, art = chain
    snapshot = {p: p.stat().st_mtime_ns for p in art.rglob("*")}
    code, out, _ = run_cli("run", recipe, "--artifacts", art, "--dry-run", "--set", "stages.c.value=6")
    assert code == 0 and fake_stages.calls == []
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "skip" in lines["a"] and "up to date" in lines["a"]
    assert "run" in lines["c"] and "config changed: value 5 -> 6" in lines["c"]
    assert {p: p.stat().st_mtime_ns for p in art.rglob("*")} == snapshot

    fresh = tmp_path / "fresh"
    code, out, _ = run_cli("run", recipe, "--artifacts", fresh, "--dry-run")
    assert code == 0 and "never run" in out and not fresh.exists()


def test_corrupted_file_is_detected_warned_and_rerun(chain, fake_stages, run_cli):
    recipe, art = chain
    out_txt = art / "t" / "a" / "out.txt"
    out_txt.write_text("9")  # same size, different bytes: only the sha256 tells
    got = states(run_cli, recipe, art)
    assert got["a"] == ("stale", "out.txt changed on disk since it was written")
    assert got["b"] == ("stale", "input 'src' will re-run (out.txt changed on disk since it was written)")
    code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 0
    assert "stages.a: warning: out.txt changed on disk since it was written; re-running" in err
    assert fake_stages.calls == ["a", "b", "c"]
    assert out_txt.read_text() == "3"

    (art / "t" / "c" / "sub" / "start.txt").unlink()
    assert states(run_cli, recipe, art)["c"] == ("stale", "file missing: sub/start.txt")


def test_gate_skips_and_downstream_reads_the_passthrough(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe(
        {
            "a": {"type": "make", "value": 3},
            "g": {"type": "gate", "src": "a", "threshold": 5},
            "b": {"type": "make", "value": 4, "src": "a", "when": "g"},
            "b2": {"type": "make", "value": 7, "src": "b", "when": "g"},
            "c": {"type": "make", "value": 5, "src": "b2"},
        }
    )
    art = tmp_path / "art"
    code, out, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 0, err
    assert fake_stages.calls == ["a", "c"]
    assert (art / "t" / "c" / "out.txt").read_text() == "5<3"  # b2 -> b -> a, the last stage that ran
    skipped = json.loads((art / "t" / "b" / "manifest.json").read_text())
    assert skipped["status"] == "skipped" and skipped["reason"] == "gate 'g' did not pass"
    assert json.loads((art / "t" / "c" / "manifest.json").read_text())["input_stages"] == {"src": "a"}
    got = states(run_cli, recipe, art)
    assert got["b"] == ("skipped", "gate 'g' did not pass") and got["c"] == ("complete", "up to date")
    fake_stages.calls.clear()
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--only", "b")  # --only respects the gate
    assert code == 0 and fake_stages.calls == [] and "stages.b: skipped: gate 'g' did not pass" in err

    fake_stages.calls.clear()
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.g.threshold=1")
    assert code == 0, err
    assert fake_stages.calls == ["b", "b2", "c"]  # (the gate, g, is not a `make`: not in calls)
    assert (art / "t" / "c" / "out.txt").read_text() == "5<7<4<3"

    fake_stages.calls.clear()
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--force", "--set", "stages.g.threshold=9")
    assert code == 0
    assert "stages.b: warning: gate 'g' did not pass; running anyway (--force)" in err
    assert fake_stages.calls == ["a", "b", "b2", "c"]

    # what was forced past the gate stays, and downstream keeps reading it, until something changes
    fake_stages.calls.clear()
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.g.threshold=9")
    assert code == 0, err
    assert fake_stages.calls == []
    assert (art / "t" / "c" / "out.txt").read_text() == "5<7<4<3"
    got = states(run_cli, recipe, art, "--set", "stages.g.threshold=9")
    assert got["b"] == ("complete", "up to date (ran past the failed gate with --force: gate 'g' did not pass)")
    code, _, err = run_cli(
        "run", recipe, "--artifacts", art, "--set", "stages.g.threshold=9", "--set", "stages.b.value=8"
    )
    assert code == 0, err
    assert fake_stages.calls == ["c"]  # b changed under a failed gate: skipped, c reads a again
    assert (art / "t" / "c" / "out.txt").read_text() == "5<3"


def test_failure_exits_1_with_one_line_and_status_shows_it(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe({"a": {"type": "make", "value": 3}, "b": {"type": "make", "src": "a", "fail": True}})
    art = tmp_path / "art"
    code, out, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 1
    assert err.strip().splitlines()[-1] == f"stages.b: failed: ValueError: boom (traceback in {art}/t/run.log)"
    assert "Traceback" not in out + err
    log = (art / "t" / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and 'raise ValueError("boom")' in log
    assert not (art / "t" / "b").exists()
    assert states(run_cli, recipe, art)["b"] == ("failed", "failed: ValueError: boom")
    assert states(run_cli, recipe, art, "--set", "stages.b.fail=false")["b"] == ("pending", "never run")


def test_bad_metrics_are_a_failure(fake_stages, write_recipe, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(fake_stages, "run", lambda ctx: {"loss": "low"})
    code, _, err = run_cli("run", write_recipe({"a": {"type": "make"}}), "--artifacts", tmp_path / "art")
    assert code == 1
    assert "stages.a: failed: TypeError: run() returned metric 'loss' = 'low', which is not a number" in err


def test_a_stage_that_used_the_gpu_records_its_own_peak_memory(
    fake_stages, write_recipe, tmp_path, run_cli, monkeypatch
):
    """torch's allocator stats, faked (no GPU here): reset before each stage, so b's peak is its own, not a's."""
    import torch

    peak = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak["bytes"])

    def run(ctx):
        peak["bytes"] = max(peak["bytes"], ctx.config.value * 2**30)
        return {"value": ctx.config.value}

    monkeypatch.setattr(fake_stages, "run", run)
    recipe = write_recipe({"a": {"type": "make", "value": 3}, "b": {"type": "make", "value": 1, "src": "a"}})
    code, _, err = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert code == 0, err
    metrics = {s: json.loads((tmp_path / "art" / "t" / s / "manifest.json").read_text())["metrics"] for s in "ab"}
    assert metrics == {"a": {"value": 3.0, "peak_gpu_gib": 3.0}, "b": {"value": 1.0, "peak_gpu_gib": 1.0}}


def test_interrupt_checkpoints_and_rerun_resumes(fake_stages, write_recipe, tmp_path, run_cli):
    recipe = write_recipe({"a": {"type": "make", "steps": 6, "interrupt_at": 3}})
    art = tmp_path / "art"
    code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 130  # 128 + SIGINT, as a shell reports it
    assert "signals: warning: SIGINT: stopping at the next safe point" in err
    assert err.strip().splitlines()[-1] == "stages.a: stopped by SIGINT; re-run to resume from step 3"
    assert (art / "t" / ".partial" / "a" / "checkpoints" / "step-000000003" / "manifest.json").is_file()
    assert not (art / "t" / "a").exists()
    assert states(run_cli, recipe, art)["a"] == ("pending", "never run; resumes from step 3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    # a changed config is another fingerprint: its checkpoints are not this run's, and the run says so
    discard = (
        "never run; discards the checkpoint of step 3, made with other settings (config changed: interrupt_at 3 -> -1)"
    )
    assert states(run_cli, recipe, art, "--set", "stages.a.interrupt_at=-1")["a"] == ("pending", discard)
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.a.interrupt_at=-1")
    assert code == 0 and (art / "t" / "a" / "sub" / "start.txt").read_text() == "0"
    assert f"stages.a: running ({discard})" in err
    assert f"stages.a: running ({discard})" in (art / "t" / "run.log").read_text()

    code, _, _ = run_cli("run", recipe, "--artifacts", art, "--force", "--set", "stages.a.interrupt_at=4")
    assert code == 130
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.a.interrupt_at=4")
    assert code == 0, err
    assert (art / "t" / "a" / "sub" / "start.txt").read_text() == "4"
    assert not (art / "t" / ".partial").exists()


def test_half_written_stage_never_looks_complete(chain, fake_stages, run_cli):
    """A run killed after writing out/manifest.json but before the rename leaves only a partial dir."""
    recipe, art = chain
    partial = art / "t" / ".partial" / "c" / "out"
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text((art / "t" / "c" / "manifest.json").read_text())
    (art / "t" / "c" / "manifest.json").unlink()
    assert states(run_cli, recipe, art)["c"] == ("pending", "never run")


def test_lock_refuses_a_second_run(chain, fake_stages, run_cli):
    recipe, art = chain
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0)\n"
            "os.write(fd, b'pid %d, started just now' % os.getpid())\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(art / "t" / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli("run", recipe, "--artifacts", art, "--force")
        assert code == 1 and fake_stages.calls == []
        assert err.strip() == (
            f"{art}/t is in use by another run (pid {holder.pid}, started just now); wait for it to finish or stop it"
        )
    finally:
        holder.kill()
        holder.wait()
    # the holder died (like kill -9): its lock file is left behind and blocks nothing
    code, _, err = run_cli("run", recipe, "--artifacts", art, "--force")
    assert code == 0, err


def test_status_shows_the_stage_another_process_is_running(chain, fake_stages, run_cli):
    recipe, art = chain
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pipeline.engine.store import Store\n"
            "store = Store(sys.argv[1], 't')\n"
            "with store.lock():\n"
            "    store.mark_running('b')\n"
            "    print('running b', flush=True)\n"
            "    time.sleep(60)\n",
            str(art),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert holder.stdout.readline().strip() == "running b"
        got = states(run_cli, recipe, art)
        assert got["a"] == got["c"] == ("complete", "up to date")
        assert got["b"][0] == "running" and got["b"][1].startswith(f"by pid {holder.pid} since 20")
        code, out, _ = run_cli("status", recipe, "--artifacts", art)
        assert code == 0 and "running" in out and f"by pid {holder.pid}" in out
        code, _, err = run_cli("run", recipe, "--artifacts", art)
        assert code == 1 and f"in use by another run (pid {holder.pid}, started 20" in err
        assert err.strip().endswith("running stage 'b'); wait for it to finish or stop it")
    finally:
        holder.kill()  # like kill -9: its record stays behind, and no longer counts
        holder.wait()
    assert (art / "t" / ".run.json").is_file()
    assert states(run_cli, recipe, art) == {s: ("complete", "up to date") for s in "abc"}


@contextmanager
def unwritable(path: Path):
    """Everything under `path` read-only to this process: by permissions, and for root, whom permissions do not
    stop, by acting as `nobody` meanwhile (so `path` must be reachable by others)."""
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    root = os.geteuid() == 0
    if root:
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.fixture
def shared_dir():
    """A directory others can read (pytest's tmp_path is private to its owner), for `unwritable`."""
    path = Path(tempfile.mkdtemp())
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_read_only_artifacts_status_and_a_run_with_nothing_to_do_work(fake_stages, shared_dir, run_cli):
    recipe = shared_dir / "t.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "seed": 0, "model": TINY_MODEL, "stages": CHAIN}))
    art = shared_dir / "art"
    assert run_cli("run", recipe, "--artifacts", art)[0] == 0
    fake_stages.calls.clear()
    snapshot = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in art.rglob("*")}
    with unwritable(shared_dir):
        assert states(run_cli, recipe, art) == {s: ("complete", "up to date") for s in "abc"}
        code, out, err = run_cli("run", recipe, "--artifacts", art)
        assert code == 0, err
        assert f"nothing to run; cannot write {art}/t (Permission denied), so nothing was written" in err
        assert [line.split("│")[2].strip() for line in out.splitlines() if line.startswith("│")] == ["up to date"] * 3

        code, out, err = run_cli("run", recipe, "--artifacts", art, "--set", "stages.c.value=6")
        assert code == 2 and err.strip() == (
            f"--artifacts: cannot write {art}/t (Permission denied), and stage 'c' needs to run "
            "(config changed: value 5 -> 6)"
        )
        code, out, err = run_cli("run", recipe, "--artifacts", shared_dir / "new")
        assert code == 2 and err.strip() == (
            f"--artifacts: cannot write {shared_dir}/new/t (Permission denied), and stage 'a' needs to run (never run)"
        )
    assert fake_stages.calls == []
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in art.rglob("*")} == snapshot
    assert not (shared_dir / "new").exists()


def test_an_artifacts_folder_that_cannot_be_created_is_bad_input(fake_stages, write_recipe, tmp_path, run_cli):
    """A file where the folder or one above it should be, or a parent that takes no new entries (/proc): exit 2,
    one line naming --artifacts and what is wrong, nothing written."""
    recipe = write_recipe(CHAIN)
    a_file, taken = tmp_path / "a_file", tmp_path / "art" / "t"
    a_file.write_text("")
    taken.parent.mkdir()
    taken.write_text("")
    before = sorted(tmp_path.rglob("*"))
    cases = {
        a_file: f"--artifacts: cannot create {a_file}/t: {a_file} is a file, not a directory",
        taken.parent: f"--artifacts: {taken} is a file, not a directory",
        # as root the folder cannot be created (No such file or directory); as anyone else not written
        Path("/proc/reasoning-qat"): "--artifacts: cannot ",
    }
    for art, message in cases.items():
        code, _, err = run_cli("run", recipe, "--artifacts", art)
        assert code == 2 and err.startswith(message), err
        assert err.strip().endswith(", and stage 'a' needs to run (never run)") and len(err.splitlines()) == 1
    assert fake_stages.calls == [] and sorted(tmp_path.rglob("*")) == before


def test_a_signal_stops_a_stage_that_does_not_train_at_once(fake_stages, write_recipe, tmp_path, run_cli, monkeypatch):
    """Traces, eval, PTQ: nothing a checkpoint could keep, so the first SIGTERM stops them where they are."""

    def run(ctx):
        (ctx.out_dir / "half.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("not stopped")

    monkeypatch.setattr(fake_stages, "run", run)
    recipe, art = write_recipe({"a": {"type": "make"}, "b": {"type": "make", "src": "a"}}), tmp_path / "art"
    started = time.monotonic()
    code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert time.monotonic() - started < 4
    assert code == 143  # 128 + SIGTERM
    assert "signals: warning: SIGTERM: stopping now" in err
    assert err.strip().splitlines()[-1] == "stages.a: stopped by SIGTERM; re-run to start it again"
    assert "SIGTERM: stopping now" in (art / "t" / "run.log").read_text()
    assert not (art / "t" / "a").exists() and not (art / "t" / "b").exists()
    assert states(run_cli, recipe, art) == {"a": ("pending", "never run"), "b": ("pending", "never run")}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_second_signal_stops_a_training_loop_at_once(fake_stages, write_recipe, tmp_path, run_cli, monkeypatch):
    from pipeline.engine import signals

    def run(ctx):
        with signals.stop_at_safe_points():
            os.kill(os.getpid(), signal.SIGINT)  # first: a request, seen at the end of the step
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)  # second: stop now
            time.sleep(5)
            raise AssertionError("not interrupted")

    monkeypatch.setattr(fake_stages, "run", run)
    art = tmp_path / "art"
    code, _, err = run_cli("run", write_recipe({"a": {"type": "make"}}), "--artifacts", art)
    assert code == 130 and err.strip().splitlines()[-1] == "stages.a: stopped by SIGINT; re-run to start it again"
    assert not (art / "t" / "a").exists() and (art / "t" / ".partial" / "a").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_after_the_training_loop_waits_for_the_stage_to_be_saved(
    fake_stages, write_recipe, tmp_path, run_cli, monkeypatch
):
    """What follows a loop is saving what it trained: the stage completes, then the run stops before the next."""
    real_run = fake_stages.run

    def run(ctx):
        metrics = real_run(ctx)  # a loop of `steps` steps
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(fake_stages, "run", run)
    recipe, art = write_recipe({"a": {"type": "make", "steps": 2}, "b": {"type": "make", "src": "a"}}), tmp_path / "art"
    code, _, err = run_cli("run", recipe, "--artifacts", art)
    assert code == 143
    assert err.strip().splitlines()[-1] == ("stages.a: completed, then stopped by SIGTERM as asked; re-run to continue")
    assert fake_stages.calls == ["a"]
    assert states(run_cli, recipe, art) == {"a": ("complete", "up to date"), "b": ("pending", "never run")}
