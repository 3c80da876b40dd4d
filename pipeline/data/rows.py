"""Row files: the one JSON Lines reader and writer, and parquet, for benchmarks, prompts, traces and samples.

    write_jsonl(rows, "out/samples.jsonl")
    rows = read_jsonl(Path("out/samples.jsonl"), where="stages.eval")
    rows = read_rows(Path("gsm8k_test.parquet"), where="data.benchmarks_dir")   # .jsonl or .parquet
    for at, row in read_located(path, where):     # at = "<file>:<line>" (or "<file>: row N"), for messages

Rows are written with `ensure_ascii=False` (readable), so a JSON string may hold U+2028, U+2029,
U+0085 or \\x1c..\\x1e, which `str.splitlines()` and `io` readers with universal newlines treat as line
breaks: JSON Lines separates records by "\\n" alone, and so does the reader here (it splits bytes).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.engine.errors import InputError


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path, where: str) -> list[dict]:
    """Rows of a JSON Lines file; see `read_located`."""
    return [row for _, row in _jsonl_located(path, where)]


def read_rows(path: Path, where: str) -> list[dict]:
    """Rows of a `.jsonl` or `.parquet` file (the format the Hugging Face hub stores datasets in)."""
    return [row for _, row in read_located(path, where)]


_read_once: dict[tuple[str, int, int], list[tuple[str, dict]]] | None = None
"""While `reading_each_file_once` is open: (path, mtime_ns, size) -> the rows read_located gave."""


@contextmanager
def reading_each_file_once() -> Iterator[None]:
    """Within it, `read_located` reads and parses each file once per (path, mtime, size), then hands out
    the same rows: for recipe validation, where each stage's check (eval, gate, kd_qat, traces, rl) loads
    the benchmark or prompts file it names, often the same one. A file that fails to read is read again
    (its error each time). Nested, the outermost scope's memo serves."""
    global _read_once
    if _read_once is not None:
        yield
        return
    _read_once = {}
    try:
        yield
    finally:
        _read_once = None


def read_located(path: Path, where: str) -> list[tuple[str, dict]]:
    """("<file>:<line>", row) for each non-blank line of a jsonl file, ("<file>: row N", row) for each
    row of a parquet file. A missing file, or a line that is not UTF-8, not JSON or not a JSON object,
    is an InputError blaming `where` (the key or flag that named the file) and naming file and line."""
    if _read_once is None:
        return _read_located(path, where)
    try:
        stat = path.stat()
    except OSError:
        return _read_located(path, where)  # missing: its error
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _read_once:
        _read_once[key] = _read_located(path, where)
    return list(_read_once[key])


def _read_located(path: Path, where: str) -> list[tuple[str, dict]]:
    if path.suffix == ".parquet":
        return [(f"{path}: row {i}", row) for i, row in enumerate(_parquet(path, where), 1)]
    return _jsonl_located(path, where)


def _jsonl_located(path: Path, where: str) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise InputError(where, f"no such file: {path}")
    rows = []
    with path.open("rb") as f:  # bytes: split on b"\n" only, and a line that is not UTF-8 keeps its number
        for line_no, line in enumerate(f, 1):
            at = f"{path}:{line_no}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(where, f"{at}: not UTF-8 text (is it a jsonl file?)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(where, f"{at}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(where, f"{at}: expected a JSON object, got {short_json(row)}")
            rows.append((at, row))
    return rows


def _parquet(path: Path, where: str) -> list[dict]:
    if not path.is_file():
        raise InputError(where, f"no such file: {path}")
    import pyarrow.lib
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.lib.ArrowException as e:
        raise InputError(where, f"{path}: not a readable parquet file ({e})") from None


def short_json(value) -> str:
    """`value` as JSON, cut to 40 characters: for messages that quote a bad value."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_texts(path: str | os.PathLike, where: str) -> list[str]:
    """The `text` field of every row of a .jsonl or .parquet file: a user's text corpus (perplexity,
    KL to the teacher, generic PTQ calibration)."""
    texts = []
    for i, row in enumerate(read_rows(Path(path), where), 1):
        if not isinstance(row.get("text"), str):
            raise InputError(where, f"{path}: row {i} has no `text` string")
        texts.append(row["text"])
    if not any(texts):
        raise InputError(where, f"{path}: no text in it")
    return texts
