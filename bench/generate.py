"""Generation throughput at reasoning lengths: ours (pipeline.generate, `refill`) vs plain `model.generate`
in static batches vs transformers' continuous batching, in one run, with each one's peak memory.

    python bench/generate.py --out gen.json                 # one H100: the reasoning workload below
    python bench/generate.py --tiny --out gen-tiny.json     # CPU smoke test (a 2-layer model, seconds)
    python bench/generate.py --workload fixed --methods ours,plain,static,continuous --out gen-fixed.json

Reasoning workload (default): Qwen3-0.6B's shape with random bf16 weights (built here, no download),
`--prompts` 256 prompts of random token ids, 128..384 tokens long, each stopping after its own number of
new tokens drawn uniformly from `--stop-range` (500..8000), seeded. Every method generates exactly those
lengths: ours through per-prompt `max_new_tokens`, plain generate through a logits processor that plants
the end token at that step (and bars it before), continuous batching through per-request `max_new_tokens`.
Decoding is greedy. `fixed`: every prompt `--prompt-len` tokens, every completion `--new-tokens`.

Methods:
  ours        pipeline.generate.generate_ids, GenerationSpec(backend=--ours-backend, batch_size=--batch-size):
              batches that refill, slots sized from free memory (pipeline.refill)
  plain       model.generate in static batches of as many sequences as ours' memory budget holds at once
              (a batch runs until its longest sequence stops), dynamic cache
  static      the same with cache_implementation="static" (compiled on CUDA)
  continuous  transformers' ContinuousBatchingManager (paged cache, per-request max_new_tokens), default config
              on CUDA, a small explicit one on CPU (its default sizes the cache from all free RAM)
The baselines decode the first `--baseline-prompts` prompts: by default, on the reasoning workload, as many
as ours' memory budget holds at once (one static batch; so the run takes minutes, not an hour), else all.
Each method first runs untimed on 4 prompts of at most 32 new tokens (CUDA set-up, compile).

Printed and written to `--out` (JSON, rewritten after every method): tokens, seconds, tokens/s, peak
GPU memory (allocated, the weights included) and the ratio to plain generate, or the out-of-memory
error of a method that ran out (the others still run); and `kv_read_bound`: the
tokens/s no method can beat on this workload if every step reads each live sequence's keys and values
once at `--hbm-tb-s` TB/s (3.35 = H100 SXM; 4.8 = H200).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from real_shapes import QWEN3_SIZES, TINY_QWEN3  # noqa: E402

from pipeline import refill  # noqa: E402
from pipeline.generate import GenerationSpec, generate_ids  # noqa: E402

QWEN3_0_6B = dict(QWEN3_SIZES["0.6b"], max_position_embeddings=40960)
TINY = dict(TINY_QWEN3, vocab_size=1024, max_position_embeddings=2048)
EOS, PAD = 151645, 151643  # <|im_end|>, <|endoftext|> in Qwen3's vocabulary


def build(tiny: bool, device: str, dtype: torch.dtype) -> Qwen3ForCausalLM:
    sizes = TINY if tiny else QWEN3_0_6B
    eos, pad = (sizes["vocab_size"] - 1, sizes["vocab_size"] - 2) if tiny else (EOS, PAD)
    config = Qwen3Config(**sizes, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    return model.eval()


def count_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def run_once(fn, device: str) -> tuple[float, int]:
    """(seconds, tokens) of one call of fn, the GPU drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding workload shared by this bench and bench/rollout.py."""
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and a small workload (CPU smoke test)")
    parser.add_argument("--out", required=True, help="write results here as JSON")
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="number of prompts (default 64, tiny 8; the reasoning workload: 256, tiny 16)",
    )
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 256; tiny 32)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per prompt (default 512; tiny 32)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="GenerationSpec.batch_size (default = prompts)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def workload(args: argparse.Namespace) -> tuple[int, int, int, int, torch.dtype]:
    """(prompts, prompt length, new tokens, batch size, dtype) from add_workload_arguments' flags."""
    prompts_n = args.prompts or (8 if args.tiny else 64)
    prompt_len = args.prompt_len or (32 if args.tiny else 256)
    new_tokens = args.new_tokens or (32 if args.tiny else 512)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return prompts_n, prompt_len, new_tokens, args.batch_size or prompts_n, dtype


# -- the methods: each decodes (prompts, lengths) greedily and returns the tokens it generated -----------
class PlantedStop(LogitsProcessor):
    """Row r of a `model.generate` batch emits the end token exactly at its new token lengths[r] (and never before)."""

    def __init__(self, lengths: list[int], prompt_width: int, eos: int, device):
        self.lengths, self.width, self.eos = torch.tensor(lengths, device=device), prompt_width, eos

    def __call__(self, input_ids, scores):
        last = (self.lengths - 1 == input_ids.shape[1] - self.width)[:, None]  # (rows, 1): the row's last step
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos] = 0.0
        scores[:, self.eos] = float("-inf")
        return torch.where(last, forced, scores)  # no boolean indexing: that would sync with the GPU every step


def hf_generate(model, prompts: list[list[int]], lengths: list[int], batch: int, **extra) -> int:
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    tokens = 0
    for start in range(0, len(prompts), batch):
        rows, limits = prompts[start : start + batch], lengths[start : start + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        config = GenerationConfig(
            max_new_tokens=max(limits), do_sample=False, eos_token_id=eos, pad_token_id=pad, **extra
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([PlantedStop(limits, width, eos, model.device)]),
        )
        tokens += count_tokens(out[:, width:].tolist(), eos)
    return tokens


def hf_continuous(model, prompts: list[list[int]], lengths: list[int], tiny: bool) -> int:
    from transformers import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    # no end token: every request runs to its own max_new_tokens
    config = GenerationConfig(
        max_new_tokens=max(lengths), do_sample=False, eos_token_id=-1, pad_token_id=model.config.pad_token_id
    )
    cb = (
        ContinuousBatchingConfig(num_blocks=256, block_size=32, max_batch_tokens=512)
        if tiny
        else ContinuousBatchingConfig()
    )
    hints = WorkloadHints(
        max_prompt_length=max(map(len, prompts)), max_generated_length=max(lengths), num_requests=len(prompts)
    )
    tokens, done = 0, 0
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=cb, workload_hints=hints, block=True, timeout=5
    ) as manager:
        for ids, limit in zip(prompts, lengths):
            manager.add_request(ids, max_new_tokens=limit)
        while done < len(prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"continuous batching stopped after {done} of {len(prompts)} requests")
            elif result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"continuous batching failed a request: {result.error}")
                tokens += len(result.generated_tokens)
                done += 1
    return tokens


def ours(model, prompts: list[list[int]], lengths: list[int], batch_size: int, backend: str) -> int:
    spec = GenerationSpec(max_new_tokens=max(lengths), batch_size=batch_size, backend=backend)
    rows = generate_ids(model, prompts, spec, [], model.config.pad_token_id, max_new_tokens=lengths)
    return sum(len(samples[0]) for samples in rows)


# -- workload and measurement ------------------------------------------------------------------------
def reasoning_workload(model, n: int, prompt_len: int, stop_range: tuple[int, int]) -> tuple[list, list]:
    """n random prompts of prompt_len/2 .. 3*prompt_len/2 tokens and their stop lengths, uniform in stop_range."""
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(prompt_len // 2, prompt_len * 3 // 2 + 1, (n,), generator=gen).tolist()
    # ids below the special tokens, so no prompt holds an end token
    prompts = [torch.randint(0, model.config.pad_token_id, (size,), generator=gen).tolist() for size in sizes]
    lengths = torch.randint(stop_range[0], stop_range[1] + 1, (n,), generator=gen).tolist()
    return prompts, lengths


def kv_read_bound(model, prompts: list[list[int]], lengths: list[int], tb_per_s: float) -> float:
    """Tokens/s if decoding only read each live sequence's keys and values once per step, at tb_per_s."""
    # step t of a sequence reads its prompt and the t tokens before: about P n + n^2 / 2 token-reads in all
    reads = sum(len(p) * n + n * (n - 1) // 2 for p, n in zip(prompts, lengths))
    return sum(lengths) / (reads * refill.kv_bytes_per_token(model) / (tb_per_s * 1e12))


def measure(fn, warmup, device: str, repeats: int) -> dict:
    """Best of `repeats` runs of fn after one untimed run of `warmup` (fn itself, or a smaller call), with
    fn's peak GPU memory: {seconds, tokens, tokens_per_s, warmup_s, peak_memory_gib}."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    warmup_s, _ = run_once(warmup, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens = min(run_once(fn, device) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "warmup_s": warmup_s,
        "peak_memory_gib": peak,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--workload", choices=("reasoning", "fixed"), default="reasoning")
    parser.add_argument(
        "--stop-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="reasoning: new tokens per prompt, uniform (default 500 8000; tiny 8 64)",
    )
    parser.add_argument(
        "--baseline-prompts",
        type=int,
        default=None,
        help="prompts the baselines decode (default: reasoning, what fits in memory at once; tiny and fixed, all)",
    )
    parser.add_argument("--methods", default="ours,plain,continuous", help="from ours, plain, static, continuous")
    parser.add_argument("--ours-backend", default="refill", help="ours: GenerationSpec.backend")
    parser.add_argument("--hbm-tb-s", type=float, default=3.35, help="memory bandwidth for kv_read_bound (TB/s)")
    args = parser.parse_args()
    if args.workload == "reasoning" and args.prompts is None:
        args.prompts = 16 if args.tiny else 256
    return args


def make_workload(
    model, args: argparse.Namespace, prompts_n: int, prompt_len: int, new_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """(prompts, stop lengths) of `--workload`: reasoning (random lengths) or fixed."""
    if args.workload == "reasoning":
        return reasoning_workload(
            model, prompts_n, prompt_len, args.stop_range or ((8, 64) if args.tiny else (500, 8000))
        )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.pad_token_id, (prompts_n, prompt_len), generator=gen).tolist()
    return prompts, [new_tokens] * prompts_n


def describe(
    model, args: argparse.Namespace, dtype: torch.dtype, prompts: list, lengths: list[int], slots: int
) -> dict:
    """The report's header: model, device, workload, memory and the KV-read bound; no results yet."""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return {
        "model": "tiny" if args.tiny else "Qwen3-0.6B shape, random weights",
        "device": device_name,
        "dtype": str(dtype),
        "workload": args.workload,
        "prompts": len(prompts),
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "new_tokens": [min(lengths), max(lengths)],
        "mean_new_tokens": sum(lengths) / len(lengths),
        "kv_bytes_per_token": refill.kv_bytes_per_token(model),
        "slots_for_memory": slots,
        "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "kv_read_bound": {
            "hbm_tb_s": args.hbm_tb_s,
            "tokens_per_s": kv_read_bound(model, prompts, lengths, args.hbm_tb_s),
        },
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "results": {},
    }


def print_header(report: dict, slots: int, hbm_tb_s: float) -> None:
    print(
        f"{report['workload']}: {report['prompts']} prompts of {report['prompt_tokens'][0]}-"
        f"{report['prompt_tokens'][1]} tokens, {report['new_tokens'][0]}-{report['new_tokens'][1]} new tokens "
        f"(mean {report['mean_new_tokens']:.0f}); {slots} sequences fit in memory at once; KV-read bound "
        f"{report['kv_read_bound']['tokens_per_s']:,.0f} tokens/s at {hbm_tb_s} TB/s",
        flush=True,
    )


def run_method(fn, prompts: list, lengths: list[int], device: str, repeats: int) -> dict:
    """measure() of one method on (prompts, lengths), warmed up on 4 short prompts; an out-of-memory
    error is a result too (what the baselines do when a batch does not fit)."""
    try:
        result = measure(
            lambda: fn(prompts, lengths), lambda: fn(prompts[:4], [min(x, 32) for x in lengths[:4]]), device, repeats
        )
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error)[:200]}"}
    result["prompts"] = len(prompts)
    return result


def print_result(name: str, result: dict) -> None:
    if "error" in result:
        print(f"{name:<11} {result['error']}", flush=True)
        return
    peak = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
    print(
        f"{name:<11} {result['tokens_per_s']:>10,.0f} tokens/s  ({result['tokens']} tokens of "
        f"{result['prompts']} prompts in {result['seconds']:.1f} s{peak})",
        flush=True,
    )


def set_ratios_vs_plain(results: dict) -> None:
    plain = results.get("plain", {}).get("tokens_per_s")
    for r in results.values():
        r["ratio_vs_plain"] = r["tokens_per_s"] / plain if plain and "tokens_per_s" in r else None


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # generation's progress lines
    prompts_n, prompt_len, new_tokens, batch_size, dtype = workload(args)
    model = build(args.tiny, args.device, dtype)
    prompts, lengths = make_workload(model, args, prompts_n, prompt_len, new_tokens)
    capacity = max(map(len, prompts)) + max(lengths)
    slots = refill.slot_count(model, capacity, batch_size, refill.free_memory_bytes(model.device))
    reasoning = args.workload == "reasoning"
    base_n = args.baseline_prompts or (slots if reasoning and not args.tiny else prompts_n)
    base = (prompts[:base_n], lengths[:base_n])
    methods = {
        "ours": (lambda p, n: ours(model, p, n, batch_size, args.ours_backend), (prompts, lengths)),
        "plain": (lambda p, n: hf_generate(model, p, n, slots), base),
        "static": (lambda p, n: hf_generate(model, p, n, slots, cache_implementation="static"), base),
        "continuous": (lambda p, n: hf_continuous(model, p, n, args.tiny), base),
    }
    report = describe(model, args, dtype, prompts, lengths, slots)
    print_header(report, slots, args.hbm_tb_s)
    for name in args.methods.split(","):
        fn, (p, n) = methods[name]
        report["results"][name] = run_method(fn, p, n, args.device, args.repeats)
        print_result(name, report["results"][name])
        set_ratios_vs_plain(report["results"])
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    ratios = {n: r["ratio_vs_plain"] for n, r in report["results"].items() if r.get("ratio_vs_plain")}
    if ratios:
        print("ratio vs plain generate: " + ", ".join(f"{n} {ratio:.2f}x" for n, ratio in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
