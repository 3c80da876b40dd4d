"""The one training loop, shared by `sft` (teacher bootstrap, SFT-QAT baseline) and `kd_qat`.

    from pipeline.train import TrainArgs, train, causal_lm_loss
    result = train(model, examples, causal_lm_loss, args, out_dir=ctx.out_dir,
                   checkpointer=ctx.checkpointer, seed=recipe.seed, pad_id=tokenizer.pad_token_id,
                   log=ctx.log)

`examples` are (token ids, completion start) pairs as `pipeline.data.chat_example` makes them; a batch
is {"input_ids", "attention_mask", "labels"} padded on the right to its longest sequence, labels
aligned with input_ids (the Hugging Face convention: the model shifts them) and -100 on the prompt
and the padding, so loss falls on completion tokens only. The loss is pluggable,
`loss_fn(model, batch) -> (loss, metrics)`, loss being the mean over the batch's label tokens; KD
closes over a frozen teacher.

What the loop does: AdamW (fused on GPU) with linear warmup and cosine decay (transformers'
schedule), gradient clipping, gradient accumulation, optional gradient checkpointing and
`torch.compile` of the decoder layers, bf16 autocast on GPU, one metrics row per step in
`<out_dir>/metrics.jsonl`, a progress bar. It runs on accelerate's `Accelerator`: one process on CPU,
or `accelerate launch` with several processes (DDP or DeepSpeed), `batch_size` being global.

Exact resume: the batch at step s is a pure function of (seed, s) (a fresh permutation of the
examples per epoch), so the data position is the step. A checkpoint (every `checkpoint_every` steps,
and on SIGTERM/SIGINT, after which StageInterrupted is raised) holds model, optimizer, scheduler,
RNG states, the metrics rows so far and the step; a resumed run gives bit-identical losses and
weights on CPU. A non-finite loss stops the run before the optimizer step, leaving the last good
checkpoint as it was.

Departures from common practice: the micro-batches of one step, on every rank, are weighted by their
share of the global batch's label tokens (not averaged per micro-batch or per rank), so the update
does not depend on how a step is split across processes, accumulation steps or padding: N processes
train the model one process trains; only rank 0's RNG state is saved (nothing in the loop draws
random numbers).
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator, DistributedType
from pydantic import BaseModel, ConfigDict, Field
from transformers import get_cosine_schedule_with_warmup

from pipeline import signals
from pipeline.checkpoint import Checkpointer, StageInterrupted
from pipeline.optim import OptimizerName, ParamDtype, make_optimizer
from pipeline.progress import progress
from pipeline.stage_api import ADDED_KEY, OPERATIONAL, result_config

Example = tuple[Sequence[int], int]
"""(token ids of prompt + completion, index where the completion starts)."""
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
OnStep = Callable[[int, torch.nn.Module], dict[str, float]]


class TrainArgs(BaseModel):
    """Optimisation settings shared by the training stages (their Config inherits these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(500, gt=0)
    """Optimizer steps."""
    batch_size: int = Field(32, gt=0)
    """Sequences per optimizer step, over all processes and accumulation micro-steps."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step: more saves memory at the same batch_size, costs speed."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warmup from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay, on matrices only (not norms)."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; None: no clipping."""
    checkpoint_every: int = Field(100, ge=0, json_schema_extra=OPERATIONAL)
    """Save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGINT)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each decoder layer (GPU: faster steps after a compile pause; CPU: rarely worth it)."""
    param_dtype: ParamDtype = Field("float32", json_schema_extra=ADDED_KEY)
    """Latent weights and gradients: float32, or bfloat16 (half the memory; updates stochastically rounded)."""
    optimizer: OptimizerName = Field("adamw", json_schema_extra=ADDED_KEY)
    """adamw (fp32 moments, 8 bytes a parameter) or adamw_8bit (block-wise 8-bit moments, 2 bytes)."""


def check_train_args(args: TrainArgs) -> list[tuple[str, str]]:
    """What the schema alone cannot say about TrainArgs, as (key, message) pairs for a stage's `check`."""
    errors = []
    if args.batch_size % args.grad_accum:
        errors.append(("batch_size", f"must be a multiple of grad_accum ({args.grad_accum})"))
    if args.warmup_steps > args.steps:
        errors.append(("warmup_steps", f"must be <= steps ({args.steps})"))
    return errors


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


def make_accelerator() -> Accelerator:
    """bf16 autocast where the GPU supports it, full precision otherwise (CPU)."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(mixed_precision="bf16" if bf16 else "no")


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the completion tokens (SFT)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    return out.loss, {}


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Indices of the examples in the global batch of `step`: positions step*B .. step*B+B-1 of an
    endless stream that visits all `n` examples once per epoch in a seeded random order."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(_epoch_order(seed, p // n, n)[p % n]) for p in positions]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, start) in enumerate(examples):
        ids = torch.as_tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, start : len(ids)] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _label_tokens(batch: dict[str, torch.Tensor]) -> int:
    # the first position has no prediction: the model shifts labels left by one
    return int((batch["labels"][:, 1:] != -100).sum())


def _sum_over_ranks(acc: Accelerator, values: Sequence[float]) -> list[float]:
    """`values` summed element-wise over all processes, in one all-reduce (float64: counts stay exact)."""
    return acc.reduce(torch.tensor(values, dtype=torch.float64, device=acc.device), "sum").tolist()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _configure_deepspeed(acc: Accelerator, args: TrainArgs, micro: int) -> None:
    """DeepSpeed takes the batch shape and the gradient clipping from its config, not from the loop (accelerate
    would otherwise ask for a dataloader, and clip at 1.0): set them from `args`. A value a config file
    states explicitly must agree."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": args.grad_accum,
              "train_batch_size": args.batch_size, "gradient_clipping": args.grad_clip or 0.0}
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"the DeepSpeed config sets {key} to {config[key]}; this stage needs {value}")
        config[key] = value
    acc.gradient_accumulation_steps = args.grad_accum


@contextmanager
def whole_models(accelerator: Accelerator):
    """Models built in here have all their weights on every rank, also under ZeRO-3, where transformers would
    otherwise build them inside deepspeed.zero.Init (empty, partitioned parameters): the quantized student's
    meta-device load cannot be partitioned that way, and the teacher, which never enters the DeepSpeed
    engine, would be left with no weights. The engine partitions the student itself when it is prepared."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)


def gathered(acc: Accelerator, model: torch.nn.Module):
    """Context in which the (unwrapped) model's parameters are whole, to save them: under ZeRO-3 each rank holds
    a shard and the rest are empty tensors, so every rank must enter (it is a collective); elsewhere a no-op."""
    if acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return nullcontext()


def train(model: torch.nn.Module, examples: Sequence[Example], loss_fn: LossFn, args: TrainArgs, *,
          out_dir: str | Path, checkpointer: Checkpointer, seed: int, pad_id: int,
          log: logging.Logger | None = None, accelerator: Accelerator | None = None,
          desc: str = "train", on_step: OnStep | None = None) -> dict[str, float]:
    """Train `model` in place for `args.steps` steps (resuming from `checkpointer` if it holds a
    checkpoint of the same run); returns {"final_loss", "steps", "train_seconds", "tokens_per_s"}.

    `on_step(step, model)`, when given, runs on every process after each optimizer step (with the
    unwrapped model, in train mode); the metrics it returns join that step's row (held-out evaluation).

    Raises StageInterrupted after checkpointing on SIGTERM/SIGINT, NonFiniteLoss on a NaN/inf loss,
    ValueError when batch_size does not split over processes and grad_accum.
    """
    log = log or logging.getLogger(__name__)
    acc = accelerator or make_accelerator()
    micro = args.batch_size // (acc.num_processes * args.grad_accum)
    if micro * acc.num_processes * args.grad_accum != args.batch_size:
        raise ValueError(f"batch_size {args.batch_size} must be a multiple of processes ({acc.num_processes}) "
                         f"x grad_accum ({args.grad_accum})")
    if not examples:
        raise ValueError("no training examples")
    if acc.distributed_type == DistributedType.DEEPSPEED and args.checkpoint_every:
        # ZeRO shards the optimizer state over ranks; our checkpoints save rank 0's alone, so a
        # resume would be silently wrong: refuse rather than write such a checkpoint
        raise ValueError("checkpoint_every must be 0 under DeepSpeed: resumable checkpoints of "
                         "ZeRO-sharded optimizer state are not supported yet")
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and (args.param_dtype, args.optimizer) != ("float32", "adamw"):
        # DeepSpeed keeps its own fp32 master weights and optimizer state: these levers are the one-GPU path's
        raise ValueError("param_dtype and optimizer must stay float32 / adamw under DeepSpeed")
    if deepspeed:
        _configure_deepspeed(acc, args, micro)
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    model.to(acc.device, torch.bfloat16 if args.param_dtype == "bfloat16" else None)
    model.train()
    raw_optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, acc.device)
    # the scheduler stays outside accelerate: prepared, it would step once per process
    scheduler = get_cosine_schedule_with_warmup(raw_optimizer, args.warmup_steps, args.steps)
    model, optimizer = acc.prepare(model, raw_optimizer)

    # a checkpoint is resumed only if it was made by this same run
    signature = {"args": result_config(type(args), args.model_dump(mode="json")), "seed": seed, "examples": len(examples),
                 "processes": acc.num_processes}
    rows: list[dict] = []
    start = 0
    found = checkpointer.resume(signature, log)
    if found is not None:
        start, state = found
        acc.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        rows = state["metrics"]
        log.info("resuming from the checkpoint at step %d", start)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(metrics_path, "w") as f:  # rows after the checkpoint belong to a lost future
            f.writelines(json.dumps(r) + "\n" for r in rows)

    checkpointer.every = args.checkpoint_every
    started = time.perf_counter()
    tokens_total = 0
    with signals.stop_at_safe_points():  # a first SIGINT/SIGTERM is seen after the step: checkpoint, then stop
        with progress(desc, total=args.steps) as bar:
            bar.advance(start)
            for step in range(start, args.steps):
                t0 = time.perf_counter()
                indices = batch_indices(seed, step, len(examples), args.batch_size)
                mine = indices[acc.process_index * micro * args.grad_accum:][: micro * args.grad_accum]
                batches = [collate([examples[i] for i in mine[j * micro:(j + 1) * micro]], pad_id)
                           for j in range(args.grad_accum)]
                weights = [_label_tokens(b) for b in batches]
                # the step's loss is the mean over the label tokens of the global batch, all ranks'
                seen = sum(int(b["attention_mask"].sum()) for b in batches)
                total, tokens = map(int, _sum_over_ranks(acc, [sum(weights), seen]))
                loss_sum, extra = 0.0, {}
                for j, batch in enumerate(batches):
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    # gradients are all-reduced once per step, on the last micro-step (DeepSpeed: its engine
                    # also steps there, inside acc.backward)
                    last_micro = j == len(batches) - 1
                    if deepspeed:
                        acc.sync_gradients = last_micro
                    with nullcontext() if last_micro else acc.no_sync(model), acc.autocast():
                        loss, metrics = loss_fn(model, batch)
                    value = loss.item()
                    if not torch.isfinite(loss):
                        last = checkpointer.latest_step()
                        kept = f"the checkpoint of step {last} is kept" if last is not None else "no checkpoint was saved"
                        raise NonFiniteLoss(f"step {step + 1}: loss is {value}; stopped before the update, {kept}")
                    # x num_processes: DDP (and DeepSpeed) average the gradients over ranks
                    # (DeepSpeed would also divide by grad_accum: the weights already do)
                    acc.backward(loss * (weights[j] * acc.num_processes / total),
                                 **({"scale_wrt_gas": False} if deepspeed else {}))
                    loss_sum += value * weights[j] / total
                    for k, v in metrics.items():
                        extra[k] = extra.get(k, 0.0) + v * weights[j] / total
                loss_sum, *parts = _sum_over_ranks(acc, [loss_sum, *extra.values()])  # each rank held its share
                extra = dict(zip(extra, parts))
                grad_norm = acc.clip_grad_norm_(model.parameters(), args.grad_clip) if args.grad_clip else None
                lr = float(scheduler.get_last_lr()[0])  # a tensor for torchao optimizers
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                done = step + 1
                tokens_total += tokens
                row = {"step": done, "loss": loss_sum, "lr": lr, "tokens": tokens,
                       "tokens_per_s": tokens / (time.perf_counter() - t0), **extra}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                if on_step is not None:
                    row.update(on_step(done, acc.unwrap_model(model)))
                    model.train()
                rows.append(row)
                if acc.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.advance(1, loss=f"{loss_sum:.4f}")
                if checkpointer.due(done):
                    if acc.is_main_process:
                        checkpointer.save(done, {
                            "model": acc.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": rng_state(), "metrics": rows,
                            "step": done, "signature": signature})
                    acc.wait_for_everyone()
                if checkpointer.stop_requested:
                    raise StageInterrupted(f"{desc}: stopped at step {done} on a signal; checkpoint saved")
    seconds = time.perf_counter() - started
    acc.wait_for_everyone()
    tail = [r["loss"] for r in rows[-10:]]
    return {"final_loss": sum(tail) / len(tail), "steps": args.steps, "train_seconds": seconds,
            "tokens_per_s": tokens_total / seconds if seconds > 0 else 0.0}
