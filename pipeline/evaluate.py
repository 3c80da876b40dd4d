"""Evaluate a model on a benchmark: sample, grade, report accuracy (avg@K), pass@K, lengths, speed.

    reasoning-qat eval artifacts/demo/teacher --bench testbed
    reasoning-qat eval MODEL_DIR --bench gsm8k --limit 200 --out gsm8k.jsonl
    reasoning-qat eval MODEL_DIR --bench math500 --samples 4 --temperature 0.6 --top-p 0.95 --top-k 20 \\
        --max-new-tokens 4096

    from pipeline.evaluate import evaluate
    metrics = evaluate(model, tokenizer, problems, GenerationSpec(...), samples_path="samples.jsonl")

Metrics, with K = spec.num_samples completions per problem:
  accuracy         mean over all completions of "graded correct" (avg@K; plain accuracy when K = 1)
  pass_at_k        fraction of problems with at least one correct completion among their K
  truncation_rate  fraction of completions that hit max_new_tokens without an end token
  mean_tokens      mean generated tokens per completion
  tokens_per_s     generated tokens / wall time of generation
Under `accelerate launch` each process generates a contiguous share of the problems on its own
device and process 0 gathers, grades and writes.

The CLI's testbed problems come from `TestbedSpec()` unless `--recipe` names a recipe, whose
`data.testbed` (and `data.benchmarks_dir`) are then used: the same test split that recipe's eval
stages see.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from pipeline.benchmarks import BENCHMARKS
from pipeline.data import Problem
from pipeline.errors import InputError
from pipeline.generate import GenerationSpec, generate
from pipeline.grading import grade_many


def sample_and_grade(model, tokenizer, problems: list[Problem], spec: GenerationSpec) -> tuple[list[dict], float]:
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
        outputs = generate(model, tokenizer, [p.question for p in mine], spec)
        rows = [{"id": p.id, "question": p.question, "gold": p.answer, "sample": k, "completion": c.text,
                 "num_tokens": c.num_tokens, "truncated": c.truncated}
                for p, samples in zip(mine, outputs) for k, c in enumerate(samples)]
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


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(model, tokenizer, problems: list[Problem], spec: GenerationSpec,
             samples_path: str | Path | None = None) -> dict[str, float]:
    """Sample K completions per problem, grade them, write every sample to `samples_path` (jsonl,
    process 0 only) and return the metrics."""
    from accelerate import PartialState

    if not problems:
        raise ValueError("no problems to evaluate")
    rows, seconds = sample_and_grade(model, tokenizer, problems, spec)
    if samples_path is not None and PartialState().is_main_process:
        write_jsonl(rows, samples_path)
    return summarize(rows, spec.num_samples, seconds)


def solution_perplexity(model, tokenizer, problems: list[Problem], batch_size: int = 16) -> dict[str, float]:
    """Perplexity of the problems' reference solutions given their prompts, teacher-forced: exp of the
    mean next-token NLL over every solution token (end of turn included), the WikiText-style measure
    on held-out in-domain text. Sharded over processes like generation; every process gets the result.

    Logits are taken one sequence at a time in float32: a batch of them over Qwen3's 151,936-token
    vocabulary would be gigabytes."""
    import math

    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from pipeline.data import chat_example
    from pipeline.train import collate

    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise InputError("perplexity", f"{len(missing)} problems have no reference solution (first: {missing[0]})")
    state = PartialState()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    with state.split_between_processes(problems) as mine, torch.no_grad():
        for i in range(0, len(mine), batch_size):
            examples = [chat_example(tokenizer, p.question, p.solution) for p in mine[i:i + batch_size]]
            batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            for row in range(hidden.shape[0]):
                labels = batch["labels"][row, 1:]
                keep = labels != -100
                logits = model.lm_head(hidden[row, :-1][keep]).float()
                nll += torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum").item()
                tokens += int(keep.sum())
    totals = gather_object([(nll, tokens)]) if state.num_processes > 1 else [(nll, tokens)]
    nll, tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
    return {"perplexity": math.exp(nll / tokens), "perplexity_tokens": tokens}


# -- the `reasoning-qat eval` subcommand -------------------------------------------------------------

_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
          "top_k": "--top-k", "num_samples": "--samples", "batch_size": "--batch-size", "seed": "--seed",
          "backend": "--backend"}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationSpec()
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a stage directory or a Hugging Face model directory")
    parser.add_argument("--bench", default="testbed", metavar="NAME",
                        help=f"benchmark: {', '.join(BENCHMARKS)} (default testbed)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    parser.add_argument("--samples", type=int, default=1, metavar="K",
                        help="completions per problem: accuracy is avg@K, and pass@K is reported (needs --temperature > 0)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write every sample here (jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--backend", default=defaults.backend,
                        choices=typing.get_args(GenerationSpec.model_fields["backend"].annotation))
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="benchmark jsonl directory (default $REASONING_QAT_BENCHMARKS, else ../shared/data/benchmarks)")
    parser.add_argument("--recipe", default=None, metavar="RECIPE",
                        help="take the testbed spec and data dir from this recipe's `data` section")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype (default: as saved)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose loading runs Python from its directory (config.json auto_map)")


def _spec_from_args(args: argparse.Namespace) -> GenerationSpec:
    values = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "num_samples": args.samples, "batch_size": args.batch_size, "seed": args.seed,
              "backend": args.backend}
    try:
        return GenerationSpec(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = _FLAGS.get(str(err["loc"][0]), "--samples") if err["loc"] else "--samples"
        raise InputError(where, err["msg"].removeprefix("Value error, ")) from None


def _check_model_dir(path: str, trust_remote_code: bool) -> None:
    from pipeline.models import check_model_dir

    if not Path(path).exists():
        raise InputError("MODEL_DIR", f"no such directory: {path}")
    inner = Path(check_model_dir(path, "MODEL_DIR", trust_remote_code))
    if not any((inner / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError("MODEL_DIR", f"{inner} has no tokenizer (tokenizer.json / tokenizer_config.json)")


def _check_out(path: str) -> None:
    """`--out` must be a file this process can write, checked before the evaluation it would end."""
    out = Path(path)
    if out.is_dir():
        raise InputError("--out", f"{path} is a directory; give a file name, e.g. {out / 'samples.jsonl'}")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise InputError("--out", f"{folder} is a file, so {path} cannot be written")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError("--out", f"{path} cannot be written (permission denied)")


def cli_eval(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    from pipeline import api

    spec = _spec_from_args(args)
    metrics = api.evaluate(args.model_dir, args.bench, args.limit, spec, args.out, data_dir=args.data_dir,
                           recipe=args.recipe, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if PartialState().is_main_process:
        k = spec.num_samples
        table = Table(title=f"{args.model_dir} on {args.bench} ({metrics['num_problems']} problems, K={k})")
        for name in ("metric", "value"):
            table.add_column(name)
        table.add_row("accuracy" + (f" (avg@{k})" if k > 1 else ""), f"{metrics['accuracy']:.2%}")
        table.add_row(f"pass@{k}", f"{metrics['pass_at_k']:.2%}")
        table.add_row("truncated", f"{metrics['truncation_rate']:.2%}")
        table.add_row("mean tokens", f"{metrics['mean_tokens']:.1f}")
        table.add_row("tokens/s", f"{metrics['tokens_per_s']:.0f}")
        if args.out:
            table.add_row("samples", str(args.out))
        Console().print(table)
    return 0
