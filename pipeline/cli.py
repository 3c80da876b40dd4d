"""`reasoning-qat`: run, inspect and validate recipes; evaluate and export models.

    reasoning-qat run RECIPE [--artifacts DIR] [--from STAGE | --only STAGE] [--force] [--dry-run] [--set K=V ...]
    reasoning-qat status RECIPE [--artifacts DIR] [--json] [--set K=V ...]
    reasoning-qat validate RECIPE [--set K=V ...]
    reasoning-qat stages [TYPE | --markdown]
    reasoning-qat recipes
    reasoning-qat init --model MODEL_DIR --scheme w3g128|w4a4kv4 [--out RECIPE]
    reasoning-qat eval MODEL_DIR --bench gsm8k --limit 200
    reasoning-qat eval MODEL_DIR --bench gsm8k --perplexity [--teacher DIR] | --text FILE [--teacher DIR]
    reasoning-qat export STAGE_DIR --scheme w3g128 --out ckpt/
    reasoning-qat report RECIPE [--artifacts DIR] [--baseline EVAL_STAGE]
    reasoning-qat import-gguf FILE | --smollm2 --out DIR
    reasoning-qat --version
    accelerate launch -m pipeline.cli run RECIPE

Exit codes: 0 done (a stage skipped by its gate counts as done), 2 bad input (one line per problem,
nothing written; also a run with work to do in an artifacts directory it may not write), 1 a failure
while running (one line naming the stage; the traceback is in run.log), 128 + the signal's number when
SIGINT / SIGTERM stopped a run (130 / 143; training stages resume from the checkpoint it saved).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable

from rich.console import Console
from rich.table import Table

from pipeline.api import DEFAULT_ARTIFACTS
from pipeline.engine.errors import InputError
from pipeline.engine.progress import console as err_console

# Subcommands whose code lives elsewhere and is heavy to import: (module, adds arguments, runs).
DELEGATED = {
    "eval": ("pipeline.evaluate", "add_eval_arguments", "cli_eval",
             "evaluate a model on a benchmark (accuracy, samples.jsonl), or its perplexity / KL to a teacher"),
    "export": ("pipeline.quant.formats.export", "add_export_arguments", "cli_export",
               "write a real low-bit checkpoint from a stage directory"),
    "report": ("pipeline.report", "add_report_arguments", "cli_report",
               "accuracy per stage, retention against the teacher, training curves (table + plots)"),
    "import-gguf": ("pipeline.gguf", "add_import_arguments", "cli_import",
                    "convert a GGUF file (e.g. --smollm2) into a Hugging Face model folder, once"),
}


def main(argv: list[str] | None = None) -> int:
    # before CUDA starts: long training steps of changing shapes fragment the default allocator by several GiB
    # (seen on an 8B KD-QAT step); the user's own setting wins
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # import-time chatter of an optional dependency (transformers imports torchao when installed): torchao's
    # prebuilt kernels for another torch version, and torch's deprecation notice to torchao
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv  # anywhere on the line, for every subcommand
    argv = [a for a in argv if a != "--verbose"]
    args = build_parser(argv).parse_args(argv)
    from pipeline.engine import logs

    logs.quiet_libraries(verbose)
    # the recipe schema imports every stage type (torch, transformers): not needed for --help
    from pipeline.engine.recipe import RecipeError

    try:
        return args.handler(args)
    except RecipeError as e:
        for line in e.lines():
            _error(line)
        return 2
    except InputError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - everything else is a run-time failure: one line, exit 1
        from pipeline.engine.runner import RunError, RunStopped
        from pipeline.engine.store import LockedError

        if isinstance(e, RunStopped):
            _error(str(e))
            return 128 + e.signum
        if isinstance(e, (RunError, LockedError)):
            _error(str(e))
        else:
            _error(f"internal error: {type(e).__name__}: {e}")
        return 1


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasoning-qat", description="Run, inspect and validate recipes; "
                                     "evaluate and export models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--verbose", action="store_true", help="also show other libraries' logs and progress bars "
                        "(llmcompressor, DeepSpeed, transformers, datasets); may follow the subcommand")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run what is missing or stale")
    recipe_arguments(run, artifacts=True)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="re-run this stage and everything downstream of it, even if up to date")
    which.add_argument("--only", metavar="STAGE",
                       help="run just this stage, even if up to date; its inputs must be up to date")
    run.add_argument("--force", action="store_true",
                     help="re-run every selected stage, and stages whose gate did not pass")
    run.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser("status", help="each stage: complete / stale / pending / skipped / failed / running, "
                            "and why")
    recipe_arguments(status, artifacts=True)
    status.add_argument("--json", action="store_true", help='print {"stages": [{"name", "type", "state", "reason"}]}')
    status.set_defaults(handler=cmd_status)

    validate = sub.add_parser("validate", help="check a recipe without running anything")
    recipe_arguments(validate, artifacts=False)
    validate.set_defaults(handler=cmd_validate)

    reference = sub.add_parser("stages", help="the stage types; with TYPE, every key of its schema")
    reference.add_argument("topic", nargs="?", metavar="TYPE",
                           help="a stage type, or a recipe-wide section (model, quant, data)")
    reference.add_argument("--markdown", action="store_true",
                           help="the whole reference as docs/stages.md holds it")
    reference.set_defaults(handler=cmd_stages)

    shipped = sub.add_parser("recipes", help="the shipped recipes; RECIPE arguments take their names")
    shipped.set_defaults(handler=cmd_recipes)

    init = sub.add_parser("init", help="write a commented starting recipe for your model folder")
    init.add_argument("--model", required=True, metavar="MODEL_DIR", help="a local Hugging Face model folder")
    init.add_argument("--scheme", required=True, metavar="SCHEME", help="w3g128 or w4a4kv4")
    init.add_argument("--out", default=None, metavar="RECIPE", help="file to write (default ./<folder>-<scheme>.yaml); "
                      "never overwritten")
    init.set_defaults(handler=cmd_init)

    for name, (module_name, add_arguments, run_name, help_text) in DELEGATED.items():
        command = sub.add_parser(name, help=help_text)
        if argv[:1] == [name]:  # import the heavy module only for its own subcommand
            _attach_delegated(command, name, module_name, add_arguments, run_name)
    return parser


def recipe_arguments(parser: argparse.ArgumentParser, artifacts: bool) -> None:
    parser.add_argument("recipe", help="the recipe YAML file, or a shipped recipe's name (reasoning-qat recipes)")
    if artifacts:
        parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, metavar="DIR",
                            help="artifacts root (default ./artifacts)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. stages.kd_qat.lr=1e-5 (value read as YAML)")


def _attach_delegated(command, name, module_name, add_arguments, run_name) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name not in (module_name, module_name.rpartition(".")[0]):
            raise
        command.description = "not available in this version"
        command.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        command.set_defaults(handler=_unavailable(name))
        return
    getattr(module, add_arguments)(command)
    command.set_defaults(handler=getattr(module, run_name))


def _unavailable(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        _error(f"reasoning-qat {name}: not available in this version")
        return 2

    return handler


# -- commands --------------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline import api

    recipe = api.load(args.recipe, args.overrides)
    names = ", ".join(f"{n} ({c.type})" for n, c in recipe.stages.items())
    _out().print(f"{args.recipe}: ok: {len(recipe.stages)} stages: {names}", markup=False, highlight=False)
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from pipeline.engine import reference

    if args.markdown:
        print(reference.markdown(), end="")
    elif args.topic is None:
        for stage_type, summary in reference.summaries():
            print(f"{stage_type:<8} {summary}")
    elif args.topic in reference.topics():
        print(reference.topic_text(args.topic), end="")
    else:
        raise InputError("TYPE", f"unknown stage type {args.topic!r}; known: {', '.join(reference.topics())}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from pipeline.engine.recipe import shipped_recipes, shipped_summary

    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {shipped_summary(path)}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.starter import write_starter

    out = write_starter(args.model, args.scheme, args.out)
    print(f"wrote {out}; next: reasoning-qat validate {out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline import api

    recipe = api.load(args.recipe, args.overrides)
    decisions = api.status(recipe, args.artifacts)
    if args.json:
        rows = [{"name": d.name, "type": d.type, "state": d.state, "reason": d.reason} for d in decisions]
        print(json.dumps({"stages": rows}, indent=2))
        return 0
    table = Table(title=f"{recipe.name} ({args.artifacts}/{recipe.name})", title_justify="left")
    for column in ("stage", "type", "state", "why"):
        table.add_column(column)
    styles = {"complete": "green", "stale": "yellow", "pending": "cyan", "skipped": "dim", "failed": "red",
              "running": "bold magenta"}
    for d in decisions:
        table.add_row(d.name, d.type, f"[{styles[d.state]}]{d.state}[/]", _plain(d.reason))
    _out().print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import api
    from pipeline.engine import logs
    from pipeline.engine.runner import Processes

    recipe = api.load(args.recipe, args.overrides)
    selection = dict(from_stage=args.from_stage, only=args.only, force=args.force)
    if args.dry_run:
        decisions = api.plan(recipe, args.artifacts, **selection)
        table = Table(title=f"plan for {recipe.name} (dry run: nothing written)", title_justify="left")
        for column in ("stage", "type", "action", "why"):
            table.add_column(column)
        actions = {"run": "[bold]run[/]", "skip": "skip", "gate": "skip (gate)"}
        for d in decisions:
            table.add_row(d.name, d.type, actions[d.action], _plain(d.reason))
        _out().print(table)
        return 0
    procs = Processes()
    logs.setup_console(quiet=not procs.is_main)
    outcomes = api.run(recipe, args.artifacts, **selection, procs=procs)
    if procs.is_main:
        table = Table(title=f"{recipe.name}: done ({args.artifacts}/{recipe.name})", title_justify="left")
        for column in ("stage", "state", "wall", "headline"):
            table.add_column(column)
        for o in outcomes:
            wall = "" if o.wall_seconds is None else f"{o.wall_seconds:.1f}s"
            table.add_row(o.name, o.state, wall, _plain(o.headline))
        _out().print(table)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasoning-qat")
    except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH=.)
        return "unknown (not installed)"


# -- output ----------------------------------------------------------------------------------------

def _out() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    # tables in logs and pipes: no terminal to fit, so do not wrap reasons at 80 columns
    return console if console.is_terminal else Console(highlight=False, soft_wrap=True, width=200)


def _plain(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _error(line: str) -> None:
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
