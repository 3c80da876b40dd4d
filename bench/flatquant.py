"""FlatQuant calibration wall time on a Qwen3-shaped model, against GPTQ on the same (rotated) layers.

    python bench/flatquant.py --out flatquant.json                  # one H200: Qwen3-0.6B widths, 2 layers (~5 min)
    python bench/flatquant.py --layers 2 --nsamples 32 --out f.json # shorter
    python bench/flatquant.py --tiny --out flatquant-tiny.json      # CPU smoke test, seconds

The model is Qwen3Config with Qwen3-0.6B's widths (hidden 1024, intermediate 3072, 16 heads × 128 = 2048
≠ hidden, 8 KV heads) and `--layers` decoder layers, random float32 weights from a fixed seed (the ptq
stage quantizes transform methods in float32 too), prepared for W4A4KV4. Calibration: `--nsamples`
sequences of `--seqlen` random token ids, `--epochs` passes per layer (the paper's 128 × 2048 × 15 by
default), lr 1e-3, one sequence per step, as the ptq stage's `method: flatquant` runs it.

Timed: `pipeline.quant.flatquant.calibrate` (capture of layer-0 inputs included) and, as the peer measured
in the same run, QuaRot + our layerwise GPTQ (`pipeline.quant.gptq.gptq_layerwise`) on a fresh model of
the same shape and samples. Every layer has the same widths and the same number of steps, so the cost
of a layer is the same whatever its depth: the full 28-layer estimate is
    capture + 28 × (mean seconds per layer over layers 1.. — layer 0 also pays CUDA warm-up),
an extrapolation, printed and written as `full_model_estimate_s` next to the measured numbers.
Bounded: the defaults run 2 layers (~4.5 min on an H200: 62 ms per step at 2048 tokens, measured); `--layers` / `--nsamples` / `--epochs` shrink it further.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.quant import flatquant, quarot  # noqa: E402
from pipeline.quant.apply import prepare  # noqa: E402
from pipeline.quant.gptq import gptq_layerwise  # noqa: E402
from pipeline.quant.scheme import QuantSpec  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True)
FULL_LAYERS = 28
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
SPEC = QuantSpec.model_validate("w4a4kv4")


def build(shape: dict, layers: int, device: str) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**shape, num_hidden_layers=layers)).to(device).eval()
    prepare(model, SPEC)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on a 2-layer 256-wide model")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers to calibrate (default 2; tiny 2)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128; tiny 4)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--epochs", type=int, default=None, help="passes per layer (default 15; tiny 2)")
    parser.add_argument("--no-gptq", action="store_true", help="skip the QuaRot + GPTQ peer")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = TINY if args.tiny else QWEN3_0_6B
    layers = args.layers or 2
    nsamples = args.nsamples or (4 if args.tiny else 128)
    seqlen = args.seqlen or (64 if args.tiny else 2048)
    epochs = args.epochs if args.epochs is not None else (2 if args.tiny else 15)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, shape["vocab_size"], (seqlen,), generator=g).tolist() for _ in range(nsamples)]

    model = build(shape, layers, device)
    sync(device)
    start = time.perf_counter()
    report = flatquant.calibrate(model, samples, epochs=epochs, lr=1e-3)
    sync(device)
    flat_s = time.perf_counter() - start
    per_layer = [r["seconds"] for r in report]
    steady = per_layer[1:] or per_layer
    capture_s = flat_s - sum(per_layer)
    estimate = capture_s + FULL_LAYERS * sum(steady) / len(steady)
    for r in report:
        print(f"flatquant layer {r['layer']}: {r['seconds']:.2f}s, output MSE {r['mse_init']:.3e} -> {r['mse']:.3e}")
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "shape": "tiny" if args.tiny else "qwen3-0.6b", "layers": layers, "nsamples": nsamples, "seqlen": seqlen,
        "epochs": epochs, "steps_per_layer": epochs * nsamples,
        "flatquant_s": flat_s, "flatquant_capture_s": capture_s, "flatquant_layer_s": per_layer,
        "full_model_estimate_s": estimate if not args.tiny else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }
    del model
    if not args.no_gptq:
        model = build(shape, layers, device)
        sync(device)
        start = time.perf_counter()
        quarot.rotate(model)
        gptq_layerwise(model, samples)
        sync(device)
        result["quarot_gptq_s"] = time.perf_counter() - start
        result["flatquant_over_quarot_gptq"] = flat_s / result["quarot_gptq_s"]
    print(f"flatquant: {flat_s:.1f}s for {layers} layers ({capture_s:.1f}s capture, "
          f"{sum(steady) / len(steady):.2f}s per layer after the first)")
    if not args.tiny:
        print(f"extrapolated to {FULL_LAYERS} layers: {estimate:.0f}s (capture + {FULL_LAYERS} x per-layer mean)")
    if "quarot_gptq_s" in result:
        print(f"quarot+gptq on the same layers: {result['quarot_gptq_s']:.1f}s; "
              f"flatquant / quarot+gptq = {result['flatquant_over_quarot_gptq']:.1f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
