"""`traces.jsonl`: the teacher's solutions that the `traces` stage writes and sft, kd_qat and ptq read.

One record (`Trace`), one writer and one reader, so that every stage agrees on the file:

    write_traces(traces, out_dir)                               # the traces stage
    traces = read_traces(traces_dir, "stages.ptq.calibration")  # every trace (ptq calibration)
    kept = training_traces(traces_dir, only_correct=True, stage="kd_qat", log=log)   # sft, kd_qat
    examples = [t.example(tokenizer) for t in kept]             # (token ids, completion start)

A trace records the instruction its prompt carried, so training and calibration render exactly the
prompt the teacher answered.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data.chat import BOXED_INSTRUCTION, chat_example
from pipeline.engine.errors import InputError
from pipeline.data.rows import read_jsonl, write_jsonl

TRACES_FILE = "traces.jsonl"


class Trace(BaseModel):
    """One sampled completion of one training-domain prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    """The problem's id (the same for its K samples)."""
    question: str
    instruction: str = BOXED_INSTRUCTION
    """What followed the question in the user turn (traces written before this field had the default)."""
    answer: str
    """Gold answer ("" for prompts without one, which are then never correct)."""
    completion: str
    correct: bool
    """Graded correct against `answer`."""
    num_tokens: int
    sample: int
    """Which of the prompt's K samples."""
    truncated: bool
    """Hit max_new_tokens without an end of turn."""

    def example(self, tokenizer) -> tuple[list[int], int]:
        """Token ids of the chat (prompt + completion + end of turn) and where the completion starts."""
        return chat_example(tokenizer, self.question, self.completion, self.instruction)


def write_traces(traces: list[Trace], out_dir: str | Path) -> Path:
    path = Path(out_dir) / TRACES_FILE
    write_jsonl([t.model_dump() for t in traces], path)
    return path


def read_traces(traces_dir: str | Path, where: str) -> list[Trace]:
    """Every trace in `<traces_dir>/traces.jsonl`; a missing file or a malformed row is an InputError
    blamed on `where` (the key that named the traces stage)."""
    path = Path(traces_dir) / TRACES_FILE
    if not path.is_file():
        raise InputError(where, f"{path} not found (is it a traces stage?)")
    traces = []
    for i, row in enumerate(read_jsonl(path, where), 1):
        try:
            traces.append(Trace.model_validate(row))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise InputError(where, f"{path}: row {i}: {field}: {err['msg'].lower()}") from None
    if not traces:
        raise InputError(where, f"{path} holds no traces")
    return traces


def training_traces(traces_dir: str | Path, only_correct: bool, stage: str, log) -> list[Trace]:
    """The traces a training stage (sft, kd_qat) named `stage` trains on: every trace of its `data`
    stage, or the graded-correct ones when `only_correct`; logs how many it kept of how many.

    None left is a failure of the run (the teacher solved nothing), not of the recipe: a RuntimeError
    naming the stage's `only_correct` key and the ways out."""
    traces = read_traces(traces_dir, f"stages.{stage}.data")
    kept = [t for t in traces if t.correct or not only_correct]
    log.info("%s: %d of %d traces kept (only_correct: %s)", stage, len(kept), len(traces), str(only_correct).lower())
    if not kept:
        raise RuntimeError(
            f"stages.{stage}.only_correct: none of the {len(traces)} traces was graded correct, so "
            "nothing is left to train on; set only_correct: false to train on every trace, or write "
            "more traces (the traces stage's count or generation.num_samples) or with a stronger teacher"
        )
    return kept
