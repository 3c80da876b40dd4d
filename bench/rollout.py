"""RL rollout throughput: the fake-quantized policy against the BF16 one, same prompts, same batch.

    python bench/rollout.py --out rollout.json               # one GPU: Qwen3-0.6B shape, random weights
    python bench/rollout.py --tiny --out rollout-tiny.json   # CPU smoke test (a 2-layer model)

Both policies decode through `pipeline.generate.generate_ids` (the path GRPO rollouts take in
pipeline.train.rl) with the rollout sampling settings (temperature 1, `--new-tokens`, `--batch-size`
sequences at once): `bf16` is the model as built (bf16 on GPU, fp32 on CPU); `quant` is the same
model after RTN quantization to `--scheme` (QuantLinear modules, the representation the `rl` stage
trains, fp32 latent weights) decoded as GRPO rollouts decode it (`pipeline.quant.apply.decoding_weights`:
q(w) computed once per rollout batch, the model cast to bf16 on GPU); `quant_per_token` is the
quantized model in the bf16 / fp32 of `bf16` with every forward fake-quantizing its latent weights
again (the QuantLinear forward as it is: what rollouts would cost without `decoding_weights`). The
random weights rarely sample a
stop token, so sequences run to the limit; tokens/s counts the tokens actually generated. Each
policy runs once untimed, then `--repeats` times timed; the best run is reported, and the ratio
quant / bf16.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.generate import GenerationSpec, generate_ids  # noqa: E402
from pipeline.quant.apply import quantize_rtn  # noqa: E402
from pipeline.quant.scheme import QuantSpec  # noqa: E402
from pipeline.quant.apply import decoding_weights  # noqa: E402

# the model builder and timer of the generation benchmark, not a copy of them
_spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)


def rollout(model, prompts: list[list[int]], new_tokens: int, batch_size: int, backend: str) -> int:
    spec = GenerationSpec(max_new_tokens=new_tokens, temperature=1.0, batch_size=batch_size, backend=backend)
    rows = generate_ids(model, prompts, spec, [model.config.eos_token_id], model.config.pad_token_id)
    return bench_generate.count_tokens([samples[0] for samples in rows], model.config.eos_token_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_generate.add_workload_arguments(parser)
    parser.add_argument("--scheme", default="w3g128", help="QuantSpec preset of the quantized policy (default w3g128)")
    parser.add_argument("--backend", default="auto", help="GenerationSpec.backend (auto: static on CUDA)")
    args = parser.parse_args()
    prompts_n, prompt_len, new_tokens, batch_size, dtype = bench_generate.workload(args)
    spec = QuantSpec.model_validate(args.scheme)

    bf16 = bench_generate.build(args.tiny, args.device, dtype)
    per_token = copy.deepcopy(bf16)
    quant = copy.deepcopy(bf16).float()  # the rl stage trains fp32 latents
    if args.tiny and spec.weights.group_size and bf16.config.hidden_size % spec.weights.group_size:
        # the tiny model is 64 wide: groups of 32 keep the scheme's shape
        spec = spec.model_copy(update={"weights": spec.weights.model_copy(update={"group_size": 32})})
    quantize_rtn(quant, spec)
    quantize_rtn(per_token, spec)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, bf16.config.pad_token_id, (prompts_n, prompt_len), generator=gen).tolist()

    def frozen():
        with decoding_weights(quant, dtype):
            return rollout(quant, prompts, new_tokens, batch_size, args.backend)

    methods = {
        "bf16": lambda: rollout(bf16, prompts, new_tokens, batch_size, args.backend),
        "quant": frozen,
        "quant_per_token": lambda: rollout(per_token, prompts, new_tokens, batch_size, args.backend),
    }
    results = {}
    for name, fn in methods.items():
        measured = bench_generate.measure(fn, fn, args.device, args.repeats)
        results[name] = {k: measured[k] for k in ("seconds", "tokens", "tokens_per_s", "warmup_s")}
        seconds, tokens, warmup_s = results[name]["seconds"], results[name]["tokens"], results[name]["warmup_s"]
        print(
            f"{name:<15} {tokens / seconds:>10.0f} tokens/s  ({tokens} tokens in {seconds:.2f} s; "
            f"first run {warmup_s:.2f} s)",
            flush=True,
        )
    for r in results.values():
        r["ratio_vs_bf16"] = r["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    ratio = results["quant"]["ratio_vs_bf16"]
    print("ratio vs bf16: " + ", ".join(f"{n} {r['ratio_vs_bf16']:.2f}x" for n, r in results.items()))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    Path(args.out).write_text(
        json.dumps(
            {
                "model": "tiny" if args.tiny else "Qwen3-0.6B shape, random weights",
                "device": device_name,
                "scheme": spec.model_dump(mode="json"),
                "prompts": prompts_n,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "batch_size": batch_size,
                "backend": args.backend,
                "dtype": str(dtype),
                "results": results,
                "quant_over_bf16": ratio,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
