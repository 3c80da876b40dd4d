"""`reasoning-qat status RECIPE [--artifacts DIR] [--json] [--set K=V ...]`"""

from __future__ import annotations

import argparse
import json

from pipeline.cli.common import out, plain, recipe_arguments

HELP = "each stage: complete / stale / pending / skipped / failed / running, and why"

STYLES = {
    "complete": "green",
    "stale": "yellow",
    "pending": "cyan",
    "skipped": "dim",
    "failed": "red",
    "running": "bold magenta",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_arguments(parser, artifacts=True)
    parser.add_argument("--json", action="store_true", help='print {"stages": [{"name", "type", "state", "reason"}]}')


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

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
    for d in decisions:
        table.add_row(d.name, d.type, f"[{STYLES[d.state]}]{d.state}[/]", plain(d.reason))
    out().print(table)
    return 0
