"""Mid-stage checkpoints for training stages: safetensors + JSON, atomic, resumable after kill -9.

A checkpoint is a directory `step-<N>/` holding `tensors.safetensors` (every tensor of the state) and
`state.json` (everything else, with placeholders where the tensors were). It is written into a
temporary directory and renamed into place, so a checkpoint directory that exists is complete.

    ckpt = ctx.checkpointer
    start = ckpt.latest()            # None, or (step, state) with state as it was saved
    ...
    with pipeline.signals.stop_at_safe_points():
        ...
        if ckpt.due(step):           # every `every` steps, or once SIGTERM/SIGINT arrived
            ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), ...})
        if ckpt.stop_requested:
            raise StageInterrupted(...)  # the runner exits 130/143; the checkpoint is kept

Nested state (optimizer state dicts with integer keys, tuples of RNG state) round-trips exactly.
No pickle anywhere: a checkpoint on disk is data, never code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import signals
from pipeline.optim import flatten_subclass, subclass_name, unflatten_subclass

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_SUBCLASS = "__subclass__"  # a tensor subclass of pipeline.optim.OPTIMIZER_STATE_TYPES (8-bit Adam moments)


class StageInterrupted(RuntimeError):
    """A training stage stopped on SIGTERM/SIGINT after saving a checkpoint."""


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into (tensors by key, JSON-able skeleton referring to those keys)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and subclass_name(obj) is not None:
            inner, attributes = flatten_subclass(obj)
            return {_SUBCLASS: [subclass_name(obj), walk(inner), attributes]}
        if isinstance(obj, torch.Tensor):
            key = str(len(tensors))
            # safetensors refuses shared or non-contiguous storage; a copy is cheap at checkpoint time
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v) for k, v in obj.items()}
            # optimizer state dicts key per-parameter state by int: keep the key types
            return {_ITEMS: [[k, walk(v)] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v) for v in obj]}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint state holds a {type(obj).__name__}, which cannot be saved without pickle")

    return tensors, walk(state)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_state`."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if _TENSOR in obj and len(obj) == 1:
                return tensors[obj[_TENSOR]]
            if _TUPLE in obj and len(obj) == 1:
                return tuple(walk(v) for v in obj[_TUPLE])
            if _ITEMS in obj and len(obj) == 1:
                return {k: walk(v) for k, v in obj[_ITEMS]}
            if _SUBCLASS in obj and len(obj) == 1:
                name, inner, attributes = obj[_SUBCLASS]
                return unflatten_subclass(name, walk(inner), attributes)
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(skeleton)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and finds the checkpoints of one stage under `directory`."""

    def __init__(self, directory: Path, every: int = 0, keep: int = 2):
        if every < 0 or keep < 1:
            raise ValueError("every must be >= 0 and keep >= 1")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

    @property
    def stop_requested(self) -> bool:
        """SIGTERM/SIGINT asked the run to stop (pipeline.signals): checkpoint now, then stop."""
        return signals.requested() is not None

    # -- saving -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.stop_requested or (self.every > 0 and step > 0 and step % self.every == 0)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        tensors, skeleton = flatten_state(state)
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, tmp / "tensors.safetensors")
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, "state": skeleton}, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "tensors.safetensors", "rb") as f:
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(self.directory)
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # -- loading ------------------------------------------------------------------------------
    def _complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*") if (p / "state.json").is_file())

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest complete checkpoint, or None."""
        found = self._complete()
        if not found:
            return None
        path = found[-1]
        with open(path / "state.json") as f:
            record = json.load(f)
        tensors = load_file(path / "tensors.safetensors")
        return record["step"], unflatten_state(tensors, record["state"])

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, without reading it."""
        found = self._complete()
        return int(found[-1].name.split("-")[1]) if found else None

    def resume(self, signature: Any, log) -> tuple[int, dict[str, Any]] | None:
        """`latest()` if it was saved with this `signature` (a JSON-able record of the run's settings,
        stored in the state under "signature"); a checkpoint of other settings is cleared, with a warning."""
        found = self.latest()
        if found is not None and found[1].get("signature") != signature:
            log.warning("checkpoint at step %d was made with other settings; starting from scratch", found[0])
            self.clear()
            return None
        return found

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
