"""`reasoning-qat recipes`: the shipped recipes (pipeline/recipes/), which RECIPE arguments take by name."""

from __future__ import annotations

import argparse

HELP = "the shipped recipes; RECIPE arguments take their names"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from pipeline.engine.recipe import shipped_recipes, shipped_summary

    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {shipped_summary(path)}")
    return 0
