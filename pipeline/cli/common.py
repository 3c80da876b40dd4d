"""What several subcommands share: recipe arguments, --trust-remote-code, and the output consoles."""

from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.api import DEFAULT_ARTIFACTS
from pipeline.engine.progress import console as err_console


def recipe_arguments(parser: argparse.ArgumentParser, artifacts: bool) -> None:
    """RECIPE, --set KEY=VALUE ... and, with `artifacts`, --artifacts DIR."""
    parser.add_argument("recipe", help="the recipe YAML file, or a shipped recipe's name (reasoning-qat recipes)")
    if artifacts:
        parser.add_argument(
            "--artifacts", default=DEFAULT_ARTIFACTS, metavar="DIR", help="artifacts root (default ./artifacts)"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. stages.kd_qat.lr=1e-5 (value read as YAML)",
    )


def trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-remote-code, for commands that load a model the user names. Without it a model with custom code
    is refused where it is checked (pipeline.models.check_model_dir), naming this flag as the way out."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model whose loading runs Python from its directory (config.json auto_map)",
    )


def out() -> Console:
    """stdout for tables."""
    console = Console(highlight=False, soft_wrap=True)
    # tables in logs and pipes: no terminal to fit, so do not wrap reasons at 80 columns
    return console if console.is_terminal else Console(highlight=False, soft_wrap=True, width=200)


def plain(text: str) -> str:
    """`text` shown as is in a rich table (no markup)."""
    from rich.markup import escape

    return escape(text)


def error(line: str) -> None:
    """One line on stderr."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)
