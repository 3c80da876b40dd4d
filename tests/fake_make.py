"""A test-only stage type `make`: writes its `value` (and its input's text) so tests can follow data.

Registered by the `fake_stages` fixture (tests/conftest.py) in place of a real stage module.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

from pydantic import Field

from pipeline.engine import signals
from pipeline.engine.stage_api import ADDED_KEY, OPERATIONAL, StageConfig, StageContext, StageRef

CODE_VERSION = 1
USES = ("seed",)
PASSTHROUGH = "src"
HEADLINE = "value"

calls: list[str] = []
"""Names of the stages run, in order (reset by the fixture)."""


class Config(StageConfig):
    type: Literal["make"] = "make"
    value: int = Field(1, gt=0)
    """What the stage writes."""
    src: StageRef | None = None
    """A stage whose out.txt is appended."""
    lr: float = Field(3e-4, gt=0)
    """Only here to be changed by tests."""
    checkpoint_every: int = Field(0, ge=0, json_schema_extra=OPERATIONAL)
    """Checkpointer period."""
    steps: int = Field(0, ge=0)
    """Steps of a fake training loop that checkpoints through ctx.checkpointer (and stops at its safe points)."""
    interrupt_at: int = Field(-1)
    """Send SIGINT to this process at this step (tests the stop-and-resume plumbing)."""
    fail: bool = False
    """Raise at run time."""
    flavour: str = Field("plain", json_schema_extra=ADDED_KEY)
    """A key added after artifacts existed: at its default it leaves them up to date."""


def check(config: Config, recipe) -> list[tuple[str, str]]:
    if config.value == 13:
        return [("value", "13 is unlucky")]
    return []


def run(ctx: StageContext) -> dict[str, float]:
    from pipeline.engine.checkpoint import StageInterrupted

    calls.append(ctx.name)
    cfg = ctx.config
    if cfg.fail:
        raise ValueError("boom")
    start = 0
    latest = ctx.checkpointer.latest()
    if latest is not None:
        start = latest[0]
    with signals.stop_at_safe_points():
        for step in range(start + 1, cfg.steps + 1):
            if step == cfg.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            if ctx.checkpointer.due(step):
                ctx.checkpointer.save(step, {"step": step})
            if ctx.checkpointer.stop_requested:
                raise StageInterrupted(f"stopped at step {step}")
    text = str(cfg.value)
    if "src" in ctx.inputs:
        text += "<" + (ctx.inputs["src"] / "out.txt").read_text()
    (ctx.out_dir / "out.txt").write_text(text)
    (ctx.out_dir / "sub").mkdir()
    (ctx.out_dir / "sub" / "start.txt").write_text(str(start))
    ctx.log.info("wrote %s", text)
    return {"value": cfg.value, "resumed_from": start}
