"""`reasoning-qat eval MODEL_DIR`: accuracy on a benchmark (pipeline.api.evaluate), or teacher-forced perplexity
and KL to a teacher (pipeline.api.perplexity); pipeline.evaluation holds the measures.

    reasoning-qat eval artifacts/demo/teacher --bench testbed
    reasoning-qat eval MODEL_DIR --bench gsm8k --limit 200 --out gsm8k.jsonl
    reasoning-qat eval MODEL_DIR --bench math500 --samples 4 --temperature 0.6 --top-p 0.95 --top-k 20 \\
        --max-new-tokens 4096
    reasoning-qat eval MODEL_DIR --bench gsm8k --hub openai/gsm8k --perplexity --teacher TEACHER_DIR
    reasoning-qat eval MODEL_DIR --text heldout.jsonl --teacher TEACHER_DIR --max-length 1024

The decoding flags are GenerationSpec's fields (pipeline.generate), each `--<field-name>` (num_samples is
`--samples`), with the field's default, type and documentation: a field added there is a flag here.
The testbed problems come from `TestbedSpec()` unless `--recipe` names a recipe, whose `data.testbed`,
`data.benchmarks_dir`, `data.hub` and `data.instruction` are then used: the same prompts that recipe's eval
stages see. A flag the chosen measurement would ignore (`--max-length` without `--text`, decoding flags but
`--batch-size` with perplexity, benchmark flags with `--text`, `--hub` with `--data-dir`) is refused, exit 2.
"""

from __future__ import annotations

import argparse
import types
import typing

from pipeline.cli.common import trust_remote_code_argument

HELP = "evaluate a model on a benchmark (accuracy, samples.jsonl), or its perplexity / KL to a teacher"

FLAG_NAMES = {"num_samples": "--samples"}
"""GenerationSpec fields whose flag is not `--<field-name>`."""
METAVARS = {int: "N", float: "X", str: "TEXT"}
DEFAULT_BENCH = "testbed"
DEFAULT_MAX_LENGTH = 2048
BENCH_FLAGS = ("--bench", "--limit", "--hub", "--data-dir", "--recipe")
"""The flags that choose benchmark problems, which --text replaces."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.data.benchmarks import BENCHMARKS, HUB_IDS

    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a stage directory or a Hugging Face model directory")
    parser.add_argument(
        "--bench",
        default=DEFAULT_BENCH,
        metavar="NAME",
        help=f"benchmark: {', '.join(BENCHMARKS)} (default {DEFAULT_BENCH})",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems")
    parser.add_argument("--out", default=None, metavar="FILE", help="write every sample here (jsonl)")
    decoding_arguments(parser.add_argument_group("decoding (GenerationSpec)"))
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="directory of <bench>_<split>.jsonl / .parquet files (default $REASONING_QAT_BENCHMARKS)",
    )
    parser.add_argument(
        "--hub",
        default=None,
        metavar="DATASET",
        help=f"read --bench through `datasets` from this hub id or local copy ({', '.join(HUB_IDS.values())})",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="RECIPE",
        help="take the testbed spec, data sources and instruction from this recipe's `data` section",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="load the weights in this dtype (default: as saved)",
    )
    trust_remote_code_argument(parser)
    parser.add_argument(
        "--perplexity",
        action="store_true",
        help="no generation: perplexity of --bench's reference solutions (or of --text), teacher-forced",
    )
    parser.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="perplexity over this text (.jsonl / .parquet with a `text` field) instead; implies --perplexity",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        metavar="DIR",
        help="also the mean per-token KL(teacher || model) on the same text; implies --perplexity",
    )
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, metavar="N", help="tokens per window of --text"
    )


def flag(field: str) -> str:
    """The command-line flag of a GenerationSpec field."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def decoding_arguments(parser) -> None:
    """One flag per GenerationSpec field, defaulting to the field's default; values are checked by GenerationSpec
    itself (spec_from_args), so a bad one is refused with the field's own rule, named by its flag."""
    from pipeline.engine.reference import attribute_docs
    from pipeline.generate import GenerationSpec

    docs = attribute_docs(GenerationSpec)
    for name, info in GenerationSpec.model_fields.items():
        kind = _argument_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        text = " ".join((info.description or docs.get(name, "")).split()).replace("%", "%%")
        parser.add_argument(
            flag(name), dest=name, default=default, help=f"{text} (default %(default)s)".lstrip(), **kind
        )


def _argument_type(annotation) -> dict:
    """argparse's type / choices / action for a field's annotation; YAML for anything else (lists, dicts), checked
    by GenerationSpec like a recipe value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]  # X | None: the flag takes an X
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": METAVARS[annotation]}
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    return {"type": _yaml, "metavar": "YAML"}


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not YAML: {text!r} ({e.problem})") from None


def spec_from_args(args: argparse.Namespace):
    """The GenerationSpec of the decoding flags; a value it refuses is an InputError naming the flag."""
    from pydantic import ValidationError

    from pipeline.engine.errors import InputError
    from pipeline.generate import GenerationSpec

    values = {name: getattr(args, name) for name in GenerationSpec.model_fields}
    try:
        return GenerationSpec(**values)
    except ValidationError as e:
        err = e.errors()[0]
        # a whole-spec rule (num_samples > 1 needs sampling) has no field: it is about --samples
        where = flag(str(err["loc"][0])) if err["loc"] else "--samples"
        raise InputError(where, err["msg"].removeprefix("Value error, ")) from None


def run(args: argparse.Namespace) -> int:
    _refuse_ignored_flags(args)
    return (_perplexity if args.perplexity or args.text or args.teacher else _generate)(args)


def _refuse_ignored_flags(args: argparse.Namespace) -> None:
    """A flag that the chosen measurement would ignore is refused, naming it and the flag that makes it moot, before
    any model loads: run anyway, the user would take the numbers for what the flag asked."""
    from pipeline.engine.errors import InputError
    from pipeline.generate import GenerationSpec

    given = _given_flags(args)
    if "--hub" in given and "--data-dir" in given:
        raise InputError("--hub", "reads --bench from the hub, --data-dir from files; give one of them")
    if args.text:
        moot = next((f for f in BENCH_FLAGS if f in given), None)
        if moot:
            raise InputError(moot, f"--text measures its own file, not a benchmark; drop {moot} or --text")
    elif "--max-length" in given:
        raise InputError("--max-length", "sets the windows of --text, which is not given; drop it or add --text")
    mode = next((f for f in ("--perplexity", "--text", "--teacher") if f in given), None)
    if mode is None:
        return
    if "--out" in given:
        raise InputError("--out", f"perplexity generates no samples to write; drop --out or {mode}")
    # --batch-size is the one decoding flag perplexity uses: sequences per forward pass
    decoding = [flag(name) for name in GenerationSpec.model_fields if name != "batch_size"]
    moot = next((f for f in decoding if f in given), None)
    if moot:
        raise InputError(moot, f"perplexity is teacher-forced, nothing is generated; drop {moot} or {mode}")


def _given_flags(args: argparse.Namespace) -> set[str]:
    """The flags set to something other than their default (a flag given its default changes nothing)."""
    from pipeline.generate import GenerationSpec

    defaults = {"bench": DEFAULT_BENCH, "max_length": DEFAULT_MAX_LENGTH} | {
        name: info.get_default(call_default_factory=True) for name, info in GenerationSpec.model_fields.items()
    }
    return {
        flag(dest)
        for dest, value in vars(args).items()
        if value is not None and value is not False and value != defaults.get(dest)
    }


def _generate(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    from pipeline import api

    spec = spec_from_args(args)
    metrics = api.evaluate(
        args.model_dir,
        args.bench,
        args.limit,
        spec,
        args.out,
        data_dir=args.data_dir,
        hub=args.hub,
        recipe=args.recipe,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
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


def _perplexity(args: argparse.Namespace) -> int:
    """`eval --perplexity`: perplexity (and KL to --teacher) of --bench's reference solutions or of --text."""
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    from pipeline import api

    metrics = api.perplexity(
        args.model_dir,
        args.bench,
        args.limit,
        text=args.text,
        teacher=args.teacher,
        max_length=args.max_length,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        hub=args.hub,
        recipe=args.recipe,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    if PartialState().is_main_process:
        table = Table(title=f"{args.model_dir}, teacher-forced")
        for name in ("metric", "value"):
            table.add_column(name)
        table.add_row("text", args.text or f"{args.bench} reference solutions ({metrics['num_problems']} problems)")
        table.add_row("perplexity", f"{metrics['perplexity']:.4f}")
        table.add_row("tokens", str(metrics["perplexity_tokens"]))
        if args.teacher:
            table.add_row("teacher", args.teacher)
            table.add_row("KL(teacher || model)", f"{metrics['kl_to_teacher']:.4f}")
        Console().print(table)
    return 0
