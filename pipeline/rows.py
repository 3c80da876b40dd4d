"""Row files: the one JSON Lines reader and writer, and parquet, for benchmarks, prompts, traces and samples.

    write_jsonl(rows, "out/samples.jsonl")
    rows = read_jsonl(Path("out/samples.jsonl"), where="stages.eval")
    rows = read_rows(Path("gsm8k_test.parquet"), where="data.benchmarks_dir")   # .jsonl or .parquet

Rows are written with `ensure_ascii=False` (readable), so a JSON string may hold U+2028, U+2029,
U+0085 or \\x1c..\\x1e, which `str.splitlines()` and `io` readers with universal newlines treat as line
breaks: JSON Lines separates records by "\\n" alone, and so does `read_jsonl`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path, where: str) -> list[dict]:
    """Rows of a JSON Lines file; a missing file or a bad line is an InputError naming the file
    (blamed on `where`, the key or flag that named it)."""
    if not path.is_file():
        raise InputError(where, f"no such file: {path}")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(where, f"{path}:{line_no}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(where, f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_rows(path: Path, where: str) -> list[dict]:
    """Rows of a `.jsonl` or `.parquet` file (the format the Hugging Face hub stores datasets in)."""
    if path.suffix == ".parquet":
        if not path.is_file():
            raise InputError(where, f"no such file: {path}")
        import pyarrow.lib
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except pyarrow.lib.ArrowException as e:
            raise InputError(where, f"{path}: not a readable parquet file ({e})") from None
    return read_jsonl(path, where)
