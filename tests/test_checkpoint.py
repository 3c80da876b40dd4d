"""Checkpoints on disk: exact round trip, manifest written last, damaged ones skipped (status and resume agree on
the step), the last good one kept through a failed save, checkpoints of a lost future removed."""

import json
import logging

import pytest
import torch

from pipeline.engine.checkpoint import Checkpointer, RankFailed, Ranks, on_every_rank


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64, 64, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(step)}}},
        "rng": {"python": (3, tuple(range(5)), None)},
        "step": step,
    }


def _saved(tmp_path, *steps: int) -> Checkpointer:
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    for step in steps:
        ckpt.save(step, _state(step))
    return ckpt


def _truncate(path, keep_bytes: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


def test_round_trip_is_exact_and_the_manifest_lists_every_file(tmp_path):
    ckpt = _saved(tmp_path, 2)
    step, state = ckpt.latest()
    assert step == 2 and state["optimizer"]["state"][0]["step"] == 2 and state["rng"] == _state(2)["rng"]
    assert torch.equal(state["model"]["w"], _state(2)["model"]["w"])
    directory = tmp_path / "ckpt" / "step-000000002"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["shared.json", "shared.safetensors"] and manifest["processes"] == 1
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest", "same size, other bytes"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
    ckpt = _saved(tmp_path, 2, 4)
    newest = tmp_path / "ckpt" / "step-000000004"
    tensors = newest / "shared.safetensors"
    if damage == "truncated":
        _truncate(tensors)
    elif damage == "missing":
        tensors.unlink()
    elif damage == "no manifest":
        (newest / "manifest.json").unlink()
    else:
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    # what `status` promises (sizes only) is what a run resumes from, except a change at the same size,
    # which only the sha256 that resuming checks can see
    assert ckpt.latest_step() == (4 if damage == "same size, other bytes" else 2)
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.latest(log=logging.getLogger("t"))
    assert step == 2 and torch.equal(state["model"]["w"], _state(2)["model"]["w"])
    expected = {
        "truncated": "shared.safetensors is 100 bytes, its manifest says",
        "missing": "shared.safetensors is missing",
        "no manifest": "manifest.json is missing or unreadable",
        "same size, other bytes": "shared.safetensors does not match the sha256 in its manifest",
    }[damage]
    assert f"checkpoint step-000000004 is damaged: {expected}" in caplog.text


def test_every_checkpoint_damaged_means_starting_over(tmp_path):
    ckpt = _saved(tmp_path, 2)
    _truncate(tmp_path / "ckpt" / "step-000000002" / "shared.json", 5)
    assert ckpt.latest_step() is None and ckpt.latest() is None


def test_a_save_that_fails_midway_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = _saved(tmp_path, 2)
    with pytest.raises(TypeError, match="cannot be saved without pickle"):
        ckpt.save(4, {"model": {"w": torch.zeros(3)}, "bad": object()})
    assert ckpt.latest_step() == 2 and ckpt.latest()[0] == 2
    assert not (tmp_path / "ckpt" / "step-000000004").exists()
    ckpt.save(4, _state(4))  # the next good save clears what the failed one left
    assert ckpt.latest_step() == 4 and not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_a_save_keeps_older_ones_up_to_keep_and_removes_a_lost_future(tmp_path):
    ckpt = _saved(tmp_path, 2, 4, 6, 8)  # keep=3
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-000000004",
        "step-000000006",
        "step-000000008",
    ]
    _truncate(tmp_path / "ckpt" / "step-000000008" / "shared.safetensors")
    assert ckpt.latest()[0] == 6
    ckpt.save(7, _state(7))  # a run resumed from 6 stopped at 7: step 8 is from a future that will not happen
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "step-000000004",
        "step-000000006",
        "step-000000007",
    ]


def test_resume_clears_a_checkpoint_of_other_settings(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, {**_state(2), "signature": {"lr": 1}})
    assert ckpt.resume({"lr": 1}, logging.getLogger("t"))[0] == 2
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume({"lr": 2}, logging.getLogger("t")) is None
    assert "made with other settings" in caplog.text and not (tmp_path / "ckpt").exists()


class _SecondOfTwo(Ranks):
    """Rank 1 of 2, where rank 0 reported `other` (what an all-gather would bring back)."""

    rank, count = 1, 2

    def __init__(self, other: str | None):
        self.other = other

    def first_failure(self, error):
        if self.other is not None:
            return 0, self.other
        return None if error is None else (1, error)


def test_a_failure_on_any_rank_raises_the_same_message_everywhere():
    with pytest.raises(RankFailed, match=r"^rank 0 of 2 failed: OSError: disk full$"):
        on_every_rank(_SecondOfTwo("OSError: disk full"), lambda: 1)  # this rank succeeded, rank 0 did not
    with pytest.raises(RankFailed, match=r"^rank 1 of 2 failed: ValueError: bad batch$") as raised:
        on_every_rank(_SecondOfTwo(None), lambda: (_ for _ in ()).throw(ValueError("bad batch")))
    assert isinstance(raised.value.__cause__, ValueError)  # the traceback of the rank that failed is kept
    assert on_every_rank(_SecondOfTwo(None), lambda: 7) == 7
    with pytest.raises(ValueError, match="alone"):  # one process: the exception itself
        on_every_rank(Ranks(), lambda: (_ for _ in ()).throw(ValueError("alone")))
