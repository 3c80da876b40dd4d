"""The one JSON Lines reader and writer: records hold the characters str.splitlines() breaks on; parquet."""

import pytest

from pipeline.engine.errors import InputError
from pipeline.data.rows import read_jsonl, read_rows, write_jsonl

# each of these is a line break to str.splitlines() (and U+2028 / U+2029 to JavaScript), none to JSON Lines
BREAKERS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c"


def test_roundtrip_with_unicode_line_separators(tmp_path):
    rows = [{"id": f"r{i}", "completion": f"step {i}{c}then{c}", "n": i} for i, c in enumerate(BREAKERS)]
    rows.append({"id": "crlf", "completion": "a\r\nb\rc\n"})
    path = tmp_path / "rows.jsonl"
    write_jsonl(rows, path)
    text = path.read_text(encoding="utf-8")
    assert "\u2028" in text  # written unescaped (ensure_ascii=False), which is what broke splitlines readers
    assert len(text.splitlines()) > len(rows)
    assert read_jsonl(path, "x") == rows


def test_crlf_file_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n{"a": "\xe2\x80\xa8"}\r\n')
    assert read_jsonl(path, "x") == [{"a": 1}, {"a": "\u2028"}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"a": 1}\n{"a": \n', "rows.jsonl:2: not JSON"),
        ("[1, 2]\n", "rows.jsonl:1: expected a JSON object, got \\[1, 2\\]"),
    ],
)
def test_bad_lines(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        read_jsonl(path, "data.prompts_file")
    assert err.value.where == "data.prompts_file"


def test_parquet_and_missing_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q\u2028", "answer": 3}]), tmp_path / "p.parquet")
    assert read_rows(tmp_path / "p.parquet", "x") == [{"question": "q\u2028", "answer": 3}]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="bad.parquet: not a readable parquet file"):
        read_rows(tmp_path / "bad.parquet", "x")
    for name in ("none.parquet", "none.jsonl"):
        with pytest.raises(InputError, match=f"no such file: {tmp_path / name}"):
            read_rows(tmp_path / name, "x")
