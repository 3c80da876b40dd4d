"""Evaluate a model on a benchmark: sample, grade, report accuracy (avg@K), pass@K, lengths, speed;
or, without generating, perplexity and KL to a teacher on reference solutions or any text.

    reasoning-qat eval artifacts/demo/teacher --bench testbed
    reasoning-qat eval MODEL_DIR --bench gsm8k --limit 200 --out gsm8k.jsonl
    reasoning-qat eval MODEL_DIR --bench math500 --samples 4 --temperature 0.6 --top-p 0.95 --top-k 20 \\
        --max-new-tokens 4096
    reasoning-qat eval MODEL_DIR --bench gsm8k --hub openai/gsm8k --perplexity --teacher TEACHER_DIR
    reasoning-qat eval MODEL_DIR --text heldout.jsonl --teacher TEACHER_DIR --max-length 1024

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

Perplexity (`--perplexity`, the eval stage's `perplexity`), teacher-forced, for models whose accuracy
says little (a small pretrained model solves ~2% of GSM8K):
  perplexity         exp of the mean next-token NLL: over each reference solution given its chat
                     prompt (end of turn included), or over a text file in windows of --max-length
  perplexity_tokens  the tokens it is averaged over
  kl_to_teacher      with a teacher: mean per-token KL(teacher || model) over the same tokens

The CLI's testbed problems come from `TestbedSpec()` unless `--recipe` names a recipe, whose
`data.testbed`, `data.benchmarks_dir`, `data.hub` and `data.instruction` are then used: the same
prompts that recipe's eval stages see.
"""
from __future__ import annotations

import argparse
import math
import os
import time
import typing
from pathlib import Path

from pydantic import ValidationError

from pipeline.data.benchmarks import BENCHMARKS, HUB_IDS, load_benchmark
from pipeline.data.chat import BOXED_INSTRUCTION, chat_example
from pipeline.data.problem import Problem
from pipeline.engine.errors import InputError
from pipeline.generate import GenerationSpec, generate
from pipeline.data.grading import grade_many
from pipeline.data.rows import write_jsonl


def sample_and_grade(model, tokenizer, problems: list[Problem], spec: GenerationSpec,
                     instruction: str = BOXED_INSTRUCTION) -> tuple[list[dict], float]:
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


def evaluate(model, tokenizer, problems: list[Problem], spec: GenerationSpec,
             samples_path: str | Path | None = None, instruction: str = BOXED_INSTRUCTION) -> dict[str, float]:
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

def solution_examples(tokenizer, problems: list[Problem],
                      instruction: str = BOXED_INSTRUCTION) -> list[tuple[list[int], int]]:
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
        windows += [(ids[i:i + max_length], 0) for i in range(0, len(ids), max_length) if len(ids) - i > 1]
    if not windows:
        raise InputError("text", "no text of two tokens or more to measure")
    return windows


def perplexity(model, examples: list[tuple[list[int], int]], pad_id: int, teacher=None, batch_size: int = 16,
               chunk_size: int = 1024) -> dict[str, float]:
    """Teacher-forced perplexity of the examples' ids[start:] (exp of the mean next-token NLL over
    them) and, with a `teacher` model, the mean forward KL(teacher || model) per token over the same
    positions: the measures of a model that its accuracy cannot tell apart (a weak base, held-out
    text). Sharded over processes like generation; every process gets the result.

    Logits are made `chunk_size` positions at a time in float32 from the decoder's last hidden states:
    a batch of them over Qwen3's 151,936-token vocabulary would be gigabytes."""
    import torch
    import torch.nn.functional as F
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from pipeline.train.distill import token_divergence
    from pipeline.train.loop import collate

    state = PartialState()
    device = next(model.parameters()).device
    nll, kl, tokens = 0.0, 0.0, 0
    with state.split_between_processes(examples) as mine, torch.no_grad():
        for i in range(0, len(mine), batch_size):
            # padding is masked out of attention and labels: any id serves when the tokenizer has none
            batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], pad_id or 0).items()}
            hidden = _last_hidden(model, batch)
            teacher_hidden = None if teacher is None else _last_hidden(teacher, batch)
            for row in range(hidden.shape[0]):
                labels = batch["labels"][row, 1:]  # position t predicts token t + 1
                keep = labels != -100
                states, targets = hidden[row, :-1][keep], labels[keep]
                for c in range(0, len(targets), chunk_size):
                    logits = model.get_output_embeddings()(states[c:c + chunk_size]).float()
                    nll += F.cross_entropy(logits, targets[c:c + chunk_size], reduction="sum").item()
                    if teacher is not None:
                        reference = teacher.get_output_embeddings()(teacher_hidden[row, :-1][keep][c:c + chunk_size])
                        kl += token_divergence(logits, reference).sum().item()
                tokens += len(targets)
    totals = gather_object([(nll, kl, tokens)]) if state.num_processes > 1 else [(nll, kl, tokens)]
    nll, kl, tokens = (sum(t[j] for t in totals) for j in range(3))
    if tokens == 0:
        raise InputError("perplexity", "no token to measure")
    metrics = {"perplexity": math.exp(nll / tokens), "perplexity_tokens": tokens}
    if teacher is not None:
        metrics["kl_to_teacher"] = kl / tokens
    return metrics


def _last_hidden(model, batch):
    """(batch, seq, hidden): the decoder's final (normed) hidden states, what the lm_head reads."""
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).last_hidden_state


def solution_perplexity(model, tokenizer, problems: list[Problem], batch_size: int = 16, teacher=None,
                        instruction: str = BOXED_INSTRUCTION) -> dict[str, float]:
    """Perplexity (and KL to `teacher`) of the problems' reference solutions given their prompts,
    end of turn included: the WikiText-style measure on held-out in-domain text."""
    return perplexity(model, solution_examples(tokenizer, problems, instruction), tokenizer.pad_token_id,
                      teacher=teacher, batch_size=batch_size)


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
                        help="directory of <bench>_<split>.jsonl / .parquet files (default $REASONING_QAT_BENCHMARKS)")
    parser.add_argument("--hub", default=None, metavar="DATASET",
                        help=f"read --bench through `datasets` from this hub id or local copy ({', '.join(HUB_IDS.values())})")
    parser.add_argument("--recipe", default=None, metavar="RECIPE",
                        help="take the testbed spec, data sources and instruction from this recipe's `data` section")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype (default: as saved)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model whose loading runs Python from its directory (config.json auto_map)")
    parser.add_argument("--perplexity", action="store_true",
                        help="no generation: perplexity of --bench's reference solutions (or of --text), teacher-forced")
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="perplexity over this text (.jsonl / .parquet with a `text` field) instead; implies --perplexity")
    parser.add_argument("--teacher", default=None, metavar="DIR",
                        help="also the mean per-token KL(teacher || model) on the same text; implies --perplexity")
    parser.add_argument("--max-length", type=int, default=2048, metavar="N", help="tokens per window of --text")


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


def _check_model_dir(path: str, where: str, trust_remote_code: bool) -> None:
    from pipeline.models import PASS_TRUST_FLAG, check_model_dir

    if not Path(path).exists():
        raise InputError(where, f"no such directory: {path}")
    inner = Path(check_model_dir(path, where, trust_remote_code, allow=PASS_TRUST_FLAG))
    if not any((inner / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(where, f"{inner} has no tokenizer (tokenizer.json / tokenizer_config.json)")


def bench_problems(bench: str, limit: int | None, data_dir: str | None, hub: str | None,
                   data=None) -> tuple[list[Problem], str]:
    """`bench`'s first `limit` problems and the instruction to ask them with: from `data_dir` or the hub
    dataset `hub` (a hub id or local copy), else from `data` (a recipe's DataSpec: its testbed, sources and
    instruction)."""
    testbed, hubs, instruction = None, {}, BOXED_INSTRUCTION
    if data is not None:
        testbed, data_dir, hubs, instruction = data.testbed, data_dir or data.benchmarks_dir, dict(data.hub), data.instruction
    if hub is not None:
        if bench not in HUB_IDS:
            raise InputError("--hub", f"{bench} is not read from the hub here; --hub serves {', '.join(HUB_IDS)}")
        hubs[bench] = hub
    return load_benchmark(bench, limit=limit, data_dir=data_dir, testbed=testbed, hub=hubs), instruction


def _tokenizer(path: str, where: str, needs_chat: bool, trust_remote_code: bool):
    """The tokenizer of a model directory the user named, checked before any weights are read."""
    from pipeline.data.chat import NO_CHAT_TEMPLATE
    from pipeline.models import load_tokenizer

    _check_model_dir(path, where, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if needs_chat and not tokenizer.chat_template:
        raise InputError(where, f"{path} {NO_CHAT_TEMPLATE}")
    return tokenizer


def _model(path: str, dtype: str | None, trust_remote_code: bool):
    from accelerate import PartialState

    from pipeline.models import load_model

    return load_model(path, dtype=dtype, device=PartialState().device, trust_remote_code=trust_remote_code)


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
    return (_cli_perplexity if args.perplexity or args.text or args.teacher else _cli_generate)(args)


def _cli_generate(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    from pipeline import api

    spec = _spec_from_args(args)
    metrics = api.evaluate(args.model_dir, args.bench, args.limit, spec, args.out, data_dir=args.data_dir,
                           hub=args.hub, recipe=args.recipe, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
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


def _cli_perplexity(args: argparse.Namespace) -> int:
    """`eval --perplexity`: perplexity (and KL to --teacher) of --bench's reference solutions or of --text."""
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    from pipeline.data.rows import read_texts

    if args.out is not None:
        raise InputError("--out", "perplexity generates no samples to write; drop --out or --perplexity")
    if args.max_length < 2:
        raise InputError("--max-length", f"must be >= 2, got {args.max_length}")
    texts = read_texts(args.text, "--text") if args.text else None
    if texts is None:
        from pipeline import api

        data = api.load(args.recipe).data if args.recipe is not None else None
        problems, instruction = bench_problems(args.bench, args.limit, args.data_dir, args.hub, data)
    trust = args.trust_remote_code
    tokenizer = _tokenizer(args.model_dir, "MODEL_DIR", needs_chat=texts is None, trust_remote_code=trust)
    if args.teacher:
        _tokenizer(args.teacher, "--teacher", needs_chat=False, trust_remote_code=trust)
    examples = (text_examples(tokenizer, texts, args.max_length) if texts
                else solution_examples(tokenizer, problems, instruction))
    model = _model(args.model_dir, args.dtype, trust)
    teacher = None
    if args.teacher:
        teacher = _model(args.teacher, args.dtype, trust)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise InputError("--teacher", f"vocabulary {teacher.config.vocab_size} differs from the model's "
                             f"{model.config.vocab_size}")
    metrics = perplexity(model, examples, tokenizer.pad_token_id, teacher=teacher, batch_size=args.batch_size)
    if PartialState().is_main_process:
        table = Table(title=f"{args.model_dir}, teacher-forced")
        for name in ("metric", "value"):
            table.add_column(name)
        table.add_row("text", args.text or f"{args.bench} reference solutions ({len(problems)} problems)")
        table.add_row("perplexity", f"{metrics['perplexity']:.4f}")
        table.add_row("tokens", str(metrics["perplexity_tokens"]))
        if teacher is not None:
            table.add_row("teacher", args.teacher)
            table.add_row("KL(teacher || model)", f"{metrics['kl_to_teacher']:.4f}")
        Console().print(table)
    return 0
