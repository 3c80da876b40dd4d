"""The artifact store: hashes, atomic commit, partial directories, file checks, the lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os

import pytest

from pipeline.engine.checkpoint import Checkpointer
from pipeline.engine.store import LockedError, Store, fingerprint, hash_tree, sha256_json


def test_fingerprint_is_canonical_and_sensitive():
    base = dict(
        stage_type="ptq", config={"lr": 1e-5, "b": [1, 2]}, sections={"seed": 0}, inputs={"init": "ab"}, code_version=1
    )
    fp = fingerprint(**base)
    assert fp == fingerprint(**{**base, "config": {"b": [1, 2], "lr": 0.00001}})  # key order, float spelling
    for change in (
        {"config": {"lr": 2e-5, "b": [1, 2]}},
        {"sections": {"seed": 1}},
        {"inputs": {"init": "ac"}},
        {"code_version": 2},
        {"stage_type": "kd_qat"},
    ):
        assert fingerprint(**{**base, **change}) != fp
    assert sha256_json({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()


def test_hash_tree_lists_every_file_but_the_manifest(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "a.txt").write_text("hi")
    (tmp_path / "manifest.json").write_text("{}")
    assert hash_tree(tmp_path) == {
        "a.txt": {"sha256": hashlib.sha256(b"hi").hexdigest(), "size": 2},
        "model/w.bin": {"sha256": hashlib.sha256(b"\x00" * 10).hexdigest(), "size": 10},
    }


def test_commit_swaps_the_stage_in_and_removes_the_partial(tmp_path):
    store = Store(tmp_path, "r")
    store.prepare("s", "fp1", {"config": {}})
    (store.out_dir("s") / "x.txt").write_text("new")
    (store.checkpoints_dir("s")).mkdir()
    old = store.stage_dir("s")
    old.mkdir()
    (old / "stale.txt").write_text("old")
    manifest = store.commit("s", {"name": "s", "status": "complete", "fingerprint": "fp1"})
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", "x.txt"]
    on_disk = json.loads((old / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["files"]["x.txt"]["size"] == 3
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["s"]  # no .partial, no .trash
    assert store.check_files("s", manifest, deep=True) is None


def test_prepare_keeps_checkpoints_of_the_same_fingerprint_only(tmp_path):
    store = Store(tmp_path, "r")
    store.prepare("s", "fp1", {"config": {"lr": 1}})
    step = Checkpointer(store.checkpoints_dir("s")).save(7, {"step": 7})
    (store.out_dir("s") / "half.txt").write_text("x")
    store.record_failure("s", {"status": "failed", "fingerprint": "fp1", "error": "E"})
    assert store.failed("s")["error"] == "E"
    assert store.resume_step("s", "fp1") == 7 and store.resume_step("s", "fp2") is None
    assert store.checkpoint_step("s") == 7 and store.attempt("s") == {"config": {"lr": 1}}

    store.prepare("s", "fp1", {"config": {"lr": 1}})
    assert step.is_dir() and list(store.out_dir("s").iterdir()) == [] and store.failed("s") is None
    store.prepare("s", "fp2", {"config": {"lr": 2}})
    assert not step.exists() and store.partial_fingerprint("s") == "fp2"
    assert store.checkpoint_step("s") is None and store.attempt("s") == {"config": {"lr": 2}}


def test_check_files_cheapest_reason_first(tmp_path):
    store = Store(tmp_path, "r")
    store.prepare("s", "fp", {})
    (store.out_dir("s") / "a.txt").write_text("aaa")
    (store.out_dir("s") / "b.txt").write_text("bbb")
    manifest = store.commit("s", {"name": "s"})
    (store.stage_dir("s") / "b.txt").write_text("bbc")
    assert store.check_files("s", manifest, deep=False) is None  # same size: only sha256 tells
    assert store.check_files("s", manifest, deep=True) == "b.txt changed on disk since it was written"
    (store.stage_dir("s") / "b.txt").write_text("bb")
    assert store.check_files("s", manifest, deep=False) == "b.txt changed on disk since it was written"
    (store.stage_dir("s") / "a.txt").unlink()
    assert store.check_files("s", manifest, deep=False) == "file missing: a.txt"


def test_unreadable_manifest_counts_as_none(tmp_path):
    store = Store(tmp_path, "r")
    store.stage_dir("s").mkdir(parents=True)
    (store.stage_dir("s") / "manifest.json").write_text('{"name": "s", "sta')  # torn write
    assert store.manifest("s") is None


def _hold(root, ready, release):
    store = Store(root, "r")
    with store.lock():
        store.mark_running("ptq")
        ready.set()
        release.wait(30)


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(LockedError) as e:
            with Store(tmp_path, "r").lock():
                pass
        message = str(e.value)
        assert message.startswith(f"{tmp_path}/r is in use by another run (pid {holder.pid}, started 20")
        assert message.endswith(", running stage 'ptq'); wait for it to finish or stop it")
        seen = Store(tmp_path, "r").holder()
        assert seen["pid"] == holder.pid and seen["stage"] == "ptq"
    finally:
        holder.kill()  # like kill -9: no cleanup, the lock file and the record stay
        holder.join()
    assert (tmp_path / "r" / ".lock").exists() and (tmp_path / "r" / ".run.json").exists()
    assert Store(tmp_path, "r").holder() is None  # the record of a dead holder does not count
    store = Store(tmp_path, "r")
    with store.lock():
        assert f"pid {os.getpid()}" in (tmp_path / "r" / ".lock").read_text()
        assert store.holder()["pid"] == os.getpid()
    assert not (tmp_path / "r" / ".run.json").exists()
