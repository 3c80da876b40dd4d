"""Calibration data for PTQ: token-id samples, and the DataLoader llmcompressor's `oneshot` takes.

Two sources, to reproduce the paper's comparison (domain-matched traces vs generic text):
- "traces": the teacher's own reasoning traces (a `traces` stage's `traces.jsonl`), each rendered
  with the chat template as prompt + completion (`pipeline.data.chat_example`), as the QAT stage
  will see them; truncated to `seqlen`.
- "generic": English prose with no math and no reasoning chains, standing in for WikiText (which
  these machines cannot download): the docstrings of a fixed list of Python standard-library
  modules, which ship with every Python, concatenated and cut into `seqlen`-token windows as GPTQ
  papers cut WikiText. The text depends only on the Python version.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

GENERIC_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "heapq", "html.parser", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "mailbox", "multiprocessing", "optparse", "os", "pathlib",
    "pickle", "pydoc", "queue", "random", "re", "sched", "selectors", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tkinter", "turtle", "typing", "unittest", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)


def traces_samples(tokenizer, traces_dir: str | Path, nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """Up to `nsamples` token-id sequences from `<traces_dir>/traces.jsonl`, a seeded random subset."""
    from pipeline.data import chat_example

    rows = [json.loads(line) for line in (Path(traces_dir) / "traces.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{traces_dir}/traces.jsonl has no rows")
    random.Random(seed).shuffle(rows)
    return [chat_example(tokenizer, r["question"], r["completion"])[0][:seqlen] for r in rows[:nsamples]]


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


def generic_samples(tokenizer, nsamples: int, seqlen: int, seed: int) -> list[list[int]]:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets into the generic text."""
    ids = tokenizer(generic_text(), add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        raise ValueError(f"the generic text has {len(ids)} tokens, fewer than seqlen {seqlen}")
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
