"""The testbed: procedurally generated, verifiable multi-step word problems."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TestbedSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(2, ge=1)
    max_number: int = Field(20, ge=2)
    train_size: int = Field(20000, ge=1)
    test_size: int = Field(200, ge=1)
