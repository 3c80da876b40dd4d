"""A test-only `gate`: passes when its input's value is at least `threshold`."""

from __future__ import annotations

from typing import Literal

from pipeline.engine.stage_api import StageConfig, StageContext, StageRef

CODE_VERSION = 1
USES = ()
HEADLINE = "passed"


class Config(StageConfig):
    type: Literal["gate"] = "gate"
    src: StageRef
    """The stage whose value is judged."""
    threshold: int = 1
    """Pass when the value is at least this."""


def run(ctx: StageContext) -> dict[str, float]:
    value = int((ctx.inputs["src"] / "out.txt").read_text().split("<")[0])
    return {"passed": float(value >= ctx.config.threshold), "value": value}
