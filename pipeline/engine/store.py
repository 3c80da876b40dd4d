"""The artifact store: fingerprints, manifests, atomic stage directories and the run lock.

Layout under the artifacts root (default `./artifacts`):

    <root>/<recipe>/.lock                     held (flock) by the run in progress
    <root>/<recipe>/.run.json                 that run's pid and the stage it is running (for `status`)
    <root>/<recipe>/run.log                   everything the runs logged
    <root>/<recipe>/<stage>/manifest.json     written last: its presence means the stage is complete
    <root>/<recipe>/<stage>/...               the stage's files
    <root>/<recipe>/.partial/<stage>/         a stage in progress: `fingerprint`, `attempt.json` (what
                                              it was run with), `out/` (ctx.out_dir), `checkpoints/`,
                                              and `manifest.json` if the attempt failed

A stage is run into `.partial/<stage>/out/`; when it succeeds its files are hashed, the manifest is
written into `out/` last, and `out/` is renamed into place. A run killed at any point therefore never
leaves a `<stage>/` that looks complete but is not.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pipeline.engine.checkpoint import Checkpointer
from pipeline.engine.files import MANIFEST, fsync_dir, hash_tree, sha256_file

RUN_RECORD = ".run.json"


class LockedError(RuntimeError):
    """Another run holds the artifacts directory of this recipe."""


class NotWritable(RuntimeError):
    """This process may not write into the artifacts directory (permissions, a read-only file system), or cannot
    create it (a file where a folder should be, a parent that takes no new entries)."""


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NOT_CREATABLE = (errno.ENOTDIR, errno.EEXIST, errno.ENOENT)  # EEXIST: mkdir(exist_ok=True) found a file
_LOCK_TRIES = 5


# -- hashing ----------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def read_manifest(directory: Path) -> dict | None:
    """`directory`'s manifest.json, or None if it has none (or an unreadable one)."""
    return _read_json(directory / MANIFEST)


def check_files(directory: Path, manifest: dict, deep: bool) -> str | None:
    """Why the files of a stage directory do not match its manifest (None if they do).

    Cheap checks (existence, size) for every file first; sha256 only when `deep` and all passed.
    """
    files = manifest.get("files", {})
    for rel, info in files.items():
        path = directory / rel
        if not path.is_file():
            return f"file missing: {rel}"
        if path.stat().st_size != info["size"]:
            return f"{rel} changed on disk since it was written"
    if deep:
        for rel, info in files.items():
            if sha256_file(directory / rel) != info["sha256"]:
                return f"{rel} changed on disk since it was written"
    return None


def fingerprint(
    stage_type: str, config: dict, sections: dict[str, Any], inputs: dict[str, str], code_version: int
) -> str:
    """What a stage's output depends on: its type, resolved config, the recipe sections it declares
    in USES, its inputs' fingerprints, and its CODE_VERSION (bumped by hand; source is not hashed)."""
    return sha256_json(
        {"type": stage_type, "config": config, "sections": sections, "inputs": inputs, "code_version": code_version}
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- the store --------------------------------------------------------------------------------------


class Store:
    """The artifacts of one recipe: `<root>/<recipe name>/`."""

    def __init__(self, root: str | Path, recipe_name: str):
        self.base = Path(root) / recipe_name
        self._locked_at: str | None = None

    def stage_dir(self, stage: str) -> Path:
        return self.base / stage

    def partial_dir(self, stage: str) -> Path:
        return self.base / ".partial" / stage

    def out_dir(self, stage: str) -> Path:
        return self.partial_dir(stage) / "out"

    def checkpoints_dir(self, stage: str) -> Path:
        return self.partial_dir(stage) / "checkpoints"

    @property
    def run_log(self) -> Path:
        return self.base / "run.log"

    # -- reading (never writes: `status` uses these) ----------------------------------------------
    def manifest(self, stage: str) -> dict | None:
        """The manifest of the stage's directory (complete or skipped), or None."""
        return read_manifest(self.stage_dir(stage))

    def failed(self, stage: str) -> dict | None:
        """The record of the last attempt if it failed, or None."""
        return _read_json(self.partial_dir(stage) / MANIFEST)

    def partial_fingerprint(self, stage: str) -> str | None:
        try:
            return (self.partial_dir(stage) / "fingerprint").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def attempt(self, stage: str) -> dict | None:
        """What the last attempt at the stage was run with (`prepare`'s record), or None."""
        return _read_json(self.partial_dir(stage) / "attempt.json")

    def checkpoint_step(self, stage: str) -> int | None:
        """Step of the stage's newest checkpoint, whatever it was made with."""
        return Checkpointer(self.checkpoints_dir(stage)).latest_step()

    def resume_step(self, stage: str, fingerprint_: str) -> int | None:
        """Step of the newest checkpoint a run with this fingerprint would resume from."""
        if self.partial_fingerprint(stage) != fingerprint_:
            return None
        return self.checkpoint_step(stage)

    def check_files(self, stage: str, manifest: dict, deep: bool) -> str | None:
        """Why the stage's files do not match its manifest (None if they do); see `check_files`."""
        return check_files(self.stage_dir(stage), manifest, deep)

    # -- writing (only under the lock) --------------------------------------------------------------
    def prepare(self, stage: str, fingerprint_: str, attempt: dict) -> None:
        """An empty `out/` for a new attempt; checkpoints kept only if they belong to this fingerprint.
        `attempt` (what the stage is run with) lets a later run say why it cannot resume."""
        partial = self.partial_dir(stage)
        if self.partial_fingerprint(stage) != fingerprint_:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        _write_atomic(partial / "fingerprint", fingerprint_ + "\n")
        _write_atomic(partial / "attempt.json", json.dumps(attempt, indent=2) + "\n")
        (partial / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.out_dir(stage), ignore_errors=True)
        self.out_dir(stage).mkdir()

    def record_failure(self, stage: str, manifest: dict) -> None:
        self.partial_dir(stage).mkdir(parents=True, exist_ok=True)
        _write_atomic(self.partial_dir(stage) / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def commit(self, stage: str, manifest: dict) -> dict:
        """Hash `out/`, write its manifest last, swap it in as `<stage>/`, drop the partial dir."""
        out = self.out_dir(stage)
        manifest = {**manifest, "files": hash_tree(out)}
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        final = self.stage_dir(stage)
        trash = self.base / ".trash" / f"{stage}-{os.getpid()}-{time.monotonic_ns()}"
        if final.exists():
            trash.parent.mkdir(exist_ok=True)
            os.rename(final, trash)
        os.rename(out, final)
        fsync_dir(self.base)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(self.partial_dir(stage), ignore_errors=True)
        for empty in (trash.parent, self.partial_dir(stage).parent):
            try:
                empty.rmdir()
            except OSError:  # not empty (another stage's partial) or already gone
                pass
        return manifest

    def clean_trash(self) -> None:
        """Old stage directories a killed run had moved aside but not yet removed."""
        shutil.rmtree(self.base / ".trash", ignore_errors=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold `<base>/.lock` for the whole run; refuse at once if another process holds it, and raise
        NotWritable (having written nothing) if this process may not create or write it.

        flock dies with its process, so a lock file left by a killed run blocks nothing.
        """
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.base / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _not_writable(e, self.base) from None
        if not _flock_exclusive(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            stage = (_read_json(self.base / RUN_RECORD) or {}).get("stage")
            if stage:
                holder += f", running stage '{stage}'"
            raise LockedError(f"{self.base} is in use by another run ({holder}); wait for it to finish or stop it")
        try:
            self._locked_at = now_iso()
            try:  # the first write into the directory itself (a lock file of an earlier run may be writable)
                self.mark_running(None)
            except OSError as e:
                raise _not_writable(e, self.base, creating=False) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {self._locked_at}\n".encode(), 0)
            try:
                yield
            finally:
                (self.base / RUN_RECORD).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock

    def mark_running(self, stage: str | None) -> None:
        """Under the lock: record the stage being run (None: between stages) where `holder` reads it."""
        record = {"pid": os.getpid(), "started": self._locked_at, "stage": stage, "stage_started": now_iso()}
        _write_atomic(self.base / RUN_RECORD, json.dumps(record) + "\n")

    def holder(self) -> dict | None:
        """The run that holds the lock now: {"pid", "started", "stage", "stage_started"} ("stage" None between
        stages; only {"pid": None} if it has not said), or None when no process holds it.

        Reads only, and never waits: it tries the lock shared, for an instant, without blocking (a record
        left behind by a killed run is stale, and a pid alone could since belong to another process)."""
        try:
            fd = os.open(self.base / ".lock", os.O_RDONLY)
        except OSError:  # no lock file: no run ever held it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_json(self.base / RUN_RECORD) or {"pid": None}
        finally:
            os.close(fd)
        return None


def _not_writable(error: OSError, base: Path, creating: bool = True) -> Exception:
    """NotWritable, naming `base` and why, for an error creating (`creating`) or writing it that is the user's to
    fix (permissions, a read-only file system; when creating, a path through a file, a parent that takes no new
    entries such as /proc); other errors as they are (writing into a folder that exists, a missing path is a bug)."""
    if error.errno in _NOT_WRITABLE:
        return NotWritable(f"cannot write {base} ({error.strerror})")
    if not creating or error.errno not in _NOT_CREATABLE:
        return error
    # "Not a directory" names the folder to create, not the file in its way: name that file
    blocker = next((p for p in (base, *base.parents) if p.exists() and not p.is_dir()), None)
    if blocker == base:
        return NotWritable(f"{base} is a file, not a directory")
    if blocker is not None:
        return NotWritable(f"cannot create {base}: {blocker} is a file, not a directory")
    return NotWritable(f"cannot create {base} ({error.strerror})")


def _flock_exclusive(fd: int) -> bool:
    """Take the flock without waiting on a run, trying a few times 20 ms apart: `Store.holder` (status)
    holds it shared for an instant."""
    for _ in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.02)
    return False


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
