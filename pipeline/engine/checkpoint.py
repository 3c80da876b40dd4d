"""Mid-stage checkpoints for training stages: safetensors + JSON, atomic, verified, resumable after kill -9,
from one process or several (DDP, DeepSpeed ZeRO).

A checkpoint is a directory `step-<N>/`:

    shared.safetensors, shared.json     what all processes share (model, scheduler, metrics, ...), from the main one
    rank-<r>.safetensors, rank-<r>.json what process r alone holds (its RNG; under ZeRO its optimizer partition)
    manifest.json                       size and sha256 of every file above, written last

Each pair is a state split by `flatten_state`: the tensors in the safetensors, the rest (with placeholders where
the tensors were) in the JSON. Every process writes its files into `.tmp-step-<N>/`; once all have, the main one
writes the manifest and renames the directory into place, so a killed save leaves no `step-<N>/`. A checkpoint
counts only if every file its manifest lists has the listed size (and, when it is read to resume, the listed
sha256): one damaged after the fact (a truncated file, a copy that ran out of disk) is skipped with a warning that
names the file, and the run resumes from the newest good one. A save removes older checkpoints only once the new
one is in place (the last good one survives a kill at any point), and removes every newer one: those belong to
the future a resumed run left behind, damaged or not.

    ckpt = ctx.checkpointer
    found = ckpt.resume(signature, log)  # None, or (step, state) saved by a run with this signature
    ...
    with pipeline.engine.signals.stop_at_safe_points():
        ...
        if ckpt.due(step):           # every `every` steps, or once SIGTERM/SIGINT arrived
            ckpt.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), ...})
        if ckpt.stop_requested:
            raise StageInterrupted(...)  # the runner exits 130/143; the checkpoint is kept

With several processes every one calls `save` and `resume` (they are collectives), passing a `Ranks` that says
which process it is and carries failures between them: a process that fails to write its part makes every
process raise `RankFailed` with its message, never leaves the others waiting.

Nested state (optimizer state dicts with integer keys, tuples of RNG state) round-trips exactly.
No pickle anywhere: a checkpoint on disk is data, never code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from pipeline.engine import signals
from pipeline.engine.files import MANIFEST, fsync_dir, fsync_file, hash_tree, sha256_file

if TYPE_CHECKING:
    import torch

# torch, safetensors and pipeline.train.optim (tensor subclasses of 8-bit optimizer state) are imported by the
# functions that write and read tensors, not here: the store imports this module for every run (Checkpointer,
# the resume point a plan reports), and the engine loads no ML library until a training stage saves or resumes.

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_SUBCLASS = "__subclass__"  # a tensor subclass of pipeline.train.optim.OPTIMIZER_STATE_TYPES (8-bit Adam moments)
SHARED = "shared"
T = TypeVar("T")


class StageInterrupted(RuntimeError):
    """A training stage stopped on SIGTERM/SIGINT after saving a checkpoint."""


class RankFailed(RuntimeError):
    """A process of a multi-process run failed; every process raises this, with the same message."""


class Ranks:
    """Which process this is, of how many, and the one collective that checkpoints and the training loop agree
    through. This base class is a run of one process; `pipeline.train.loop` implements it over an Accelerator."""

    rank = 0
    count = 1

    def first_failure(self, error: str | None) -> tuple[int, str] | None:
        """(rank, error) of the lowest-numbered process that passed an error, the same on every process, or None
        if none did. Every process must call it: it is also a barrier."""
        return None if error is None else (self.rank, error)


ONE_PROCESS = Ranks()


def on_every_rank(ranks: Ranks, work: Callable[[], T]) -> T:
    """`work()`; if it raised here or on another process, every process raises RankFailed with the message of the
    lowest-numbered one that failed (a collective: every process must call it). One process: the exception
    itself, unchanged."""
    try:
        result, error = work(), None
    except Exception as e:
        if ranks.count == 1:
            raise
        result, error = None, e
    failure = ranks.first_failure(None if error is None else f"{type(error).__name__}: {error}")
    if failure is not None:
        rank, message = failure
        raise RankFailed(f"rank {rank} of {ranks.count} failed: {message}") from error
    return result


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into (tensors by key, JSON-able skeleton referring to those keys)."""
    import torch

    from pipeline.train.optim import flatten_subclass, subclass_name

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
    from pipeline.train.optim import unflatten_subclass

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


def _write_part(directory: Path, name: str, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors, skeleton = flatten_state(state)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(skeleton))
    for suffix in (".safetensors", ".json"):
        fsync_file(directory / f"{name}{suffix}")


def _read_part(directory: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    skeleton = json.loads((directory / f"{name}.json").read_text())
    return unflatten_state(load_file(directory / f"{name}.safetensors"), skeleton)


def _rank_part(rank: int) -> str:
    return f"rank-{rank:05d}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


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
        """SIGTERM/SIGINT asked the run to stop (pipeline.engine.signals): checkpoint now, then stop."""
        return signals.requested() is not None

    # -- saving -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.stop_requested or (self.every > 0 and step > 0 and step % self.every == 0)

    def save(
        self, step: int, shared: dict[str, Any] | None, own: dict[str, Any] | None = None, ranks: Ranks = ONE_PROCESS
    ) -> Path:
        """Write the checkpoint of `step`: `shared` from the main process (rank 0; ignored elsewhere), `own` from
        each process that has state of its own. With several processes every one calls this."""
        final = self.directory / f"step-{step:09d}"
        tmp = self.directory / f".tmp-step-{step:09d}"
        main = ranks.rank == 0

        def start() -> None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write_parts() -> None:
            if main:
                _write_part(tmp, SHARED, shared or {})
            if own is not None:
                _write_part(tmp, _rank_part(ranks.rank), own)

        def publish() -> None:
            if main:
                self._publish(step, tmp, final, ranks.count)

        for phase in (start, write_parts, publish):  # each ends when every process has finished it
            on_every_rank(ranks, phase)
        return final

    def _publish(self, step: int, tmp: Path, final: Path, processes: int) -> None:
        files = hash_tree(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "processes": processes, "files": files}, indent=2))
        fsync_file(tmp / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(self.directory)
        listed = self._listed()
        older = [p for p in listed if _step_of(p) < step]
        for path in older[: max(len(older) - (self.keep - 1), 0)] + [p for p in listed if _step_of(p) > step]:
            shutil.rmtree(path, ignore_errors=True)
        for leftover in self.directory.glob(".tmp-step-*"):  # a save killed midway
            shutil.rmtree(leftover, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def _listed(self) -> list[Path]:
        """Every `step-*` directory, oldest first, good or not."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*") if p.is_dir())

    @staticmethod
    def _damage(path: Path, hashed: tuple[str, ...] = ()) -> str | None:
        """Why the checkpoint at `path` cannot be used (None if it can): its manifest missing or unreadable, a
        file missing or of another size than listed, or one of the `hashed` files not matching its sha256."""
        try:
            files = json.loads((path / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is missing or unreadable"
        for name, info in files.items():
            try:
                size = (path / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != info["size"]:
                return f"{name} is {size} bytes, its manifest says {info['size']}"
        for name in hashed:
            if name not in files or sha256_file(path / name) != files[name]["sha256"]:
                return f"{name} does not match the sha256 in its manifest"
        return None

    def _latest_sized(self) -> Path | None:
        """The newest checkpoint whose files all have their listed sizes (cheap: nothing is hashed or read), which
        is the one a run resumes from unless a file's content changed at the same size."""
        return next((p for p in reversed(self._listed()) if self._damage(p) is None), None)

    def latest_step(self) -> int | None:
        """Step of `_latest_sized`."""
        path = self._latest_sized()
        return None if path is None else _step_of(path)

    def latest_signature(self) -> Any:
        """The signature `_latest_sized` was saved with (from its shared JSON alone, unverified), or None, also for
        a JSON that does not read: `resume` verifies the files and falls back to an older checkpoint."""
        path = self._latest_sized()
        try:
            state = None if path is None else json.loads((path / f"{SHARED}.json").read_text())
        except (OSError, ValueError):
            return None
        return state.get("signature") if isinstance(state, dict) else None

    def latest(self, ranks: Ranks = ONE_PROCESS, log=None) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest good checkpoint, or None; state is the shared part merged with this
        process's own. Damaged checkpoints on the way are skipped, with a warning on `log`."""
        for path in reversed(self._listed()):
            parts = [SHARED, _rank_part(ranks.rank)]
            # the shared part (the model) is hashed by rank 0 alone: a damage it finds stops every rank
            own = parts if ranks.rank == 0 else parts[1:]
            hashed = tuple(
                f"{part}{suffix}"
                for part in own
                for suffix in (".safetensors", ".json")
                if (path / f"{part}{suffix}").exists()
            )
            failure = ranks.first_failure(self._damage(path, hashed))
            if failure is not None:
                if log is not None:
                    where = f" (rank {failure[0]})" if ranks.count > 1 else ""
                    log.warning("checkpoint %s is damaged%s: %s; trying the one before", path.name, where, failure[1])
                continue
            state = on_every_rank(
                ranks,
                lambda: {
                    k: v
                    for part in parts
                    if (path / f"{part}.json").exists()
                    for k, v in _read_part(path, part).items()
                },
            )
            return _step_of(path), state
        return None

    def resume(self, signature: Any, log, ranks: Ranks = ONE_PROCESS) -> tuple[int, dict[str, Any]] | None:
        """`latest()` if it was saved with this `signature` (a JSON-able record of the run's settings, stored in
        the state under "signature"); a checkpoint of other settings is cleared, with a warning."""
        found = self.latest(ranks, log)
        if found is not None and found[1].get("signature") != signature:
            log.warning("checkpoint at step %d was made with other settings; starting from scratch", found[0])
            ranks.first_failure(None)  # every process has read it before the main one deletes it
            if ranks.rank == 0:
                self.clear()
            return None
        return found

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
