"""Online transforms: the part of a rotation (QuaRot) or learned affine transform (FlatQuant) that cannot
be merged into weights, because it acts on activations that pass through a non-linearity or a
quantizer before any weight sees them.

One module does all of them: `KroneckerTransform`, x -> (x / s) (A ⊗ B) on the last dimension, with
A [n1, n1], B [n2, n2] invertible and s an optional per-channel smoothing divisor (SmoothQuant-style).
Computed as Aᵀ X B on x viewed as X [n1, n2] (n·(n1 + n2) multiply-adds per token, not n²). Its partner
`inverse_transpose(y)` = y P⁻ᵀ, P = diag(s)⁻¹ (A ⊗ B): the weight side (W P⁻ᵀ consumes xP exactly,
merged in float64 by the PTQ methods) and, for queries, the side that keeps qkᵀ unchanged when keys
are transformed by P.

Where transforms sit in a decoder layer (module names relative to the layer):
- `input_layernorm`, `post_attention_layernorm` -> `TransformedNorm(norm, transform)`: the transform of
  the q/k/v input and of the gate/up input, applied once to the norm's output (the three / two consumers
  hold weights merged with it);
- `self_attn.o_proj.input_transform`, `mlp.down_proj.input_transform` (QuantLinear): the o_proj and
  down_proj inputs (QuaRot's online Hadamard on the down_proj input);
- `self_attn.qk_transform`: keys k -> kP and queries q -> q P⁻ᵀ after RoPE, before the KV-cache quantizer
  (pipeline.quant.kv applies it inside the attention function).
`describe(model)` records them (JSON), `install(model, record)` rebuilds empty ones on a fresh model
before its state dict is loaded: the tensors travel in the safetensors, the layout in the record.
"""

from __future__ import annotations

import torch
from torch import nn


class KroneckerTransform(nn.Module):
    def __init__(self, left: torch.Tensor, right: torch.Tensor, smooth: torch.Tensor | None = None):
        super().__init__()
        self.left = nn.Parameter(left)
        self.right = nn.Parameter(right)
        self.smooth = None if smooth is None else nn.Parameter(smooth)
        self._inverses: tuple[torch.dtype, torch.Tensor, torch.Tensor] | None = None  # set by StepInverses

    @classmethod
    def empty(cls, n1: int, n2: int, smooth: bool, device=None, dtype=None) -> "KroneckerTransform":
        """Shapes only (values come from a state dict)."""
        make = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)  # noqa: E731
        return cls(make(n1, n1), make(n2, n2), make(n1 * n2) if smooth else None)

    @property
    def sizes(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        grid = x.unflatten(-1, self.sizes)  # [..., n1, n2]
        return (self.left.to(x.dtype).T @ grid @ self.right.to(x.dtype)).flatten(-2)

    def inverse_transpose(self, y: torch.Tensor) -> torch.Tensor:
        """y P⁻ᵀ = vec(A⁻¹ Y B⁻ᵀ) of (y ⊙ s), in y's dtype (pass float64 for an exact merge); differentiable."""
        dtype = y.dtype
        if self.smooth is not None:
            y = y * self.smooth.to(dtype)
        grid = y.unflatten(-1, self.sizes)
        # inverted in at least float32 (linalg.inv refuses bf16), applied in y's dtype
        work = torch.promote_types(dtype, torch.float32)
        if self._inverses is not None and self._inverses[0] == work:
            left_inv, right_inv = self._inverses[1:]
        else:
            # unchecked here: a singular factor gives non-finite outputs, which training stops on (NonFiniteLoss);
            # calibration checks its factors once an epoch (StepInverses.check)
            left_inv, right_inv, _ = self.inverse_factors(work)
        return (left_inv.to(dtype) @ grid @ right_inv.to(dtype).T).flatten(-2)

    def inverse_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A⁻¹, B⁻¹ in `dtype`, and whether either factor was singular (a bool tensor, left on the device).
        `inv_ex`, not `inv`: linalg.inv's singularity check is a host sync on CUDA, which `inverse_transpose` would
        pay on every forward (the queries' side of each attention's key transform, in KD-QAT and in every decoding
        step)."""
        left_inv, left_info = torch.linalg.inv_ex(self.left.to(dtype))
        right_inv, right_info = torch.linalg.inv_ex(self.right.to(dtype))
        return left_inv, right_inv, (left_info != 0) | (right_info != 0)

    def extra_repr(self) -> str:
        n1, n2 = self.sizes
        return f"{n1}x{n2}" + (", smooth" if self.smooth is not None else "")


class StepInverses:
    """The inverse factors A⁻¹, B⁻¹ of some transforms, computed once per optimizer step and shared by every
    `inverse_transpose` until the next `refresh` (FlatQuant's calibration: the q/k/v weights merge one transform,
    gate/up another, and queries use the key transform's inverse; without this each of them inverts again, and
    the inverses' backward runs once per reader instead of once).

    `torch.linalg.inv` checks for singular matrices with a host sync on CUDA (two per merge, sixteen per forward
    of a decoder layer); `inv_ex` does not, and its error codes pile up on the device for `check`, once per epoch.
    Float32 inverses only (calibration's dtype); other dtypes (the float64 merge of finalize) invert as before.
    A `with` block: the transforms stop using the cache when it ends."""

    def __init__(self, modules: list[KroneckerTransform]):
        self.modules = modules
        self._failed: torch.Tensor | None = None

    def refresh(self) -> None:
        """Invert every transform's current factors (after each optimizer step, before the next forward)."""
        for m in self.modules:
            left_inv, right_inv, failed = m.inverse_factors(torch.float32)
            m._inverses = (torch.float32, left_inv, right_inv)
            self._failed = failed if self._failed is None else self._failed | failed

    def check(self) -> None:
        """Raise if any factor inverted since the last check was singular (one host sync)."""
        if self._failed is not None and bool(self._failed):
            raise torch.linalg.LinAlgError("a FlatQuant transform factor became singular during calibration")
        self._failed = None

    def __enter__(self) -> "StepInverses":
        self.refresh()
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m._inverses = None


class TransformedNorm(nn.Module):
    """A norm followed by an online transform of its output (the input of the Linears after it)."""

    def __init__(self, norm: nn.Module, transform: KroneckerTransform):
        super().__init__()
        self.norm = norm
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(self.norm(x))


def transforms(model: nn.Module) -> list[tuple[str, KroneckerTransform]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KroneckerTransform)]


def transform_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the online transforms and learned activation clips (for freezing in KD-QAT)."""
    from pipeline.quant.apply import quant_linears

    params = [p for _, t in transforms(model) for p in t.parameters()]
    return params + [m.activation_clip for _, m in quant_linears(model) if m.activation_clip is not None]


def add_activation_clips(model: nn.Module) -> int:
    """A learnable activation clip (FlatQuant's, a scalar ratio) on every activation-quantized QuantLinear
    that has none (a QuaRot init), starting at the spec's fixed clip ratio so that the forward is unchanged;
    returns how many were added."""
    from pipeline.quant.apply import quant_linears

    added = 0
    for _, m in quant_linears(model):
        if m.activations is not None and m.activation_clip is None:
            m.activation_clip = nn.Parameter(
                torch.tensor(m.activations.clip_ratio, device=m.weight.device, dtype=m.weight.dtype)
            )
            added += 1
    return added


def describe(model: nn.Module) -> dict:
    """The JSON record of where the model's transforms sit: {name: [n1, n2, smooth]} and the QuantLinears
    with a learned activation clip."""
    from pipeline.quant.apply import quant_linears

    return {
        "transforms": {n: [*t.sizes, t.smooth is not None] for n, t in transforms(model)},
        "activation_clip": [n for n, m in quant_linears(model) if m.activation_clip is not None],
    }


def install(model: nn.Module, record: dict) -> None:
    """Put empty transforms (and activation clips) where `record` (from `describe`) says, on a model whose
    QuantLinears exist already; the state dict fills them."""
    device = next(model.parameters()).device
    for name, (n1, n2, smooth) in record["transforms"].items():
        owner_name, _, attr = name.rpartition(".")
        # frozen, as QuaRot and FlatQuant leave them (kd_qat / rl choose what trains): torch.matmul folds the
        # batch dimensions of `x @ A` only when A needs no gradient, and the two paths round differently, enough
        # for a 4-bit activation to flip a code and the reloaded model to drift from the saved one
        transform = KroneckerTransform.empty(n1, n2, smooth, device=device).requires_grad_(False)
        if attr == "transform":  # <norm>.transform: wrap the norm
            wrap_norm(model, owner_name, transform)
        else:
            setattr(model.get_submodule(owner_name), attr, transform)
    for name in record["activation_clip"]:
        model.get_submodule(name).activation_clip = nn.Parameter(torch.empty((), device=device))


def wrap_norm(model: nn.Module, name: str, transform: KroneckerTransform) -> None:
    model.set_submodule(name, TransformedNorm(model.get_submodule(name), transform))
