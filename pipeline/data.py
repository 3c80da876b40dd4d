"""The recipe's `data` section: which task the pipeline trains and evaluates on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.tasks.testbed import TestbedSpec


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["testbed", "gsm8k", "math500", "jsonl"] = "testbed"
    """Training-domain prompts: the built-in testbed, a benchmark's train split, or a jsonl file."""
    testbed: TestbedSpec = TestbedSpec()
    """Difficulty and split sizes of the testbed (used when task is `testbed`)."""
    benchmarks_dir: str | None = None
    """Directory of the benchmark jsonl files; None: $REASONING_QAT_BENCHMARKS, else ../shared/data/benchmarks."""
    prompts_file: str | None = None
    """A jsonl of prompts (task `jsonl`)."""


# The instruction the Qwen3 model cards append to math prompts.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    """One verifiable problem, from the testbed or a benchmark."""

    id: str
    question: str
    """The problem statement, without the instruction."""
    answer: str
    """Gold final answer (a number or a LaTeX expression), what `pipeline.grading.grade` compares to."""
    solution: str | None = None
    """Reference solution: for the testbed, the assistant text to train on (`<think>…</think>` + boxed)."""


def user_message(question: str) -> str:
    """The user turn for a problem, as the Qwen3 cards prompt math."""
    return f"{question}\n{BOXED_INSTRUCTION}"


def chat_prompt(tokenizer, question: str) -> str:
    """The text a model continues from: chat template applied, generation prompt added."""
    messages = [{"role": "user", "content": user_message(question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_example(tokenizer, question: str, completion: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ end of turn), and where the completion starts.

    Training stages (sft, kd_qat) put the loss on ids[start:] only; PTQ calibrates on all of them.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + END_OF_TURN, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, len(prompt_ids)


END_OF_TURN = "<|im_end|>"


def training_pairs(traces_dir, only_correct: bool, where: str) -> list[tuple[str, str]]:
    """(question, completion) pairs of a `traces` stage's `traces.jsonl`, only the graded-correct ones
    when `only_correct`; what `sft` and `kd_qat` train on. `where` is the key path blamed when the
    directory holds no such traces."""
    from pathlib import Path

    from pipeline.benchmarks import read_jsonl  # pipeline.benchmarks imports this module
    from pipeline.errors import InputError

    path = Path(traces_dir) / "traces.jsonl"
    if not path.is_file():
        raise InputError(where, f"{path} not found (is it a traces stage?)")
    rows = read_jsonl(path, where)
    pairs = [(r["question"], r["completion"]) for r in rows if r.get("correct", False) or not only_correct]
    if not pairs:
        raise InputError(where, f"{path} holds no {'correct ' if only_correct else ''}traces")
    return pairs

