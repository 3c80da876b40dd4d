"""FlatQuant (Sun et al. 2024): per-layer learnable affine transforms that flatten weights and activations
before 4-bit quantization, with learnable weight and activation clipping, calibrated decoder layer by
decoder layer on the layer's output MSE against the full-precision layer. The W4A4KV4 PTQ init
(docs/results/w4a4kv4/README.md).

    prepare(model, spec)                            # QuantLinears (+ KV-cache quant from the spec)
    report = calibrate(model, samples, epochs=15, lr=5e-3)   # transforms + clips learned, merged, RTN
    gptq_layerwise(model, samples, keep_scales=True)          # optional: GPTQ on the merged weights

Per decoder layer, four transforms P = diag(s)⁻¹ (A ⊗ B) (pipeline.quant.online.KroneckerTransform),
applied online to activations (x -> xP) and merged into the weights that read them (W ← W P⁻ᵀ, in float64):
- the q/k/v input (after input_layernorm), the gate/up input (after post_attention_layernorm): the norm
  becomes a TransformedNorm, the three / two readers share the transform;
- the o_proj input (heads × head_dim wide, which need not equal hidden: Qwen3-0.6B's 16 × 128 = 2048 vs
  1024) and the down_proj input: the QuantLinear's `input_transform`;
plus a learnable key transform after RoPE (`self_attn.qk_transform`: k -> kP, q -> q P⁻ᵀ) so that the 4-bit
KV cache sees flattened keys, and for values QuaRot's fixed head-wise Hadamard fused into v_proj / o_proj
(pipeline.quant.methods.quarot.rotate_values; the paper learns this one too). Each Linear learns a weight clip per
output channel (σ(logit) · its min/max)
and an activation clip (one scalar, σ(logit) · each token's min/max).

Init: A, B Hadamard factors (pipeline.quant.hadamard, so a transform starts as a rotation) and s the
SmoothQuant balance s_j = max|x_j|^α / max|W_:,j|^(1-α) (α = 0.5) from the calibration activations.
Training: AdamW on every transform, smoothing vector and clip logit of the layer, `epochs` passes over the
samples (`batch_size` samples of one length per step, 1 by default; FlatQuant's code takes 4), loss =
MSE(quantized layer(x), full-precision layer(x)), cosine schedule, in float32; each transform inverted once
per step for all its readers (_StepMerge); each layer keeps the parameters of the epoch (or the init) with
the lowest calibration MSE, measured after every epoch: with one sample per step the epoch-to-epoch MSE swings
by up to 2x, and ending on a bad epoch used to throw the good ones away (keeping the init). Each layer is calibrated
on the full-precision model's inputs to it (the FP stream, as the
paper's code does), with the layer's KV-cache quantization on.

Departures from the paper: A and B are plain matrices (the paper optionally keeps them in SVD form to
guarantee invertibility; at these learning rates they stay well conditioned); lr 1e-3 by default, not the
paper's 5e-3, because with one sample per step (the paper batches 4) 5e-3 made layer MSE worse on our
tiny models (with `batch_size=4`, 5e-3 does at least as well as one sample at 1e-3 on the planted-outlier test);
q, k and v each hold their own activation clip (they quantize the same input; a fused kernel would
share one).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import fake
from pipeline.quant.apply import quant_linears, set_fake_quant
from pipeline.quant.hadamard import kronecker_factors
from pipeline.quant.layerwise import LayerInput, capture_inputs, each_layer, run_layer
from pipeline.quant.linear import QuantLinear
from pipeline.quant.online import KroneckerTransform, StepInverses, TransformedNorm, transforms
from pipeline.quant.methods.quarot import decoder_layers, rotate_values

CLIP_INIT_LOGIT = 4.0
"""σ(4) ≈ 0.982: clipping starts just inside the min/max range, as OmniQuant's LWC does."""


class _CalibLinear(nn.Module):
    """A QuantLinear during calibration: its weight merged with the transform on the fly (differentiable),
    fake-quantized with the learned weight clip; its input fake-quantized with the learned activation clip."""

    def __init__(self, linear: QuantLinear, merge: KroneckerTransform):
        super().__init__()
        self.linear = linear
        self._merge = (merge,)  # owned by the norm or by linear.input_transform: not registered twice
        self.weight_clip = nn.Parameter(
            torch.full((linear.out_features, 1), CLIP_INIT_LOGIT, device=linear.weight.device)
        )
        self.act_clip = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT, device=linear.weight.device))
        self.step_weight: torch.Tensor | None = None  # set by _StepMerge for the current step

    def merged_weight(self, dtype=None) -> torch.Tensor:
        w = self.linear.weight
        return self._merge[0].inverse_transpose(w if dtype is None else w.to(dtype))

    def qparams(self, w: torch.Tensor, clip_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.linear.weights
        min_vals, max_vals = fake.group_minmax(w.detach(), spec.group_size)
        clip = torch.sigmoid(self.weight_clip if clip_logit is None else clip_logit).to(w.dtype)
        return fake.calculate_qparams(min_vals * clip, max_vals * clip, spec.num_bits, spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.linear
        if q.input_transform is not None:
            x = q.input_transform(x)
        if q.activations is not None:
            a = q.activations
            x = fake.fake_quantize_per_token(x, a.num_bits, a.symmetric, torch.sigmoid(self.act_clip))
        w_q = self.step_weight if self.step_weight is not None else self.quantized_weight(self.merged_weight())
        return F.linear(x, w_q, q.bias)

    def quantized_weight(self, w: torch.Tensor, clip_logit: torch.Tensor | None = None) -> torch.Tensor:
        """`w` (merged: this Linear's rows, or several readers' stacked with their `clip_logit`s) fake-quantized
        on the clipped grid of this Linear's spec, differentiable in the transform and the clip."""
        spec = self.linear.weights
        scale, zero_point = self.qparams(w, clip_logit)
        return fake.fake_quantize(w, scale, None if spec.symmetric else zero_point, spec.num_bits, spec.group_size)

    @torch.no_grad()
    def finalize(self) -> QuantLinear:
        """The QuantLinear with the merged weight (float64 product), clipped scales, learned activation clip."""
        q = self.linear
        merged = self.merged_weight(torch.float64)
        q.weight.copy_(merged.to(q.weight.dtype))
        q.weight.requires_grad_(True)
        q.set_qparams(*self.qparams(q.weight))
        if q.activations is not None:
            q.activation_clip = nn.Parameter(torch.sigmoid(self.act_clip.detach()).to(q.weight.dtype))
        return q


class _StepMerge:
    """Once per optimizer step (`refresh`, before the forward), for each transform: its inverse factors
    (StepInverses, no host sync) and the merged, fake-quantized weights of all the Linears that read it, as
    one stacked tensor (q/k/v and gate/up: one merge chain each instead of three and two; the frozen weights are
    stacked once per layer). Each _CalibLinear's forward takes its rows. Readers whose weight specs differ
    (a lowered group size) are merged apart. A `with` block: the cached tensors go when it ends."""

    def __init__(self, layer: nn.Module, calib: dict[str, _CalibLinear]):
        self.inverses = StepInverses([t for _, t in transforms(layer)])
        groups: dict[tuple, list[_CalibLinear]] = {}
        for c in calib.values():
            groups.setdefault((id(c._merge[0]), c.linear.weights), []).append(c)
        self.groups = [
            (g, torch.cat([c.linear.weight for c in g]), [c.linear.out_features for c in g]) for g in groups.values()
        ]

    def refresh(self) -> None:
        self.inverses.refresh()
        for members, weight, rows in self.groups:
            clip_logit = torch.cat([c.weight_clip for c in members]) if len(members) > 1 else None
            lead = members[0]
            merged = lead.quantized_weight(lead._merge[0].inverse_transpose(weight), clip_logit)
            for c, part in zip(members, merged.split(rows)):
                c.step_weight = part

    def check(self) -> None:
        self.inverses.check()

    def __enter__(self) -> "_StepMerge":
        self.inverses.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.inverses.__exit__(*exc)
        for members, _, _ in self.groups:
            for c in members:
                c.step_weight = None


def _abs_max_hooks(modules: dict[str, nn.Module], stats: dict[str, torch.Tensor]) -> list:
    """Per-channel max |input| of each module, accumulated over calls."""

    def hook(name, module, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0).float()
        stats[name] = x if name not in stats else torch.maximum(stats[name], x)

    return [m.register_forward_pre_hook(lambda mod, a, name=name: hook(name, mod, a)) for name, m in modules.items()]


def _init_transform(
    n: int, act_max: torch.Tensor | None, readers: list[nn.Linear], alpha: float, device, seed: int
) -> KroneckerTransform:
    left, right = kronecker_factors(n, seed)
    smooth = None
    if act_max is not None:
        w_max = torch.stack([r.weight.detach().abs().amax(0).float() for r in readers]).amax(0)
        smooth = (act_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        smooth = smooth / smooth.mean()  # scale-free: the Hadamard and the quantizer do not care, Adam does
    transform = KroneckerTransform(left.float(), right.float(), smooth)
    return transform.to(device)


@dataclass
class _Bucket:
    """The calibration samples of one length, stacked [n, len, hidden]: a batch is one index into it (no
    per-step concatenation), and its samples share the keyword arguments of their length (positions; the
    mask is causal). `samples` are their indices in the calibration list; `targets` the FP layer's outputs."""

    hidden: torch.Tensor
    kwargs: dict
    samples: list[int]
    targets: torch.Tensor | None = None


def _buckets(inputs: list[LayerInput]) -> list[_Bucket]:
    """`capture_inputs`'s list as buckets of equal length. Samples of one length get equal keyword
    arguments from the model (checked here, once: a batch runs with its first sample's)."""
    by_len: dict[int, list[int]] = {}
    for k, i in enumerate(inputs):
        by_len.setdefault(i.hidden.shape[1], []).append(k)
    buckets = []
    for ks in by_len.values():
        kwargs = inputs[ks[0]].kwargs
        if any(not _same(inputs[k].kwargs, kwargs) for k in ks[1:]):
            raise ValueError("calibration samples of one length got different layer arguments (padding?)")
        buckets.append(_Bucket(torch.cat([inputs[k].hidden for k in ks]), kwargs, ks))
    return buckets


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _chunks(bucket: _Bucket, size: int) -> list[tuple[int, int]]:
    n = bucket.hidden.shape[0]
    return [(j, min(j + size, n)) for j in range(0, n, size)]


@torch.no_grad()
def _fp_targets(layer: nn.Module, buckets: list[_Bucket], batch_size: int) -> dict[str, torch.Tensor]:
    """Each bucket's FP outputs of the layer (quantization off), and the per-channel max |input| of the
    Linears that the transforms will sit before (the smoothing init)."""
    set_fake_quant(layer, False)
    attn, mlp = layer.self_attn, layer.mlp
    stats: dict[str, torch.Tensor] = {}
    handles = _abs_max_hooks({"qkv": attn.q_proj, "o": attn.o_proj, "up": mlp.up_proj, "down": mlp.down_proj}, stats)
    try:
        for b in buckets:
            b.targets = torch.cat(
                [run_layer(layer, LayerInput(b.hidden[i:j], b.kwargs)) for i, j in _chunks(b, batch_size)]
            )
    finally:
        for h in handles:
            h.remove()
    return stats


def _install(layer: nn.Module, stats: dict[str, torch.Tensor], alpha: float, seed: int) -> dict[str, _CalibLinear]:
    """The layer's five transforms (initialized from `stats`) and its Linears wrapped for calibration, with
    KV-cache quantization on; returns the wrappers by name."""
    attn, mlp = layer.self_attn, layer.mlp
    device = attn.q_proj.weight.device
    head_dim = attn.head_dim
    rotate_values(attn, torch.kron(*kronecker_factors(head_dim)))
    t_qkv = _init_transform(
        attn.q_proj.in_features, stats["qkv"], [attn.q_proj, attn.k_proj, attn.v_proj], alpha, device, seed
    )
    t_up = _init_transform(mlp.up_proj.in_features, stats["up"], [mlp.gate_proj, mlp.up_proj], alpha, device, seed)
    attn.o_proj.input_transform = _init_transform(
        attn.o_proj.in_features, stats["o"], [attn.o_proj], alpha, device, seed
    )
    mlp.down_proj.input_transform = _init_transform(
        mlp.down_proj.in_features, stats["down"], [mlp.down_proj], alpha, device, seed
    )
    attn.qk_transform = _init_transform(head_dim, None, [], alpha, device, seed)
    layer.input_layernorm = TransformedNorm(layer.input_layernorm, t_qkv)
    layer.post_attention_layernorm = TransformedNorm(layer.post_attention_layernorm, t_up)

    merges = {
        "self_attn.q_proj": t_qkv,
        "self_attn.k_proj": t_qkv,
        "self_attn.v_proj": t_qkv,
        "mlp.gate_proj": t_up,
        "mlp.up_proj": t_up,
        "self_attn.o_proj": attn.o_proj.input_transform,
        "mlp.down_proj": mlp.down_proj.input_transform,
    }
    calib = {}
    for name, q in quant_linears(layer):
        q.weight.requires_grad_(False)
        calib[name] = _CalibLinear(q, merges[name])
        layer.set_submodule(name, calib[name])
    set_fake_quant(layer, True)  # KV-cache quantization on (the QuantLinears are wrapped)
    return calib


def _mse_loss(layer: nn.Module, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The calibration loss of one batch: MSE of the quantized layer's output against the FP one, over every
    element (with equal lengths, the mean of the samples' MSEs)."""
    return F.mse_loss(run_layer(layer, LayerInput(hidden, kwargs)), target)


@torch.no_grad()
def _layer_mse(layer: nn.Module, buckets: list[_Bucket], batch_size: int, step: _StepMerge | None = None) -> float:
    """Mean over the samples of each one's output MSE, run `batch_size` at a time, read back with one host sync
    (summed in sample order, so that batch_size 1 gives the number the one-sample-at-a-time loop gave)."""
    if step is not None:
        step.refresh()
    losses: dict[int, torch.Tensor] = {}
    for b in buckets:
        for i, j in _chunks(b, batch_size):
            out = run_layer(layer, LayerInput(b.hidden[i:j], b.kwargs))
            losses.update({b.samples[i + r]: F.mse_loss(out[r], b.targets[i + r]) for r in range(j - i)})
    values = torch.stack([losses[k] for k in range(len(losses))]).tolist()
    return sum(values) / len(values)


def _epoch_batches(
    buckets: list[_Bucket], batch_size: int, generator: torch.Generator
) -> list[tuple[_Bucket, torch.Tensor]]:
    """One epoch's batches: the samples in a seeded random order (the draw the one-sample loop made), each
    joining the open batch of its length, which closes at `batch_size`; the rest close at the end. The row
    indices go to the device in one copy per epoch, not one per step."""
    where = {k: (bi, row) for bi, b in enumerate(buckets) for row, k in enumerate(b.samples)}
    open_: dict[int, list[int]] = {}
    closed: list[tuple[int, list[int]]] = []
    for k in torch.randperm(len(where), generator=generator).tolist():
        bi, row = where[k]
        open_.setdefault(bi, []).append(row)
        if len(open_[bi]) == batch_size:
            closed.append((bi, open_.pop(bi)))
    closed += list(open_.items())
    device = buckets[0].hidden.device
    rows = torch.tensor([r for _, rs in closed for r in rs], device=device)
    out, start = [], 0
    for bi, rs in closed:
        out.append((buckets[bi], rows[start : start + len(rs)]))
        start += len(rs)
    return out


def _steps_per_epoch(buckets: list[_Bucket], batch_size: int) -> int:
    return sum(len(_chunks(b, batch_size)) for b in buckets)


def _train(
    layer: nn.Module,
    buckets: list[_Bucket],
    trained: list[nn.Parameter],
    optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    step: _StepMerge | None,
    loss_fn,
) -> float:
    """`epochs` passes of AdamW (cosine to 0) over the buckets; leaves `trained` at the epoch (or the init) of
    lowest calibration MSE, measured after each epoch: with few samples per step the epoch-to-epoch MSE swings
    by up to 2x, and ending on a bad epoch used to throw the good ones away. Returns the MSE at init."""
    steps = epochs * _steps_per_epoch(buckets, batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    mse_init = _layer_mse(layer, buckets, batch_size, step)
    best_mse, best_state = mse_init, [p.detach().clone() for p in trained]
    for _ in range(epochs):
        with torch.enable_grad():
            for bucket, rows in _epoch_batches(buckets, batch_size, generator):
                if step is not None:
                    step.refresh()
                loss = loss_fn(layer, bucket.hidden[rows], bucket.targets[rows], bucket.kwargs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        epoch_mse = _layer_mse(layer, buckets, batch_size, step)
        if step is not None:
            step.check()
        if epoch_mse < best_mse:
            best_mse, best_state = epoch_mse, [p.detach().clone() for p in trained]
    with torch.no_grad():
        for p, p0 in zip(trained, best_state):
            p.copy_(p0)
    return mse_init


def _calibrate_layer(
    layer: nn.Module,
    buckets: list[_Bucket],
    epochs: int,
    lr: float,
    alpha: float,
    seed: int,
    generator: torch.Generator,
    batch_size: int,
    merge_once: bool,
    loss_fn,
) -> tuple[float, float, int]:
    """One decoder layer (float32, FP inputs in `buckets`): transforms and clips trained, merged, the
    QuantLinears put back; the buckets' targets set. Returns (MSE at init, MSE after, optimizer steps)."""
    stats = _fp_targets(layer, buckets, batch_size)
    calib = _install(layer, stats, alpha, seed)
    params = [p for _, t in transforms(layer) for p in t.parameters()]
    clips = [p for c in calib.values() for p in (c.weight_clip, c.act_clip)]
    for p in params + clips:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": params}, {"params": clips}], lr=lr, weight_decay=0.0)
    with _StepMerge(layer, calib) if merge_once else nullcontext() as step:
        mse_init = _train(layer, buckets, params + clips, optimizer, epochs, batch_size, generator, step, loss_fn)
    for p in params:
        p.requires_grad_(False)
    for name, c in calib.items():
        layer.set_submodule(name, c.finalize())
    return mse_init, _layer_mse(layer, buckets, batch_size), epochs * _steps_per_epoch(buckets, batch_size)


def calibrate(
    model: nn.Module,
    samples: list[list[int]],
    epochs: int = 15,
    lr: float = 1e-3,
    alpha: float = 0.5,
    seed: int = 0,
    log=None,
    *,
    batch_size: int = 1,
    merge_once: bool = True,
    compile: bool = False,
    tf32: bool = False,
) -> list[dict]:
    """FlatQuant on a prepared (uncalibrated) model, in place; returns per layer {"layer", "mse_init",
    "mse", "seconds", "steps"} (output MSE of the quantized layer against the FP layer on the calibration
    samples, before and after training, the layer's wall time and optimizer steps).

    `batch_size`: calibration sequences per optimizer step. FlatQuant's code (train_utils.cali_flat_quant)
    takes `cali_bsz` = 4 consecutive sequences per step, MSE over the batch, 15 × 128 / 4 = 480 steps per
    layer, lr 5e-3; ours defaulted to one sequence per step (1920 steps, lr 1e-3), which this keeps at 1.
    Larger batches make fewer, wider steps (the launches of a step are paid once for `batch_size`
    sequences), with the lr left to the caller. Sequences of different lengths never share a batch.
    `merge_once`: each transform inverted, merged into its readers' stacked weights and fake-quantized once
    per step, without host syncs (_StepMerge); False merges per reader with a checked inversion each, as the
    first version did (same math, other float rounding: with batch_size 1 it reproduces that version's bits).
    `compile`: torch.compile the per-layer loss (for CUDA; compiles in the first layer, again for another
    sequence length or a short last batch; the weight merges of _StepMerge stay eager).
    `tf32`: float32 matmuls on TF32 tensor cores for the call (CUDA; CPU matmuls are unaffected): on one H200 at
    the 0.6B shape, batch 8, 2048 tokens, 21.4 -> 12.7 ms a sequence eager, 18.6 -> 9.7 compiled
    (docs/results/flatquant/), the layers' output MSE unchanged to three digits."""
    _check_calibratable(model, batch_size)
    with _matmul_precision("high" if tf32 else torch.get_float32_matmul_precision()):
        return _calibrate_layers(model, samples, epochs, lr, alpha, seed, log, batch_size, merge_once, compile)


@contextmanager
def _matmul_precision(precision: str):
    """torch's float32 matmul precision set for the block and restored after (it is process-wide)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _calibrate_layers(model, samples, epochs, lr, alpha, seed, log, batch_size, merge_once, compile) -> list[dict]:
    """calibrate's loop over the decoder layers, each trained in float32 on the FP stream of its inputs."""
    dtype = next(model.parameters()).dtype
    buckets = _buckets(capture_inputs(model, samples))
    generator = torch.Generator().manual_seed(seed)
    loss_fn = torch.compile(_mse_loss) if compile else _mse_loss
    report = []
    for index, layer in each_layer(model, "flatquant"):
        start = time.perf_counter()
        mse_init, mse, steps = _calibrate_in_float32(
            layer, buckets, dtype, epochs, lr, alpha, seed, generator, batch_size, merge_once, loss_fn
        )
        seconds = time.perf_counter() - start
        report.append({"layer": index, "mse_init": mse_init, "mse": mse, "seconds": seconds, "steps": steps})
        if log is not None:
            log.info(
                "flatquant layer %d: output MSE %.3e -> %.3e (%d steps, %.1fs)", index, mse_init, mse, steps, seconds
            )
    return report


def _check_calibratable(model: nn.Module, batch_size: int) -> None:
    """ValueError unless `model` is prepared, has no online transforms yet and `batch_size` is at least 1."""
    layers = decoder_layers(model)
    if not isinstance(layers[0].mlp.down_proj, QuantLinear):
        raise ValueError(
            "flatquant needs the model prepared (pipeline.quant.apply.prepare) with every Linear of the layers targeted"
        )
    if transforms(model):
        raise ValueError("the model already has online transforms")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _calibrate_in_float32(layer: nn.Module, buckets: list, dtype: torch.dtype, *args) -> tuple[float, float, int]:
    """_calibrate_layer(layer, buckets, *args) with the layer and its inputs in float32, then back in `dtype`; the FP
    layer's outputs (the buckets' targets) become the next layer's inputs (the FP stream)."""
    layer.float()
    for b in buckets:
        b.hidden = b.hidden.float()
    mse_init, mse, steps = _calibrate_layer(layer, buckets, *args)
    layer.to(dtype)
    for b in buckets:
        b.hidden, b.targets = b.targets.to(dtype), None
    return mse_init, mse, steps


@torch.no_grad()
def layer_output_mse(model: nn.Module, samples: list[list[int]]) -> list[float]:
    """Per decoder layer, the MSE between its output with quantization on and off, on the inputs the model
    gives it with quantization off. MSE is invariant to an orthogonal change of basis, so the numbers of a
    rotated (QuaRot) model compare with an unrotated one's."""
    set_fake_quant(model, False)
    buckets = _buckets(capture_inputs(model, samples))
    out = []
    for layer in decoder_layers(model):
        for b in buckets:
            b.targets = torch.cat(
                [run_layer(layer, LayerInput(b.hidden[k : k + 1], b.kwargs)) for k in range(len(b.samples))]
            )
        set_fake_quant(layer, True)
        out.append(_layer_mse(layer, buckets, 1))
        set_fake_quant(layer, False)
        for b in buckets:
            b.hidden = b.targets
    set_fake_quant(model, True)
    return out
