"""QeRL's adaptive quantization noise (AQN) for GRPO on a quantized policy: Gaussian noise on the RMSNorm weights
during rollouts, its σ decaying geometrically over K noisy stages. `GRPOSettings.aqn` configures it
(pipeline.train.rl); the trainer (pipeline.train.grpo_trainer) applies it around each rollout."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, Field


class AQNSpec(BaseModel):
    """QeRL's adaptive quantization noise: σ decays geometrically over K noisy stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_start: float = Field(1e-2, gt=0)
    """σ of the first noisy stage."""
    sigma_end: float = Field(5e-4, gt=0)
    """σ of the last stage."""
    num_stages: int = Field(10, ge=1)
    """K: noisy stages; training is split into K + 1 equal intervals, the first noise-free."""


def aqn_sigma(step: int, total_steps: int, spec: AQNSpec) -> float:
    """σ for the 0-based optimizer step `step` of `total_steps`.

    Interval i = ⌊step·(K+1)/total⌋: 0 is noise-free, i = k ≥ 1 uses
    σ_k = σ_start·(σ_end/σ_start)^((k−1)/(K−1)) (QeRL's schedule; σ_start when K = 1).
    """
    k_max = spec.num_stages
    k = min(step * (k_max + 1) // total_steps, k_max)
    if k == 0:
        return 0.0
    if k_max == 1:
        return spec.sigma_start
    return spec.sigma_start * (spec.sigma_end / spec.sigma_start) ** ((k - 1) / (k_max - 1))


def rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every RMSNorm with a weight (input/post-attention norms, Qwen3's q/k norms, the final norm)."""
    return [
        m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None
    ]


@contextmanager
def norm_noise(model: torch.nn.Module, sigma: float, generator: torch.Generator):
    """Within the block, each RMSNorm weight w is w + N(0, σ²); afterwards it is w again, to the bit
    (restored from a copy, since (w + n) − n need not round back to w)."""
    if sigma == 0:
        yield
        return
    saved = []
    with torch.no_grad():
        for norm in rms_norms(model):
            w = norm.weight
            saved.append((w, w.detach().clone()))
            # drawn on the CPU generator: the same noise on every device and process
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32) * sigma
            w.add_(noise.to(device=w.device, dtype=w.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
