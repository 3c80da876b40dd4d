"""File primitives the store and the checkpoints share: sha256 of a file and of a tree, durable renames; and the
check that an output path the user named (`--out`) can be written, before the work that would fill it.

`MANIFEST` is the name both write: a stage directory's manifest.json (pipeline.engine.store) and a checkpoint's
(pipeline.engine.checkpoint); `hash_tree` leaves it out of what it lists.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.engine.errors import InputError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {"sha256", "size"} of every file under `directory` except the manifest."""
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def fsync_file(path: Path) -> None:
    """Make a file's written bytes durable before it is renamed into place."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_can_create(path: str | Path, where: str) -> None:
    """InputError(where, ...) unless this process can create `path` (a file or a folder, with any missing folders
    above it), or write into it if it is a folder already. Tried with a temporary folder in the nearest folder
    that exists, removed at once: permission bits do not tell (root passes them, yet can create nothing in /proc
    or on a read-only mount)."""
    path = Path(path)
    folder = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        raise InputError(where, f"{folder} is a file, so {path} cannot be created")
    try:
        Path(tempfile.mkdtemp(dir=folder)).rmdir()
    except OSError as e:
        raise InputError(where, f"{path} cannot be created ({e.strerror})") from None
