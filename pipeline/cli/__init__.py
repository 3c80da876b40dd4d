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
nothing written; also a run with work to do in an artifacts directory it may not write or create), 1 a failure
while running (one line naming the stage; the traceback is in run.log), 128 + the signal's number when
SIGINT / SIGTERM stopped a run (130 / 143; training stages resume from the checkpoint it saved).

This package is the only code that parses arguments: one module per subcommand (COMMANDS), each with
`HELP`, `add_arguments(parser)` and `run(args) -> exit code`, calling pipeline.api or a library module's
plain functions. Shared arguments and output helpers are in pipeline/cli/common.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.cli.common import error
from pipeline.engine.errors import InputError

COMMANDS = {
    "run": "pipeline.cli.run",
    "status": "pipeline.cli.status",
    "validate": "pipeline.cli.validate",
    "stages": "pipeline.cli.stages",
    "recipes": "pipeline.cli.recipes",
    "init": "pipeline.cli.init",
    "eval": "pipeline.cli.eval",
    "export": "pipeline.cli.export",
    "report": "pipeline.cli.report",
    "import-gguf": "pipeline.cli.import_gguf",
}
"""Subcommand -> its module: `HELP` (one line), `add_arguments(parser)` and `run(args) -> exit code`. A module
imports what its command needs (torch, transformers, ...) inside those functions, and `add_arguments` runs only
for the command on the line, so `--help` and `--version` stay fast."""


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
    # pydantic and the section schemas: not needed for --help
    from pipeline.engine.recipe import RecipeError

    try:
        code = args.handler(args)
        _leave_process_group()
        return code
    except RecipeError as e:
        for line in e.lines():
            error(line)
        return 2
    except InputError as e:
        error(str(e))
        return 2
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - everything else is a run-time failure: one line, exit 1
        from pipeline.engine.runner import RunError, RunStopped
        from pipeline.engine.store import LockedError

        if isinstance(e, RunStopped):
            error(str(e))
            return 128 + e.signum
        if isinstance(e, (RunError, LockedError)):
            error(str(e))
        else:
            error(f"internal error: {type(e).__name__}: {e}")
        return 1


def _leave_process_group() -> None:
    """After a command that went well on every rank of a multi-process run: a gloo process group left to the
    interpreter's teardown aborts the process now and then (SIGABRT, "terminate called without an active exception",
    pytorch/pytorch#190489), turning a finished run's exit 0 into a failure. Not after an error: a rank still waiting
    in a collective could hang the destroy (pytorch/torchtitan#1342)."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported torch has no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reasoning-qat", description="Run, inspect and validate recipes; evaluate and export models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show other libraries' logs and progress bars "
        "(llmcompressor, DeepSpeed, transformers, datasets); may follow the subcommand",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP)
        if name == chosen:  # only the command on the line imports what its arguments need
            module.add_arguments(command)
            command.set_defaults(handler=module.run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reasoning-qat")
    except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH=.)
        return "unknown (not installed)"
