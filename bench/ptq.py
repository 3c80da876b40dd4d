"""GPTQ wall time: our ptq stage's GPTQ (pipeline.quant.methods.gptq.run_gptq) over llmcompressor's bare `oneshot`.

    python bench/ptq.py --out ptq.json                 # one GPU: Qwen3-0.6B and 1.7B shapes
    python bench/ptq.py --shapes 0.6b --out ptq.json   # one shape
    python bench/ptq.py --tiny --out ptq-tiny.json     # CPU smoke test, seconds

Same model (Qwen3Config with the named sizes, random bf16 weights from a fixed seed, saved once to a
temporary directory because oneshot re-reads the config from it), same GPTQModifier (W3G128
asymmetric, act-order static, block 128, damp 0.01), same calibration DataLoader (128 sequences of
2048 random token ids; `--tiny`: 8 x 128). "bare" is `oneshot(model, recipe, dataset=loader)`; "ours"
is `run_gptq`, i.e. that same oneshot plus the conversion into QuantLinears. Each runs on a freshly
loaded model, after one untimed warm-up of both on a 1-layer model of the same widths (CUDA
context, Triton kernels); the best of `--repeats` runs is reported, with ours / bare as the ratio.
Loading the model and the ptq stage's SQNR report are outside both timings.

`--tiny` also prints the per-layer SQNR of RTN vs GPTQ on that model (the sanity numbers the ptq
stage logs; random weights and tokens, so only the comparison means something).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from real_shapes import QWEN3_SIZES  # noqa: E402

from pipeline.data.tokenizer import build_tokenizer  # noqa: E402
from pipeline.loading import load_pretrained  # noqa: E402
from pipeline.quant import sqnr  # noqa: E402
from pipeline.quant.apply import quantize_rtn  # noqa: E402
from pipeline.quant.calibration import calibration_loader  # noqa: E402
from pipeline.quant.methods.gptq import gptq_modifier, run_gptq  # noqa: E402
from pipeline.quant.scheme import QuantSpec  # noqa: E402

SHAPES = {size: dict(QWEN3_SIZES[size], max_position_embeddings=40960) for size in ("0.6b", "1.7b")}
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SPEC = QuantSpec.model_validate("w3g128")
GPTQ_ARGS = dict(block_size=128, dampening_frac=0.01, actorder="static", observer="minmax")


def save_random_model(shape: dict, path: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**shape)).to(dtype).save_pretrained(path)
    return path


def load(path: Path, dtype: torch.dtype, device: str):
    return load_pretrained(path, dtype=dtype).to(device).eval()


def bare(model, tokenizer, samples):
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    oneshot(
        model=model,
        recipe=gptq_modifier(model, SPEC, **GPTQ_ARGS),
        dataset=calibration_loader(samples),
        processor=tokenizer,
    )
    active_session().reset()


def ours(model, tokenizer, samples):
    run_gptq(model, tokenizer, SPEC, samples, **GPTQ_ARGS)


def timed(fn, path, dtype, device, tokenizer, samples) -> float:
    model = load(path, dtype, device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(model, tokenizer, samples)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def bench_shape(name, shape, tokenizer, nsamples, seqlen, repeats, dtype, device, tmp: Path) -> dict:
    rng = random.Random(0)
    samples = [[rng.randrange(shape["vocab_size"]) for _ in range(seqlen)] for _ in range(nsamples)]
    warm = save_random_model(dict(shape, num_hidden_layers=1), tmp / f"{name}-warm", dtype)
    for fn in (bare, ours):
        timed(fn, warm, dtype, device, tokenizer, samples[:2])
    path = save_random_model(shape, tmp / name, dtype)
    times = {"bare": [], "ours": []}
    for _ in range(repeats):
        times["bare"].append(timed(bare, path, dtype, device, tokenizer, samples))
        times["ours"].append(timed(ours, path, dtype, device, tokenizer, samples))
    result = {
        "shape": name,
        **{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "calibration": f"{nsamples}x{seqlen}",
        "bare_s": min(times["bare"]),
        "ours_s": min(times["ours"]),
        "all_s": times,
    }
    result["ratio_ours_over_bare"] = result["ours_s"] / result["bare_s"]
    print(
        f"{name}: bare oneshot {result['bare_s']:.2f}s, ours {result['ours_s']:.2f}s, "
        f"ratio ours/bare {result['ratio_ours_over_bare']:.3f}",
        flush=True,
    )
    return result


def sqnr_table(path, dtype, device, tokenizer, samples) -> dict:
    """Per-layer SQNR of RTN and GPTQ on the same model and samples."""
    reports = {}
    for method in ("rtn", "gptq"):
        model = load(path, dtype, device)
        originals = sqnr.snapshot_weights(model, SPEC)
        if method == "rtn":
            quantize_rtn(model, SPEC)
        else:
            ours(model, tokenizer, samples)
        reports[method] = sqnr.layer_sqnr(model, originals, samples[:4])
    print(f"{'layer':<34} {'RTN weight':>10} {'GPTQ weight':>11} {'RTN output':>10} {'GPTQ output':>11}")
    for r, g in zip(reports["rtn"], reports["gptq"]):
        print(
            f"{r['layer']:<34} {r['weight_sqnr']:>10.2f} {g['weight_sqnr']:>11.2f} {r['output_sqnr']:>10.2f} "
            f"{g['output_sqnr']:>11.2f}"
        )
    summary = {m: sqnr.summarize(rep) for m, rep in reports.items()}
    print(
        "mean output SQNR: RTN {:.2f} dB, GPTQ {:.2f} dB".format(
            summary["rtn"]["output_sqnr_mean"], summary["gptq"]["output_sqnr_mean"]
        )
    )
    return {"per_layer": reports, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on a 2-layer model")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 1 on GPU, 3 tiny)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shapes = {"tiny": TINY} if args.tiny else {k: SHAPES[k] for k in args.shapes}
    nsamples = args.nsamples or (8 if args.tiny else 128)
    seqlen = args.seqlen or (128 if args.tiny else 2048)
    repeats = args.repeats or (3 if args.tiny else 1)
    if args.tiny:
        torch.set_num_threads(1)  # shared CPU: more threads than cores only adds noise
    tokenizer = build_tokenizer()  # oneshot wants a processor; the loader already holds token ids

    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "shapes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            results["shapes"].append(
                bench_shape(name, shape, tokenizer, nsamples, seqlen, repeats, dtype, device, Path(tmp))
            )
        if args.tiny:
            rng = random.Random(1)
            samples = [[rng.randrange(TINY["vocab_size"]) for _ in range(seqlen)] for _ in range(nsamples)]
            results["sqnr"] = sqnr_table(Path(tmp) / "tiny", dtype, device, tokenizer, samples)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
