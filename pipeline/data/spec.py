"""The recipe's `data` section: which task the pipeline trains and evaluates on (pure schema).

The chat format is pipeline.data.chat, the `Problem` record pipeline.data.problem.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.data.chat import BOXED_INSTRUCTION
from pipeline.data.testbed import TestbedSpec


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["testbed", "gsm8k", "math500", "jsonl"] = "testbed"
    """Training-domain prompts: the built-in testbed, a benchmark's train split, or a prompts file."""
    testbed: TestbedSpec = TestbedSpec()
    """Difficulty and split sizes of the testbed (used when task is `testbed`)."""
    benchmarks_dir: str | None = None
    """Directory of benchmark files `<bench>_<split>.jsonl` or `.parquet` (fields: pipeline.data.benchmarks);
    None: $REASONING_QAT_BENCHMARKS. Needed by any benchmark other than the testbed that `hub` does not name."""
    hub: dict[Literal["gsm8k", "math500"], str] = {}
    """Benchmarks read through `datasets.load_dataset` instead of files: benchmark -> a hub id
    (openai/gsm8k, HuggingFaceH4/MATH-500; needs the network or the datasets cache) or the local
    directory of a downloaded copy of one."""
    prompts_file: str | None = None
    """Prompts of task `jsonl`: a .jsonl or .parquet file of {"question" (or "problem" / "prompt"), "answer"?}."""
    instruction: str = BOXED_INSTRUCTION
    """Appended to every question in the user turn (traces, eval, gate, rl); "" for the bare question."""
