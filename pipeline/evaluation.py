"""Evaluate a model on a benchmark: sample, grade, report accuracy (avg@K), pass@K, lengths, speed;
or, without generating, perplexity and KL to a teacher on reference solutions or any text.

    from pipeline.evaluation import evaluate
    metrics = evaluate(model, tokenizer, problems, GenerationSpec(...), samples_path="samples.jsonl")

`reasoning-qat eval` (pipeline/cli/eval.py) and `pipeline.api.evaluate` / `pipeline.api.perplexity` load a
model directory and call these functions.

Metrics, with K = spec.num_samples completions per problem:
  accuracy         mean over all completions of "graded correct" (avg@K; plain accuracy when K = 1)
  pass_at_k        fraction of problems with at least one correct completion among their K
  truncation_rate  fraction of completions that hit max_new_tokens without an end token
  mean_tokens      mean generated tokens per completion
  tokens_per_s     generated tokens / wall time of generation
Under `accelerate launch` each process generates a contiguous share of the problems on its own
device and process 0 gathers, grades and writes.

Perplexity (`eval --perplexity`, the eval stage's `perplexity`), teacher-forced, for models whose accuracy
says little (a small pretrained model solves ~2% of GSM8K):
  perplexity         exp of the mean next-token NLL: over each reference solution given its chat
                     prompt (end of turn included), or over a text file in windows of --max-length
  perplexity_tokens  the tokens it is averaged over
  kl_to_teacher      with a teacher: mean per-token KL(teacher || model) over the same tokens
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from pipeline.data.benchmarks import HUB_IDS, NoBenchmarkDir, load_benchmark
from pipeline.data.chat import BOXED_INSTRUCTION, chat_example
from pipeline.data.grading import grade_many
from pipeline.data.problem import Problem
from pipeline.data.rows import write_jsonl
from pipeline.engine.errors import InputError
from pipeline.generate import GenerationSpec, generate


def sample_and_grade(
    model, tokenizer, problems: list[Problem], spec: GenerationSpec, instruction: str = BOXED_INSTRUCTION
) -> tuple[list[dict], float]:
    """Generate K completions per problem (sharded over processes) and grade them.

    Returns one row per completion, problem by problem, each {"id", "question", "gold", "sample",
    "completion", "correct", "num_tokens", "truncated"}, and the generation wall time in seconds.
    Every process gets all rows.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    start = time.perf_counter()
    with state.split_between_processes(problems) as mine:
        outputs = generate(model, tokenizer, [p.question for p in mine], spec, instruction=instruction)
        rows = [
            {
                "id": p.id,
                "question": p.question,
                "gold": p.answer,
                "sample": k,
                "completion": c.text,
                "num_tokens": c.num_tokens,
                "truncated": c.truncated,
            }
            for p, samples in zip(mine, outputs)
            for k, c in enumerate(samples)
        ]
    if state.num_processes > 1:
        rows = gather_object(rows)
    seconds = time.perf_counter() - start
    correct = grade_many([(row["completion"], row["gold"]) for row in rows])
    for row, ok in zip(rows, correct):
        row["correct"] = ok
    return rows, seconds


def summarize(rows: list[dict], num_samples: int, seconds: float) -> dict[str, float]:
    """The metrics of graded rows (see the module docstring)."""
    n = len(rows)
    if n == 0:
        raise ValueError("no completions to summarize")
    by_problem: dict[str, list[bool]] = {}
    for row in rows:
        by_problem.setdefault(row["id"], []).append(row["correct"])
    tokens = sum(row["num_tokens"] for row in rows)
    return {
        "accuracy": sum(row["correct"] for row in rows) / n,
        "pass_at_k": sum(any(v) for v in by_problem.values()) / len(by_problem),
        "truncation_rate": sum(row["truncated"] for row in rows) / n,
        "mean_tokens": tokens / n,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "num_problems": len(by_problem),
        "num_samples": num_samples,
        "generation_s": seconds,
    }


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    spec: GenerationSpec,
    samples_path: str | Path | None = None,
    instruction: str = BOXED_INSTRUCTION,
) -> dict[str, float]:
    """Sample K completions per problem, grade them, write every sample to `samples_path` (jsonl,
    process 0 only) and return the metrics."""
    from accelerate import PartialState

    if not problems:
        raise ValueError("no problems to evaluate")
    rows, seconds = sample_and_grade(model, tokenizer, problems, spec, instruction)
    if samples_path is not None and PartialState().is_main_process:
        write_jsonl(rows, samples_path)
    return summarize(rows, spec.num_samples, seconds)


# -- perplexity and KL to a teacher, teacher-forced --------------------------------------------------


def solution_examples(
    tokenizer, problems: list[Problem], instruction: str = BOXED_INSTRUCTION
) -> list[tuple[list[int], int]]:
    """Each problem's chat (prompt, reference solution, end of turn), measured on the solution only."""
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise InputError("perplexity", f"{len(missing)} problems have no reference solution (first: {missing[0]})")
    return [chat_example(tokenizer, p.question, p.solution, instruction) for p in problems]


def text_examples(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], int]]:
    """Plain text, no chat template: each text tokenized as the tokenizer does by default (with its
    BOS, if any) and cut into windows of `max_length` tokens, each measured on all but its first token
    (non-overlapping windows, as GPTQ papers measure WikiText)."""
    windows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        windows += [(ids[i : i + max_length], 0) for i in range(0, len(ids), max_length) if len(ids) - i > 1]
    if not windows:
        raise InputError("text", "no text of two tokens or more to measure")
    return windows


def perplexity(
    model,
    examples: list[tuple[list[int], int]],
    pad_id: int,
    teacher=None,
    batch_size: int = 16,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Teacher-forced perplexity of the examples' ids[start:] (exp of the mean next-token NLL over
    them) and, with a `teacher` model, the mean forward KL(teacher || model) per token over the same
    positions: the measures of a model that its accuracy cannot tell apart (a weak base, held-out
    text). Sharded over processes like generation; every process gets the result.

    Logits are made `chunk_size` positions at a time in float32 from the decoder's last hidden states:
    a batch of them over Qwen3's 151,936-token vocabulary would be gigabytes."""
    import torch
    from accelerate import PartialState

    from pipeline.train.loop import collate

    state = PartialState()
    device = next(model.parameters()).device
    nll, kl, tokens = 0.0, 0.0, 0
    with state.split_between_processes(examples) as mine, torch.no_grad():
        for i in range(0, len(mine), batch_size):
            # padding is masked out of attention and labels: any id serves when the tokenizer has none
            batch = {k: v.to(device) for k, v in collate(mine[i : i + batch_size], pad_id or 0).items()}
            for chunk_nll, chunk_kl, chunk_tokens in _chunk_sums(model, teacher, batch, chunk_size):
                nll += chunk_nll
                kl += chunk_kl
                tokens += chunk_tokens
    nll, kl, tokens = _sum_over_processes(state, (nll, kl, tokens))
    if tokens == 0:
        raise InputError("perplexity", "no token to measure")
    metrics = {"perplexity": math.exp(nll / tokens), "perplexity_tokens": tokens}
    if teacher is not None:
        metrics["kl_to_teacher"] = kl / tokens
    return metrics


def _chunk_sums(model, teacher, batch: dict, chunk_size: int):
    """Per row of the batch and per `chunk_size` of its labelled positions: (summed next-token NLL,
    summed KL(teacher || model) or 0.0 without a teacher, positions), logits in float32."""
    import torch.nn.functional as F

    from pipeline.train.distill import token_divergence

    hidden = _last_hidden(model, batch)
    teacher_hidden = None if teacher is None else _last_hidden(teacher, batch)
    for row in range(hidden.shape[0]):
        labels = batch["labels"][row, 1:]  # position t predicts token t + 1
        keep = labels != -100
        states, targets = hidden[row, :-1][keep], labels[keep]
        for c in range(0, len(targets), chunk_size):
            logits = model.get_output_embeddings()(states[c : c + chunk_size]).float()
            chunk_nll = F.cross_entropy(logits, targets[c : c + chunk_size], reduction="sum").item()
            chunk_kl = 0.0
            if teacher is not None:
                reference = teacher.get_output_embeddings()(teacher_hidden[row, :-1][keep][c : c + chunk_size])
                chunk_kl = token_divergence(logits, reference).sum().item()
            yield chunk_nll, chunk_kl, len(targets[c : c + chunk_size])


def _sum_over_processes(state, sums: tuple) -> tuple:
    """Each entry of `sums` added up over the processes (every process gets the totals)."""
    from accelerate.utils import gather_object

    totals = gather_object([sums]) if state.num_processes > 1 else [sums]
    return tuple(sum(t[j] for t in totals) for j in range(len(sums)))


def _last_hidden(model, batch):
    """(batch, seq, hidden): the decoder's final (normed) hidden states, what the lm_head reads."""
    return model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state


def solution_perplexity(
    model, tokenizer, problems: list[Problem], batch_size: int = 16, teacher=None, instruction: str = BOXED_INSTRUCTION
) -> dict[str, float]:
    """Perplexity (and KL to `teacher`) of the problems' reference solutions given their prompts,
    end of turn included: the WikiText-style measure on held-out in-domain text."""
    return perplexity(
        model,
        solution_examples(tokenizer, problems, instruction),
        tokenizer.pad_token_id,
        teacher=teacher,
        batch_size=batch_size,
    )


# -- problems ------------------------------------------------------------------------------------

EVAL_WAYS_OUT = (
    "pass --data-dir DIR or set $REASONING_QAT_BENCHMARKS, "
    f"or read {' / '.join(HUB_IDS)} with --hub ({', '.join(HUB_IDS.values())})"
)
"""How `eval` (pipeline.api.evaluate / perplexity) names the benchmark directory: NoBenchmarkDir's ways out."""


def bench_problems(
    bench: str, limit: int | None, data_dir: str | None, hub: str | None, data=None
) -> tuple[list[Problem], str]:
    """`bench`'s first `limit` problems and the instruction to ask them with: from `data_dir` or the hub
    dataset `hub` (a hub id or local copy), else from `data` (a recipe's DataSpec: its testbed, sources and
    instruction)."""
    testbed, hubs, instruction = None, {}, BOXED_INSTRUCTION
    if data is not None:
        testbed, data_dir, hubs, instruction = (
            data.testbed,
            data_dir or data.benchmarks_dir,
            dict(data.hub),
            data.instruction,
        )
    if hub is not None:
        if bench not in HUB_IDS:
            raise InputError("--hub", f"{bench} is not read from the hub here; --hub serves {', '.join(HUB_IDS)}")
        hubs[bench] = hub
    try:
        return load_benchmark(bench, limit=limit, data_dir=data_dir, testbed=testbed, hub=hubs), instruction
    except NoBenchmarkDir:
        raise NoBenchmarkDir("--data-dir", EVAL_WAYS_OUT) from None
