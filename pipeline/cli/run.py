"""`reasoning-qat run RECIPE [--artifacts DIR] [--from STAGE | --only STAGE] [--force] [--dry-run] [--set K=V ...]`"""

from __future__ import annotations

import argparse

from pipeline.cli.common import out, plain, recipe_arguments

HELP = "run what is missing or stale"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_arguments(parser, artifacts=True)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        help="re-run this stage and everything downstream of it, even if up to date",
    )
    which.add_argument(
        "--only", metavar="STAGE", help="run just this stage, even if up to date; its inputs must be up to date"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run every stage (with --from / --only: the stages they select to re-run), also past a gate "
        "that did not pass",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

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
            table.add_row(d.name, d.type, actions[d.action], plain(d.reason))
        out().print(table)
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
            table.add_row(o.name, o.state, wall, plain(o.headline))
        out().print(table)
    return 0
