"""Calibration data for PTQ: token-id samples, and the DataLoader llmcompressor's `oneshot` takes.

Two sources, to reproduce the paper's comparison (domain-matched traces vs generic text):
- "traces": the teacher's own reasoning traces (a `traces` stage's `traces.jsonl`), each rendered
  with the chat template as prompt + completion (`pipeline.data.traces.Trace.example`), as the QAT stage
  will see them; truncated to `seqlen`.
- "generic": a user's text corpus (a .jsonl / .parquet file with a `text` field, e.g. WikiText), or,
  without one, English prose with no math and no reasoning chains standing in for WikiText (which
  these machines cannot download): the docstrings of a fixed list of Python standard-library
  modules, which ship with every Python. Either is concatenated and cut into `seqlen`-token windows
  as GPTQ papers cut WikiText. The built-in text depends only on the Python version.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.engine.errors import InputError

GENERIC_MODULES = (
    "argparse",
    "asyncio",
    "calendar",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "mailbox",
    "multiprocessing",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pydoc",
    "queue",
    "random",
    "re",
    "sched",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tkinter",
    "turtle",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)


def traces_samples(
    tokenizer, traces_dir: str | Path, nsamples: int, seqlen: int, seed: int, where: str = "calibration"
) -> list[list[int]]:
    """Up to `nsamples` token-id sequences from `<traces_dir>/traces.jsonl`, a seeded random subset;
    `where` is the key blamed for a missing or malformed file."""
    return [t.example(tokenizer)[0][:seqlen] for t in _shuffled_traces(traces_dir, seed, where)[:nsamples]]


def _shuffled_traces(traces_dir: str | Path, seed: int, where: str) -> list:
    from pipeline.data.traces import read_traces

    traces = read_traces(traces_dir, where)
    random.Random(seed).shuffle(traces)
    return traces


def packed_traces_samples(
    tokenizer, traces_dir: str | Path, nsamples: int, seqlen: int, seed: int, where: str = "calibration"
) -> list[list[int]]:
    """Up to `nsamples` windows of exactly `seqlen` tokens: the traces (chat-formatted, in a seeded random
    order) joined end to end and cut, as FlatQuant calibrates on equal 2048-token windows of WikiText.
    Equal lengths let a batched calibration fill every batch: traces cut one per sample are all of
    different lengths, and samples of different lengths cannot share a step. Fewer windows when the
    traces hold fewer than nsamples x seqlen tokens; an InputError (on `where`) when not even one."""
    ids: list[int] = []
    for trace in _shuffled_traces(traces_dir, seed, where):
        if len(ids) >= nsamples * seqlen:
            break
        ids += trace.example(tokenizer)[0]
    if len(ids) < seqlen:
        raise InputError(where, f"the traces hold {len(ids)} tokens, fewer than one window of seqlen {seqlen}")
    return [ids[i : i + seqlen] for i in range(0, min(len(ids) // seqlen, nsamples) * seqlen, seqlen)]


def generic_text() -> str:
    parts = []
    with warnings.catch_warnings():  # e.g. typing.io's deprecation warning, fired by reading its attributes
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in GENERIC_MODULES:
            _add_docstrings(name, parts)
    return "\n\n".join(dict.fromkeys(parts))


def _add_docstrings(name: str, parts: list[str]) -> None:
    import importlib
    import inspect

    try:
        module = importlib.import_module(name)
    except ImportError:  # e.g. tkinter on a Python built without Tk
        return
    members = [v for k, v in sorted(vars(module).items()) if not k.startswith("_") and not inspect.ismodule(v)]
    for obj in [module] + [v for v in members if getattr(v, "__module__", None) == name]:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 200:  # short ones are mostly signatures and one-liners
            parts.append(doc)


def generic_samples(
    tokenizer, nsamples: int, seqlen: int, seed: int, texts: list[str] | None = None
) -> list[list[int]]:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets into `texts` (a user's corpus,
    documents joined by blank lines) or, when None, the built-in generic text."""
    text = generic_text() if texts is None else "\n\n".join(texts)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        source = "built-in generic text" if texts is None else "calibration text"
        raise InputError("seqlen", f"the {source} has {len(ids)} tokens, not more than seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - seqlen) for _ in range(nsamples)]
    return [ids[s : s + seqlen] for s in starts]


def calibration_loader(samples: list[list[int]]) -> DataLoader:
    """One unpadded sequence per batch ({"input_ids", "attention_mask"} of shape [1, len]), the form
    `oneshot(dataset=DataLoader)` passes straight to the model."""
    batches = [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in samples
    ]
    return DataLoader(batches, batch_size=None, shuffle=False)
