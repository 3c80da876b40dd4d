"""`reasoning-qat report RECIPE [--artifacts DIR] [--baseline EVAL_STAGE] [--json]`: what each stage of a run
achieved, as a table; pipeline.report writes report.md, report.json and the plots."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.common import error, recipe_arguments

HELP = "accuracy per stage, retention against the teacher, training curves (table + plots)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_arguments(parser, artifacts=True)
    parser.add_argument("--baseline", metavar="EVAL_STAGE", help="the eval stage retention is measured against")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline import api
    from pipeline.report import format_value, write_report

    recipe = api.load(args.recipe, args.overrides)
    out_dir, rows, note = write_report(recipe, args.artifacts, args.baseline)
    if note:  # on stderr, so that --json stays JSON
        error(note)
    if args.json:
        print(json.dumps({"stages": rows}, indent=2))
        return 0
    table = Table(title=f"{recipe.name}: report in {out_dir}", title_justify="left")
    for column in ("stage", "type", "state", "of", "metrics"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["stage"],
            r["type"],
            r["state"],
            r["of"] or "",
            ", ".join(f"{k} {format_value(v)}" for k, v in r["metrics"].items()),
        )
    Console(highlight=False, soft_wrap=True, width=200).print(table)
    return 0
