"""`reasoning-qat validate RECIPE [--set K=V ...]`: check a recipe without running anything."""

from __future__ import annotations

import argparse

from pipeline.cli.common import out, recipe_arguments

HELP = "check a recipe without running anything"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    recipe_arguments(parser, artifacts=False)


def run(args: argparse.Namespace) -> int:
    from pipeline import api

    recipe = api.load(args.recipe, args.overrides)
    names = ", ".join(f"{n} ({c.type})" for n, c in recipe.stages.items())
    out().print(f"{args.recipe}: ok: {len(recipe.stages)} stages: {names}", markup=False, highlight=False)
    return 0
