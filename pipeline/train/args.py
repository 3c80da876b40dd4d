"""The optimizer and loop knobs of the training stages, declared once: their types, bounds and engine markers.

`TrainArgs` (pipeline.train.loop: sft, kd_qat) and `GRPOSettings` (pipeline.train.rl: rl) both declare
`steps: Steps = 500`, `lr: LearningRate = 1e-6`, ...: the same recipe key means the same thing with the same
bounds everywhere, while each stage keeps its own default and its own docstring, which say what differs (the
loop decays the learning rate on a cosine, GRPO keeps it constant; a GRPO step is one rollout batch).

Why annotated types rather than one base model both inherit: a pydantic subclass lists an inherited field where
its base declared it, so a base would reorder the `rl` stage's keys in `reasoning-qat stages` and docs/stages.md
(`num_generations` sits between `batch_size` and `grad_accum`). Cheap to import: no torch.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal, Sequence

from pydantic import Field

from pipeline.engine.stage_api import ADDED_KEY, OPERATIONAL

Tracker = Literal["tensorboard", "wandb"]

Steps = Annotated[int, Field(gt=0)]
"""Optimizer steps."""
BatchSize = Annotated[int, Field(gt=0)]
"""Sequences per optimizer step, over all processes and accumulation micro-steps."""
GradAccum = Annotated[int, Field(ge=1)]
"""Micro-steps per optimizer step."""
LearningRate = Annotated[float, Field(gt=0)]
WarmupSteps = Annotated[int, Field(ge=0)]
WeightDecay = Annotated[float, Field(ge=0)]
GradClip = Annotated[float, Field(gt=0)]
"""Clip the global gradient norm to this."""
GradClipOrNone = Annotated[float | None, Field(gt=0)]
"""GradClip, or None: no clipping (the bound outside the union, where docs/stages.md reads it)."""
CheckpointEvery = Annotated[int, Field(ge=0, json_schema_extra=OPERATIONAL)]
"""Save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGINT); operational: changing it
re-runs nothing."""
ReportTo = Annotated[tuple[Tracker, ...], Field(json_schema_extra={**OPERATIONAL, **ADDED_KEY})]
"""Trackers that also get each step's metrics row; operational, and left out of the fingerprint when empty."""


def missing_trackers(trackers: Sequence[str]) -> list[tuple[str, str]]:
    """("report_to", message) for each tracker whose package is not installed: found before anything runs."""
    return [
        ("report_to", f"{t} is not installed (pip install {t}, or 'reasoning-qat[trackers]')")
        for t in trackers
        if importlib.util.find_spec(t) is None
    ]
