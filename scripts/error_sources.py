"""Where W4A4KV4 loses a model's accuracy: each quantizer alone and together, teacher-forced, on CPU.

    python scripts/error_sources.py artifacts/demo-gpu/teacher/model --recipe recipes/demo-gpu-w4a4kv4.yaml

For each variant (QuaRot rotations, RTN weights) it prints, over the reference solutions of the first
`--problems` test problems: the share of solution tokens whose argmax differs from the full-precision
model's ("flips"), the same share among tokens the full-precision model is sure of (p > 0.99, where a flip
is an error a greedy decode makes), and the mean KL(full precision ‖ quantized) per token. Seconds per
variant on a small model, no generation: a quick way to tell which quantizer a setting should target
before spending GPU time on QAT. Accuracy itself needs generation (`reasoning-qat eval`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

W4 = {"num_bits": 4, "group_size": None, "symmetric": True}


def variants(clip: float) -> list[tuple[str, dict, dict]]:
    """(name, quant section, options): options `only` = substrings of the Linears whose inputs are
    4-bit (the others stay BF16), `kv` = "keys" or "values" to quantize one side of the cache."""
    a4 = {"num_bits": 4, "symmetric": False, "clip_ratio": 1.0}
    a4_clip = {**a4, "clip_ratio": clip}
    kv4 = {"num_bits": 4, "symmetric": False, "group_size": None}
    rows = [
        ("W4", {"weights": W4}, {}),
        ("W4 + keys 4-bit", {"weights": W4, "kv_cache": kv4}, {"kv": "keys"}),
        ("W4 + values 4-bit", {"weights": W4, "kv_cache": kv4}, {"kv": "values"}),
        ("W4 + KV4", {"weights": W4, "kv_cache": kv4}, {}),
        ("W4 + KV4, clip 0.95", {"weights": W4, "kv_cache": {**kv4, "clip_ratio": 0.95}}, {}),
        ("W4 + KV4, symmetric", {"weights": W4, "kv_cache": {**kv4, "symmetric": True}}, {}),
    ]
    for name, only in (
        ("q/k/v input", ["q_proj", "k_proj", "v_proj"]),
        ("o_proj input", ["o_proj"]),
        ("gate/up input", ["gate_proj", "up_proj"]),
        ("down_proj input", ["down_proj"]),
    ):
        rows.append((f"W4 + A4 on the {name}", {"weights": W4, "activations": a4}, {"only": only}))
        rows.append((f"W4 + A4 on the {name}, clip {clip}", {"weights": W4, "activations": a4_clip}, {"only": only}))
    rows += [
        ("W4A4", {"weights": W4, "activations": a4}, {}),
        (f"W4A4, clip {clip}", {"weights": W4, "activations": a4_clip}, {}),
        ("W4A4KV4", {"weights": W4, "activations": a4, "kv_cache": kv4}, {}),
        (f"W4A4KV4, activation clip {clip}", {"weights": W4, "activations": a4_clip, "kv_cache": kv4}, {}),
    ]
    return rows


def measure(
    model, batch, keep, ref_logp: torch.Tensor, sure: torch.Tensor, kv_side: str | None
) -> tuple[float, float, float]:
    from pipeline.quant import kv

    quantize = kv.fake_quantize_kv
    if kv_side is not None:
        # the attention function quantizes keys, then values, once per layer call: by parity, one side only
        calls = iter(range(10**9))
        kv.fake_quantize_kv = lambda x, spec: quantize(x, spec) if (next(calls) % 2 == 0) == (kv_side == "keys") else x
    try:
        with torch.no_grad():
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                .logits[:, :-1][keep]
                .float()
            )
    finally:
        kv.fake_quantize_kv = quantize
    flips = logits.argmax(-1) != ref_logp.argmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), ref_logp, log_target=True, reduction="batchmean")
    return float(flips.float().mean()), float(flips[sure].float().mean()), float(kl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the full-precision model (a stage or model directory)")
    parser.add_argument("--recipe", type=Path, help="take the testbed's settings from this recipe's data section")
    parser.add_argument("--problems", type=int, default=48, help="test problems (reference solutions) to score")
    parser.add_argument("--clip", type=float, default=0.9, help="the activation clip ratio to compare with 1")
    parser.add_argument("--seed", type=int, default=0, help="QuaRot's random Hadamard seed")
    args = parser.parse_args()
    if not args.model.is_dir():
        parser.error(f"{args.model}: no such directory")
    if args.recipe is not None and not args.recipe.is_file():
        parser.error(f"{args.recipe}: no such file")
    if not 0 < args.clip <= 1 or args.problems < 1:
        parser.error("--clip must be in (0, 1] and --problems at least 1")

    from pipeline.data.benchmarks import load_benchmark
    from pipeline.data.chat import chat_example
    from pipeline.data.spec import DataSpec
    from pipeline.models import load_model, load_tokenizer
    from pipeline.quant.methods import quarot
    from pipeline.quant.apply import calibrate, prepare, quant_linears
    from pipeline.quant.scheme import QuantSpec
    from pipeline.train.loop import collate

    data = DataSpec()
    if args.recipe is not None:
        import yaml
        from pydantic import ValidationError

        try:  # only the data section: the recipe's model path need not exist here
            data = DataSpec.model_validate((yaml.safe_load(args.recipe.read_text()) or {}).get("data", {}))
        except (yaml.YAMLError, ValidationError, AttributeError) as e:
            parser.error(f"{args.recipe}: data section: {str(e).splitlines()[0]}")
    tokenizer = load_tokenizer(args.model)
    reference_model = load_model(args.model, dtype="float32").eval()
    problems = load_benchmark("testbed", limit=args.problems, testbed=data.testbed)
    batch = collate([chat_example(tokenizer, p.question, p.solution) for p in problems], tokenizer.pad_token_id)
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        reference = (
            reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            .logits[:, :-1][keep]
            .float()
        )
    ref_logp = reference.log_softmax(-1)
    sure = ref_logp.max(-1).values > torch.log(torch.tensor(0.99))  # tokens the model is sure of
    print(
        f"{int(keep.sum())} solution tokens of {len(problems)} problems; QuaRot rotations, RTN weights, seed "
        f"{args.seed}"
    )
    print(f"{'variant':44s} {'flips':>8s} {'sure flips':>11s} {'KL':>10s}")
    for name, section, options in variants(args.clip):
        model = copy.deepcopy(reference_model)
        prepare(model, QuantSpec.model_validate(section))
        quarot.rotate(model, seed=args.seed)
        calibrate(model)
        for linear_name, linear in quant_linears(model):
            if "only" in options and not any(part in linear_name for part in options["only"]):
                linear.activations = None
        flips, sure_flips, kl = measure(model, batch, keep, ref_logp, sure, options.get("kv"))
        print(f"{name:44s} {100 * flips:7.3f}% {100 * sure_flips:10.3f}% {kl:10.3e}", flush=True)


if __name__ == "__main__":
    main()
