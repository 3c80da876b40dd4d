"""File primitives the store and the checkpoints share: sha256 of a file and of a tree, durable renames.

`MANIFEST` is the name both write: a stage directory's manifest.json (pipeline.engine.store) and a checkpoint's
(pipeline.engine.checkpoint); `hash_tree` leaves it out of what it lists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

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


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry, not just the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
