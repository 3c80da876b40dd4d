"""FlatQuant calibration wall time on a Qwen3-shaped model: the one-sequence-per-step path against the
batched one, extrapolated to the full calibration; QuaRot + GPTQ on the same layers as the peer.

    python bench/flatquant.py --out flatquant.json          # one GPU: 0.6B widths, 2 layers, 32 × 2048, 2 epochs
    python bench/flatquant.py --compile --no-gptq --out f.json         # also the batched path with torch.compile
    python bench/flatquant.py --compile --tf32 --no-before --no-gptq --batch-size 8  # the recipes' batch, compile, tf32
    python bench/flatquant.py --tiny --no-gptq                         # CPU, seconds

The model is Qwen3Config with Qwen3-0.6B's widths (hidden 1024, intermediate 3072, 16 heads × 128 = 2048
≠ hidden, 8 KV heads) and `--layers` decoder layers, random float32 weights from a fixed seed (the ptq
stage quantizes transform methods in float32 too), prepared for W4A4KV4. Calibration: `--nsamples`
sequences of `--seqlen` random token ids, `--epochs` passes per layer, lr 1e-3.

Paths timed, each on a fresh model (`pipeline.quant.methods.flatquant.calibrate`, capture of layer-0 inputs included):
  before:  batch_size 1, merge_once False (the ptq stage without `batch_size`: the first version)
  after-bN:   batch_size N for each N of `--batch-size` (default 4, as FlatQuant's code, and 8), each transform
              merged once per step
  compile-bN: the same with the per-layer loss under torch.compile (`--compile`; compiles in the first layer)
For each: wall ms per optimizer step (a layer's seconds / its steps, so the per-epoch MSE evaluation, the FP
targets and the merge are included), steps per layer, peak GPU memory, and the full calibration extrapolated
to 28 layers at the paper's 15 epochs × 128 samples:
    capture × 128 / nsamples + 28 × ms per step × 15 × ceil(128 / batch_size),
with ms per step from the layers after the first (layer 0 pays CUDA warm-up and compilation). The per-layer
fixed costs (targets, init, merge) are spread over 2 epochs here rather than 15, so the estimate errs high.
It holds for the shape and sequence length measured: `--seqlen` other than 2048 or `--tiny` measure a ratio only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from real_shapes import QWEN3_SIZES  # noqa: E402

from pipeline.quant.apply import prepare  # noqa: E402
from pipeline.quant.methods import flatquant, quarot  # noqa: E402
from pipeline.quant.methods.gptq import gptq_layerwise  # noqa: E402
from pipeline.quant.scheme import QuantSpec  # noqa: E402

QWEN3_0_6B = dict(QWEN3_SIZES["0.6b"], max_position_embeddings=40960)
FULL_LAYERS = QWEN3_0_6B["num_hidden_layers"]
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SPEC = QuantSpec.model_validate("w4a4kv4")


def build(shape: dict, layers: int, device: str) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**shape, "num_hidden_layers": layers})).to(device).eval()
    prepare(model, SPEC)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


FULL_EPOCHS, FULL_SAMPLES = 15, 128


def time_path(
    name: str, shape: dict, layers: int, device: str, samples: list[list[int]], epochs: int, **calibrate_kwargs
) -> dict:
    """One calibration on a fresh model: per-layer seconds and steps, ms per step, peak memory, the estimate."""
    model = build(shape, layers, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    report = flatquant.calibrate(model, samples, epochs=epochs, lr=1e-3, **calibrate_kwargs)
    sync(device)
    total = time.perf_counter() - start
    steady = report[1:] or report
    ms_per_step = 1000 * sum(r["seconds"] for r in steady) / sum(r["steps"] for r in steady)
    capture_s = total - sum(r["seconds"] for r in report)
    batch = calibrate_kwargs.get("batch_size", 1)
    full_steps = FULL_EPOCHS * math.ceil(FULL_SAMPLES / batch)
    full_s = capture_s * FULL_SAMPLES / len(samples) + FULL_LAYERS * ms_per_step / 1000 * full_steps
    for r in report:
        print(
            f"{name} layer {r['layer']}: {r['seconds']:.2f}s, {r['steps']} steps, output MSE {r['mse_init']:.3e} -> "
            f"{r['mse']:.3e}"
        )
    return {
        "batch_size": batch,
        **{k: v for k, v in calibrate_kwargs.items() if k != "batch_size"},
        "seconds": total,
        "capture_s": capture_s,
        "layer_s": [r["seconds"] for r in report],
        "steps_per_layer": report[0]["steps"],
        "ms_per_step": ms_per_step,
        "ms_per_sample": ms_per_step / batch,
        "mse": [r["mse"] for r in report],
        "full_steps_per_layer": full_steps,
        "full_estimate_min": full_s / 60,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def print_path(name: str, r: dict, label: str, full: bool) -> None:
    memory = f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
    print(
        f"{name:10s} ({label}): batch {r['batch_size']}, {r['ms_per_step']:.1f} ms/step "
        f"({r['ms_per_sample']:.1f} ms/sequence), {r['steps_per_layer']} steps/layer here, "
        f"{r['full_steps_per_layer']} at 15 x 128{memory}",
        flush=True,
    )
    if full:
        print(
            f"{'':10s} full calibration, {FULL_LAYERS} layers x 15 epochs x 128 x 2048: "
            f"~{r['full_estimate_min']:.1f} min (extrapolated)",
            flush=True,
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU run on a 2-layer 256-wide model")
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers to calibrate (at least 2: the first warms up)"
    )
    parser.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 32; tiny 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    parser.add_argument("--epochs", type=int, default=2, help="passes per layer")
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[4, 8],
        help="sequences per step of the batched path, one run each (default 4 8)",
    )
    parser.add_argument("--compile", action="store_true", help="also time the batched path under torch.compile")
    parser.add_argument("--tf32", action="store_true", help="every path's float32 matmuls on TF32 tensor cores")
    parser.add_argument("--no-before", action="store_true", help="skip the one-sequence-per-step path")
    parser.add_argument("--no-gptq", action="store_true", help="skip the QuaRot + GPTQ peer")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return parser.parse_args()


def paths_to_time(args: argparse.Namespace) -> dict[str, dict]:
    """Path name -> its calibrate() keywords: before (one sequence per step), after-bN, compile-bN."""
    paths = {} if args.no_before else {"before": dict(batch_size=1, merge_once=False)}
    for batch in args.batch_size:
        paths[f"after-b{batch}"] = dict(batch_size=batch)
    if args.compile:
        for batch in args.batch_size:
            paths[f"compile-b{batch}"] = dict(batch_size=batch, compile=True)
    return paths


def time_quarot_gptq(shape: dict, layers: int, device: str, samples: list[list[int]]) -> float:
    """Seconds of the QuaRot + GPTQ peer on a fresh model of the same layers and samples."""
    model = build(shape, layers, device)
    sync(device)
    start = time.perf_counter()
    quarot.rotate(model)
    gptq_layerwise(model, samples)
    sync(device)
    return time.perf_counter() - start


def print_summary(result: dict, paths: dict[str, dict]) -> None:
    if "before" in result:
        for name in [n for n in paths if n != "before" and "error" not in result[n]]:
            ratio = result[name]["ms_per_sample"] / result["before"]["ms_per_sample"]
            print(f"{name} / before, ms per sequence: {ratio:.2f}")
    if "quarot_gptq_s" in result:
        print(f"quarot+gptq on the same layers and samples: {result['quarot_gptq_s']:.1f}s")


def main() -> None:
    args = parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        torch.set_num_threads(1)  # a CPU run measures launches, and OpenMP threads on shared cores stall each other
    shape = TINY if args.tiny else QWEN3_0_6B
    nsamples = args.nsamples or (8 if args.tiny else 32)
    seqlen = args.seqlen or (64 if args.tiny else 2048)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, shape["vocab_size"], (seqlen,), generator=g).tolist() for _ in range(nsamples)]
    paths = paths_to_time(args)

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "shape": "tiny" if args.tiny else "qwen3-0.6b",
        "layers": args.layers,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "epochs": args.epochs,
        "tf32": args.tf32,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    label = f"{result['device']}, {result['shape']}, {seqlen} tokens"
    full = not args.tiny and seqlen == 2048
    for name, kwargs in paths.items():
        try:
            result[name] = time_path(name, shape, args.layers, device, samples, args.epochs, tf32=args.tf32, **kwargs)
        except Exception as e:  # noqa: BLE001 (compile on a new stack): the other paths' numbers still count
            if not kwargs.get("compile"):
                raise
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} failed: {result[name]['error'][:2000]}")
            continue
        print_path(name, result[name], label, full)
    if not args.no_gptq:
        result["quarot_gptq_s"] = time_quarot_gptq(shape, args.layers, device, samples)
    print_summary(result, paths)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
