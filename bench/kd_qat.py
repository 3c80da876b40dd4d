"""KD-QAT step time against a plain BF16 KD step: the cost of fake quantization in training.

Both runs go through the real loop (`pipeline.train.loop.train`) with the `kd_qat` stage's loss (forward
KL, chunked), the same teacher, batch, optimizer (AdamW, fused on GPU) and bf16 autocast; the only
difference is the student: plain Linears (the peer) or QuantLinears at the scheme given (ours).
Random weights and tokens: speed does not depend on them.

    python bench/kd_qat.py --out kd.json                    # one H200: Qwen3-0.6B shape, 8 x 2048 tokens
    python bench/kd_qat.py --shape 1.7b --compile --out kd.json
    python bench/kd_qat.py --shape 8b --ours-only --gradient-checkpointing --param-dtype bfloat16 \
        --optimizer adamw_8bit --out kd8b.json              # does an 8B student fit one GPU?
    python bench/kd_qat.py --tiny                           # CPU smoke test, seconds
    python bench/kd_qat.py --shape 1.7b --ours-only --compile --steps 2 --profile prof/   # where a step's time goes
    accelerate launch --num_processes 4 bench/kd_qat.py --shape 1.7b --ours-only --out kd4.json      # DDP
    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 bench/kd_qat.py --shape 8b --ours-only \
        --gradient-checkpointing --param-dtype bfloat16 --optimizer adamw_8bit --out kd8b-fsdp2.json
    accelerate launch --use_deepspeed --zero_stage 3 --offload_optimizer_device cpu --num_processes 2 \
        --mixed_precision bf16 bench/kd_qat.py --shape 8b --ours-only --gradient-checkpointing \
        --out kd8b-zero3.json                               # ZeRO-3, the optimizer in CPU RAM (ZeRO-Offload)

Under `accelerate launch` each process runs `--batch` sequences a step (the global batch grows with the
processes), the teacher is sharded as the kd_qat stage shards it (FSDP2) or partitioned (ZeRO-3: both models are
built whole on the CPU, the teacher partitioned by an engine of its own, the student by `train`), tokens/s is the
global rate, MFU is per GPU and the peak memory is the largest of the processes'. ZeRO-3 keeps fp32 latent weights
and DeepSpeed's AdamW (`--param-dtype` and `--optimizer` stay at their defaults) and runs eager (no `--compile`).

Prints, per run: median step time over the timed steps (after `--warmup` steps), tokens/s, peak
GPU memory, MFU (student forward+backward 6·N·T plus teacher forward 2·N·T FLOPs, attention left
out, over the H100/H200's 989 TFLOP/s dense bf16), the ratio ours / peer, and `pipeline.train.memory`'s
estimate of the step's memory beside the measured peak. `--ours-only` skips the peer (for shapes where
only the levers make the student fit). `--profile DIR` runs torch.profiler over the timed steps and writes, per run,
the operators by their own GPU time (CPU time on a CPU) with their call counts (`<run>_ops.txt`: host syncs show as
cudaStreamSynchronize / cudaMemcpy calls) and a gzipped Chrome trace (`<run>_trace.json.gz`, for Perfetto).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI does
import torch  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from real_shapes import QWEN3_SIZES  # noqa: E402

from pipeline.engine.checkpoint import Checkpointer  # noqa: E402
from pipeline.quant.apply import quantize_rtn  # noqa: E402
from pipeline.quant.scheme import QuantSpec  # noqa: E402
from pipeline.train.loop import (  # noqa: E402
    TrainArgs,
    held_parameters,
    is_zero3,
    make_accelerator,
    partition_frozen,
    shard_frozen,
    train,
    whole_models,
    zero3_settings,
)
from pipeline.train.memory import GIB, kd_step_memory_of  # noqa: E402

SHAPES = {
    **QWEN3_SIZES,
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}
H200_BF16_FLOPS = 989e12


def build(shape: str, seed: int, device: str, dtype: torch.dtype = torch.float32):
    """Random weights, initialised on `device` (an 8B model's init takes minutes on the CPU)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        return Qwen3ForCausalLM(config).to(dtype)


def build_for(acc, shape: str, seed: int, dtype: torch.dtype, scheme: str | None = None):
    """`build`, quantized (RTN) to `scheme` if given, where the run needs it: on the accelerator's device, or under
    ZeRO-3 whole on the CPU, to be partitioned from there (built and quantized on the GPU if there is one, then
    moved: an 8B model's init and RTN take minutes on the CPU)."""
    zero3 = is_zero3(acc)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if zero3 else acc.device
    with whole_models(acc):  # under ZeRO-3 transformers would build it inside deepspeed.zero.Init (partitioned)
        model = build(shape, seed, device, dtype)
    if scheme:
        quantize_rtn(model, QuantSpec.model_validate(scheme))
    return model.to("cpu") if zero3 else model


def parameter_count(acc, model) -> int:
    """The whole model's parameters, also of one ZeRO-3 partitioned (whose parameters' numel() is 0)."""
    if is_zero3(acc):
        return held_parameters(model)[1]
    return sum(p.numel() for p in model.parameters())


def timed_run(student, teacher, examples, args, label: str, acc) -> dict:
    # the stage's loss (its default settings), closed over the teacher, exactly as kd_qat runs it
    from pipeline.train.kd_loss import kd_loss_fn

    steps = args.warmup + args.steps
    train_args = TrainArgs(
        steps=steps,
        batch_size=args.batch * acc.num_processes,
        lr=1e-5,
        warmup_steps=0,
        checkpoint_every=0,
        compile=args.compile,
        gradient_checkpointing=args.gradient_checkpointing,
        param_dtype=args.param_dtype,
        optimizer=args.optimizer,
    )
    estimate = estimated_gib(student, teacher, train_args, args, acc)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, profiled(args, label, acc) as on_step:
        train(
            student,
            examples,
            kd_loss_fn(teacher, chunk_size=args.chunk),
            train_args,
            out_dir=tmp,
            checkpointer=Checkpointer(Path(tmp) / "ckpt"),
            seed=0,
            pad_id=0,
            log=logging.getLogger("bench"),
            accelerator=acc,
            desc=label,
            on_step=on_step,
        )
        # the main process writes the metrics (global tokens a step), the others nothing
        rows = (
            [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")][args.warmup :]
            if acc.is_main_process
            else []
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    peak = float(acc.gather(torch.tensor([peak], device=acc.device)).max())
    if not acc.is_main_process:
        return {}
    step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for r in rows)
    tokens = rows[0]["tokens"]
    n_student, n_teacher = parameter_count(acc, student), parameter_count(acc, teacher)
    result = {
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "estimate_gib": estimate,
        "peak_gib": peak if torch.cuda.is_available() else None,
        "mfu": (6 * n_student + 2 * n_teacher) * tokens / step_s / H200_BF16_FLOPS / acc.num_processes,
    }
    print(
        f"{label:>6}: {step_s * 1e3:8.1f} ms/step  {result['tokens_per_s']:10.0f} tokens/s  "
        f"peak {result['peak_gib'] or 0:.1f} GiB (estimate {estimate:.1f})  MFU {100 * result['mfu']:.1f}%",
        flush=True,
    )
    return result


@contextlib.contextmanager
def profiled(args, label: str, acc):
    """With `--profile DIR`: torch.profiler over the timed steps alone, started and stopped by the loop's `on_step`
    callback (yielded; it runs at the end of each step), then the main process writes the operator table and the
    trace. Without it, no callback."""
    if not args.profile:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])

    def on_step(step: int, model) -> dict:
        if step == args.warmup:
            prof.start()
        elif step == args.warmup + args.steps:
            prof.stop()
        return {}

    yield on_step
    if acc.is_main_process:
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        (out / f"{label}_ops.txt").write_text(prof.key_averages().table(sort_by=by, row_limit=60) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
            with open(Path(tmp) / "trace.json", "rb") as raw, gzip.open(out / f"{label}_trace.json.gz", "wb") as packed:
                shutil.copyfileobj(raw, packed)


def estimated_gib(student, teacher, train_args: TrainArgs, args, acc) -> float:
    """The step's estimate, as the kd_qat stage makes it (`stages.kd_qat._fitting`): the student still whole."""
    shared = is_zero3(acc) or acc.distributed_type == DistributedType.FSDP
    memory = kd_step_memory_of(
        student,
        train_args,
        teacher_total=parameter_count(acc, teacher),
        teacher_bytes=teacher.dtype.itemsize,
        tokens=args.batch * args.seqlen,
        chunk_size=args.chunk,
        processes=acc.num_processes if shared else 1,
        zero3=zero3_settings(acc, student.config.hidden_size),
    )
    return memory.total / GIB


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--scheme", default="w3g128", help="QuantSpec preset of the student (ours)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048, help="tokens per chunk of logits in the KD loss")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (both runs)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    parser.add_argument("--ours-only", action="store_true", help="skip the plain BF16 KD peer")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--profile", metavar="DIR", help="profile the timed steps: operator table and trace here")
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.batch, args.seqlen, args.chunk, args.steps, args.warmup = "tiny", 2, 64, 64, 3, 1
    return args


def random_examples(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    """4 batches of random sequences, the first eighth of each a prompt (no loss)."""
    vocab = SHAPES[args.shape]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randint(1, vocab, (args.seqlen,), generator=generator).tolist(), args.seqlen // 8)
        for _ in range(args.batch * 4)
    ]


def main() -> None:
    args = parse_args()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        from accelerate import PartialState

        PartialState(cpu=True)  # accelerate connects CPU ranks (gloo) only when asked: the CPU smoke test
    acc = make_accelerator()
    device = acc.device
    if acc.num_processes > 1 and not args.ours_only:
        raise SystemExit("several processes: time --ours-only (one prepared model per run)")
    if is_zero3(acc) and args.compile:
        raise SystemExit("--compile: not under ZeRO-3 (DeepSpeed's hooks on every submodule break the graphs)")
    examples = random_examples(args)
    teacher = build_for(acc, args.shape, 1, dtype).eval().requires_grad_(False)
    teacher = partition_frozen(acc, shard_frozen(acc, teacher))
    # the student's latent weights in the dtype the loop would give them (an fp32 8B copy would not fit beside)
    student_dtype = torch.bfloat16 if args.param_dtype == "bfloat16" else torch.float32

    results = {
        "shape": args.shape,
        "scheme": args.scheme,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "compile": args.compile,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "processes": acc.num_processes,
        "distributed": str(acc.distributed_type),
    }
    results.update(
        param_dtype=args.param_dtype, optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing
    )
    if not args.ours_only:
        results["plain"] = timed_run(
            build_for(acc, args.shape, 0, student_dtype), teacher, examples, args, "plain", acc
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    student = build_for(acc, args.shape, 0, student_dtype, args.scheme)
    results["ours"] = timed_run(student, teacher, examples, args, "ours", acc)
    if not args.ours_only:
        results["ratio"] = results["ours"]["step_s"] / results["plain"]["step_s"]
        print(f"KD-QAT ({args.scheme}) step time / plain BF16 KD step: {results['ratio']:.3f}")
    if args.out and acc.is_main_process:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    # every rank leaves the process group before the interpreter's teardown, where gloo's threads may abort the
    # process (SIGABRT after a finished run: pytorch/pytorch#190489)
    acc.end_training()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")
