"""Generation throughput: plain `generate` vs static cache + compile vs continuous batching vs ours.

    python bench/generate.py --out gen.json                 # one GPU: Qwen3-0.6B shape, random weights
    python bench/generate.py --tiny --out gen-tiny.json     # CPU smoke test (a 2-layer model)

The model is built here (Qwen3Config with Qwen3-0.6B's sizes, random bf16 weights; no download), the
prompts are random token ids of one length, and every method decodes the same prompts greedily for
`--new-tokens` tokens. Random weights almost never emit a stop token, so every sequence runs to
the limit; tokens/s counts the tokens actually generated. Each method runs once untimed (compile,
CUDA-graph capture, cache sizing) and then `--repeats` times timed; the best run is reported, with
its ratio against plain `generate`.

Methods (all transformers; ours is `pipeline.generate.generate_ids`, the path eval/traces/RL use):
  plain       model.generate, dynamic cache, all prompts in one left-padded batch
  static      model.generate, cache_implementation="static" (transformers compiles it on CUDA)
  continuous  model.generate_batch (continuous batching, paged cache), default config
  continuous_graphs / continuous_compiled   the same with CUDA graphs / graphs + compile level 1
  ours        pipeline.generate with GenerationSpec(backend=--ours-backend, batch_size=--batch-size)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.generate import GenerationSpec, generate_ids  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
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


def greedy_config(model, new_tokens: int, **extra) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                            pad_token_id=model.config.pad_token_id, **extra)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, **extra) -> int:
    input_ids = torch.tensor(prompts, device=model.device)  # one length: no padding needed
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         generation_config=greedy_config(model, new_tokens, **extra))
    return count_tokens(out[:, input_ids.shape[1]:].tolist(), model.config.eos_token_id)


def hf_continuous(model, prompts: list[list[int]], new_tokens: int, **cb_config) -> int:
    from transformers import ContinuousBatchingConfig

    results = model.generate_batch(inputs=prompts, generation_config=greedy_config(model, new_tokens),
                                   continuous_batching_config=ContinuousBatchingConfig(**cb_config))
    if len(results) != len(prompts) or any(r.error for r in results.values()):
        raise RuntimeError("continuous batching lost or failed requests")
    return sum(len(r.generated_tokens) for r in results.values())


def ours(model, prompts: list[list[int]], new_tokens: int, batch_size: int, backend: str) -> int:
    spec = GenerationSpec(max_new_tokens=new_tokens, batch_size=batch_size, backend=backend)
    rows = generate_ids(model, prompts, spec, [model.config.eos_token_id], model.config.pad_token_id)
    return sum(len(samples[0]) for samples in rows)


def count_tokens(rows: list[list[int]], eos: int) -> int:
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def timed(fn, device: str, repeats: int) -> tuple[float, int, float]:
    """(best seconds, tokens generated in that run, warm-up seconds)."""
    def once() -> tuple[float, int]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokens

    warmup_s, _ = once()
    runs = [once() for _ in range(repeats)]
    seconds, tokens = min(runs)
    return seconds, tokens, warmup_s


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding workload shared by this bench and bench/rollout.py."""
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and a small workload (CPU smoke test)")
    parser.add_argument("--out", required=True, help="write results here as JSON")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (default 64; tiny 8)")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 256; tiny 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 512; tiny 32)")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--methods", default="plain,static,continuous,ours",
                        help="from plain, static, continuous, continuous_graphs, continuous_compiled, ours")
    parser.add_argument("--ours-backend", default="auto", help="ours: GenerationSpec.backend")
    args = parser.parse_args()
    prompts_n, prompt_len, new_tokens, batch_size, dtype = workload(args)

    model = build(args.tiny, args.device, dtype)
    gen = torch.Generator().manual_seed(0)
    # ids below the special tokens, so no prompt holds a stop token
    prompts = torch.randint(0, model.config.pad_token_id, (prompts_n, prompt_len), generator=gen).tolist()
    methods = {
        "plain": lambda: hf_generate(model, prompts, new_tokens),
        "static": lambda: hf_generate(model, prompts, new_tokens, cache_implementation="static"),
        "continuous": lambda: hf_continuous(model, prompts, new_tokens),
        "continuous_graphs": lambda: hf_continuous(model, prompts, new_tokens, use_cuda_graph=True),
        "continuous_compiled": lambda: hf_continuous(model, prompts, new_tokens, use_cuda_graph=True,
                                                     default_compile_level=1),
        "ours": lambda: ours(model, prompts, new_tokens, batch_size, args.ours_backend),
    }
    results = {}
    for name in args.methods.split(","):
        seconds, tokens, warmup_s = timed(methods[name], args.device, args.repeats)
        results[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "warmup_s": warmup_s}
        print(f"{name:<11} {tokens / seconds:>10.0f} tokens/s  ({tokens} tokens in {seconds:.2f} s; "
              f"first run {warmup_s:.2f} s)", flush=True)
    base = results.get("plain", {}).get("tokens_per_s")
    if base:
        for r in results.values():
            r["ratio_vs_plain"] = r["tokens_per_s"] / base
        print("ratio vs plain generate: " + ", ".join(f"{n} {r['ratio_vs_plain']:.2f}x" for n, r in results.items()))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    Path(args.out).write_text(json.dumps({
        "model": "tiny" if args.tiny else "Qwen3-0.6B shape, random weights", "device": device_name,
        "dtype": str(dtype), "prompts": prompts_n, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "batch_size_ours": batch_size, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
