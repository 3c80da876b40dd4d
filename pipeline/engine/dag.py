"""The stage graph of a recipe: edges come from StageRef fields (`init: ptq`, `when: gate`).

Only the runner knows the graph; stages see nothing but their inputs' directories.
"""

from __future__ import annotations

from pipeline.engine.recipe import Recipe


def dependencies(recipe: Recipe, stage: str) -> list[str]:
    """Stages that `stage` reads (its StageRef targets other than the base model), in field order."""
    seen = []
    for target in recipe.refs(stage).values():
        if target in recipe.stages and target not in seen:
            seen.append(target)
    return seen


def topological_order(recipe: Recipe) -> list[str]:
    """Every stage after the stages it reads; ties keep the order of the recipe file.

    The recipe was validated, so the graph has no cycle.
    """
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(recipe.stages)
    while remaining:
        for name in remaining:
            if all(dep in placed for dep in dependencies(recipe, name)):
                order.append(name)
                placed.add(name)
                remaining.remove(name)
                break
        else:  # pragma: no cover - validation rejects cycles before a Recipe exists
            raise ValueError(f"cycle among {remaining}")
    return order


def downstream(recipe: Recipe, stage: str) -> set[str]:
    """Every stage that reads `stage`, directly or through other stages (not `stage` itself)."""
    found: set[str] = set()
    frontier = [stage]
    while frontier:
        current = frontier.pop()
        for name in recipe.stages:
            if name not in found and current in dependencies(recipe, name):
                found.add(name)
                frontier.append(name)
    return found


def upstream(recipe: Recipe, stage: str) -> set[str]:
    """Every stage that `stage` reads, directly or through other stages (not `stage` itself)."""
    found: set[str] = set()
    frontier = [stage]
    while frontier:
        for dep in dependencies(recipe, frontier.pop()):
            if dep not in found:
                found.add(dep)
                frontier.append(dep)
    return found
