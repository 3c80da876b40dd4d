"""FlatQuant (Sun et al. 2024): per-layer learnable affine transforms that flatten weights and activations
before 4-bit quantization, with learnable weight and activation clipping, calibrated decoder layer by
decoder layer on the layer's output MSE against the full-precision layer. The W4A4KV4 PTQ init of
DESIGN.md §1.

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
(pipeline.quant.quarot.rotate_values; the paper learns this one too). Each Linear learns a weight clip per output channel (σ(logit) · its min/max)
and an activation clip (one scalar, σ(logit) · each token's min/max).

Init: A, B Hadamard factors (pipeline.quant.hadamard, so a transform starts as a rotation) and s the
SmoothQuant balance s_j = max|x_j|^α / max|W_:,j|^(1-α) (α = 0.5) from the calibration activations.
Training: AdamW on every transform, smoothing vector and clip logit of the layer, `epochs` passes over the
samples (one sample per step), loss = MSE(quantized layer(x), full-precision layer(x)), cosine schedule,
in float32; each layer keeps the parameters of the epoch (or the init) with the lowest calibration MSE, measured
after every epoch: with one sample per step the epoch-to-epoch MSE swings by up to 2x, and ending on a bad epoch
used to throw the good ones away (keeping the init). Each layer is calibrated on the full-precision model's inputs to it (the FP stream, as the
paper's code does), with the layer's KV-cache quantization on.

Departures from the paper: A and B are plain matrices (the paper optionally keeps them in SVD form to
guarantee invertibility; at these learning rates they stay well conditioned); lr 1e-3 by default, not the
paper's 5e-3, because with one sample per step (the paper batches 4) 5e-3 made layer MSE worse on our
tiny models;
q, k and v each hold their own activation clip (they quantize the same input; a fused kernel would
share one).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import fake
from pipeline.quant.apply import quant_linears, set_fake_quant
from pipeline.quant.hadamard import kronecker_factors
from pipeline.quant.layerwise import LayerInput, capture_inputs, each_layer, run_layer
from pipeline.quant.linear import QuantLinear
from pipeline.quant.online import KroneckerTransform, TransformedNorm, transforms
from pipeline.quant.quarot import decoder_layers, rotate_values

CLIP_INIT_LOGIT = 4.0
"""σ(4) ≈ 0.982: clipping starts just inside the min/max range, as OmniQuant's LWC does."""


class _CalibLinear(nn.Module):
    """A QuantLinear during calibration: its weight merged with the transform on the fly (differentiable),
    fake-quantized with the learned weight clip; its input fake-quantized with the learned activation clip."""

    def __init__(self, linear: QuantLinear, merge: KroneckerTransform):
        super().__init__()
        self.linear = linear
        self._merge = (merge,)  # owned by the norm or by linear.input_transform: not registered twice
        self.weight_clip = nn.Parameter(torch.full((linear.out_features, 1), CLIP_INIT_LOGIT, device=linear.weight.device))
        self.act_clip = nn.Parameter(torch.tensor(CLIP_INIT_LOGIT, device=linear.weight.device))

    def merged_weight(self, dtype=None) -> torch.Tensor:
        w = self.linear.weight
        return self._merge[0].inverse_transpose(w if dtype is None else w.to(dtype))

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.linear.weights
        min_vals, max_vals = fake.group_minmax(w.detach(), spec.group_size)
        clip = torch.sigmoid(self.weight_clip).to(w.dtype)
        return fake.calculate_qparams(min_vals * clip, max_vals * clip, spec.num_bits, spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.linear
        if q.input_transform is not None:
            x = q.input_transform(x)
        if q.activations is not None:
            a = q.activations
            x = fake.fake_quantize_per_token(x, a.num_bits, a.symmetric, torch.sigmoid(self.act_clip))
        w = self.merged_weight()
        scale, zero_point = self.qparams(w)
        spec = q.weights
        w_q = fake.fake_quantize(w, scale, None if spec.symmetric else zero_point, spec.num_bits, spec.group_size)
        return F.linear(x, w_q, q.bias)

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


def _abs_max_hooks(modules: dict[str, nn.Module], stats: dict[str, torch.Tensor]) -> list:
    """Per-channel max |input| of each module, accumulated over calls."""
    def hook(name, module, args):
        x = args[0].detach().abs().flatten(0, -2).amax(0).float()
        stats[name] = x if name not in stats else torch.maximum(stats[name], x)

    return [m.register_forward_pre_hook(lambda mod, a, name=name: hook(name, mod, a)) for name, m in modules.items()]


def _init_transform(n: int, act_max: torch.Tensor | None, readers: list[nn.Linear], alpha: float,
                    device, seed: int) -> KroneckerTransform:
    left, right = kronecker_factors(n, seed)
    smooth = None
    if act_max is not None:
        w_max = torch.stack([r.weight.detach().abs().amax(0).float() for r in readers]).amax(0)
        smooth = (act_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        smooth = smooth / smooth.mean()  # scale-free: the Hadamard and the quantizer do not care, Adam does
    transform = KroneckerTransform(left.float(), right.float(), smooth)
    return transform.to(device)


def _layer_mse(layer: nn.Module, inputs: list[LayerInput], targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(F.mse_loss(run_layer(layer, i), t)) for i, t in zip(inputs, targets)) / len(inputs)


def calibrate(
    model: nn.Module,
    samples: list[list[int]],
    epochs: int = 15,
    lr: float = 1e-3,
    alpha: float = 0.5,
    seed: int = 0,
    log=None,
) -> list[dict]:
    """FlatQuant on a prepared (uncalibrated) model, in place; returns per layer {"layer", "mse_init",
    "mse", "seconds"} (output MSE of the quantized layer against the FP layer on the calibration samples,
    before and after training, and the layer's wall time)."""
    layers = decoder_layers(model)
    if not isinstance(layers[0].mlp.down_proj, QuantLinear):
        raise ValueError("flatquant needs the model prepared (pipeline.quant.apply.prepare) with every Linear of the layers targeted")
    if transforms(model):
        raise ValueError("the model already has online transforms")
    dtype = next(model.parameters()).dtype
    inputs = capture_inputs(model, samples)
    generator = torch.Generator().manual_seed(seed)
    report = []
    for index, layer in each_layer(model, "flatquant"):
        start = time.perf_counter()
        layer.float()
        inputs = [LayerInput(i.hidden.float(), i.kwargs) for i in inputs]
        attn, mlp = layer.self_attn, layer.mlp
        set_fake_quant(layer, False)
        stats: dict[str, torch.Tensor] = {}
        handles = _abs_max_hooks({"qkv": attn.q_proj, "o": attn.o_proj, "up": mlp.up_proj, "down": mlp.down_proj}, stats)
        with torch.no_grad():
            targets = [run_layer(layer, i) for i in inputs]
        for h in handles:
            h.remove()

        device = attn.q_proj.weight.device
        head_dim = attn.head_dim
        rotate_values(attn, torch.kron(*kronecker_factors(head_dim)))
        t_qkv = _init_transform(attn.q_proj.in_features, stats["qkv"], [attn.q_proj, attn.k_proj, attn.v_proj], alpha, device, seed)
        t_up = _init_transform(mlp.up_proj.in_features, stats["up"], [mlp.gate_proj, mlp.up_proj], alpha, device, seed)
        attn.o_proj.input_transform = _init_transform(attn.o_proj.in_features, stats["o"], [attn.o_proj], alpha, device, seed)
        mlp.down_proj.input_transform = _init_transform(mlp.down_proj.in_features, stats["down"], [mlp.down_proj], alpha, device, seed)
        attn.qk_transform = _init_transform(head_dim, None, [], alpha, device, seed)
        layer.input_layernorm = TransformedNorm(layer.input_layernorm, t_qkv)
        layer.post_attention_layernorm = TransformedNorm(layer.post_attention_layernorm, t_up)

        merges = {"self_attn.q_proj": t_qkv, "self_attn.k_proj": t_qkv, "self_attn.v_proj": t_qkv,
                  "mlp.gate_proj": t_up, "mlp.up_proj": t_up,
                  "self_attn.o_proj": attn.o_proj.input_transform, "mlp.down_proj": mlp.down_proj.input_transform}
        calib = {}
        for name, q in quant_linears(layer):
            q.weight.requires_grad_(False)
            calib[name] = _CalibLinear(q, merges[name])
            layer.set_submodule(name, calib[name])
        set_fake_quant(layer, True)  # KV-cache quantization on (the QuantLinears are wrapped)

        params = [p for _, t in transforms(layer) for p in t.parameters()]
        clips = [p for c in calib.values() for p in (c.weight_clip, c.act_clip)]
        for p in params + clips:
            p.requires_grad_(True)
        mse_init = _layer_mse(layer, inputs, targets)
        best_mse, best_state = mse_init, [p.detach().clone() for p in params + clips]
        steps = epochs * len(inputs)
        optimizer = torch.optim.AdamW([{"params": params}, {"params": clips}], lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
        for _ in range(epochs):
            with torch.enable_grad():
                for k in torch.randperm(len(inputs), generator=generator).tolist():
                    loss = F.mse_loss(run_layer(layer, inputs[k]), targets[k])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            epoch_mse = _layer_mse(layer, inputs, targets)
            if epoch_mse < best_mse:
                best_mse, best_state = epoch_mse, [p.detach().clone() for p in params + clips]
        with torch.no_grad():
            for p, p0 in zip(params + clips, best_state):
                p.copy_(p0)
        for p in params:
            p.requires_grad_(False)
        for name, c in calib.items():
            layer.set_submodule(name, c.finalize())
        mse = _layer_mse(layer, inputs, targets)
        layer.to(dtype)
        inputs = [LayerInput(t.to(dtype), i.kwargs) for i, t in zip(inputs, targets)]
        seconds = time.perf_counter() - start
        report.append({"layer": index, "mse_init": mse_init, "mse": mse, "seconds": seconds})
        if log is not None:
            log.info("flatquant layer %d: output MSE %.3e -> %.3e (%d steps, %.1fs)", index, mse_init, mse, steps, seconds)
    return report


@torch.no_grad()
def layer_output_mse(model: nn.Module, samples: list[list[int]]) -> list[float]:
    """Per decoder layer, the MSE between its output with quantization on and off, on the inputs the model
    gives it with quantization off. MSE is invariant to an orthogonal change of basis, so the numbers of a
    rotated (QuaRot) model compare with an unrotated one's."""
    set_fake_quant(model, False)
    inputs = capture_inputs(model, samples)
    out = []
    for layer in decoder_layers(model):
        targets = [run_layer(layer, i) for i in inputs]
        set_fake_quant(layer, True)
        out.append(_layer_mse(layer, inputs, targets))
        set_fake_quant(layer, False)
        inputs = [LayerInput(t, i.kwargs) for i, t in zip(inputs, targets)]
    set_fake_quant(model, True)
    return out
