"""The one training loop, shared by `sft` (teacher bootstrap, SFT-QAT baseline) and `kd_qat`.

    from pipeline.train.loop import TrainArgs, train, causal_lm_loss
    result = train(model, examples, causal_lm_loss, args, out_dir=ctx.out_dir,
                   checkpointer=ctx.checkpointer, seed=recipe.seed, pad_id=tokenizer.pad_token_id,
                   log=ctx.log)

`examples` are (token ids, completion start) pairs as `pipeline.data.chat.chat_example` makes them; a batch
is {"input_ids", "attention_mask", "labels"} padded on the right to its longest sequence, labels
aligned with input_ids (the Hugging Face convention: the model shifts them) and -100 on the prompt
and the padding, so loss falls on completion tokens only. The loss is pluggable,
`loss_fn(model, batch) -> (loss, metrics)`, loss being the mean over the batch's label tokens; KD
closes over a frozen teacher.

What the loop does: AdamW (fused on GPU) with linear warmup and cosine decay (transformers'
schedule), gradient clipping, gradient accumulation, optional gradient checkpointing and
`torch.compile` of the decoder layers, bf16 autocast on GPU, one metrics row per step in
`<out_dir>/metrics.jsonl`, a progress bar. It runs on accelerate's `Accelerator`: one process on CPU,
or `accelerate launch` with several processes (DDP, DeepSpeed, or FSDP2: `--use_fsdp --fsdp_version 2`),
`batch_size` being global. Under FSDP2 every decoder layer is its own `fully_shard` unit (accelerate's
transformer-based wrap on the model's `_no_split_modules`, also when the launch names no wrap policy), so a
QuantLinear's forward sees its whole weight (all-gathered with its layer), never a shard. Under ZeRO-3 the model,
built whole on the CPU, is partitioned over the processes before DeepSpeed's engine gets it, one parameter on the
device at a time, so that no GPU ever holds it whole (the engine would move it there whole first); DeepSpeed's
hooks gather each submodule's parameters for its forward. The memory levers (`param_dtype: bfloat16`,
`optimizer: adamw_8bit`: pipeline.train.optim) work on one process and under FSDP2, not under DeepSpeed, which
keeps its own fp32 master weights and optimizer state.

Exact resume: the batch at step s is a pure function of (seed, s) (a fresh permutation of the
examples per epoch), so the data position is the step. A checkpoint (every `checkpoint_every` steps,
and on SIGTERM/SIGINT, after which StageInterrupted is raised) holds model, optimizer, scheduler,
every process's RNG state, the metrics rows so far and the step (pipeline.engine.checkpoint: atomic, verified
on resume, the last good one kept); under DeepSpeed ZeRO-2/3 each process saves its own partition of
the optimizer (fp32 master weights and AdamW state); under FSDP2 each process saves its shards
(`DTensor.to_local()`) of every parameter and of the AdamW state (8-bit moments as their codes and scales). A
resumed run gives bit-identical losses and weights on CPU, with one process or several (stochastic rounding too:
each process's random state is restored). A non-finite loss stops the run before the optimizer
step, leaving the last good checkpoint as it was.

Several processes stay in step: a NaN loss or an exception on one (in the data, the forward, the loss,
`on_step`, a checkpoint) reaches every other through a small all-reduce before the next collective,
and all raise RankFailed with its message; a signal on any process stops all at the same step. (An
exception inside a forward that is itself collective, ZeRO-3's parameter gathers, can still leave the
others waiting until the process group's timeout.)

Departures from common practice: the micro-batches of one step, on every rank, are weighted by their
share of the global batch's label tokens (not averaged per micro-batch or per rank), so the update
does not depend on how a step is split across processes, accumulation steps or padding: N processes
train the model one process trains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator, DistributedType
from pydantic import BaseModel, ConfigDict, Field
from transformers import get_cosine_schedule_with_warmup

from pipeline.engine import signals
from pipeline.engine.checkpoint import Checkpointer, Ranks, StageInterrupted, on_every_rank
from pipeline.engine.progress import progress
from pipeline.engine.stage_api import ADDED_KEY, result_config
from pipeline.train.args import (
    BatchSize,
    CheckpointEvery,
    GradAccum,
    GradClipOrNone,
    LearningRate,
    ReportTo,
    Steps,
    WarmupSteps,
    WeightDecay,
    missing_trackers,
)
from pipeline.train.memory import Zero3
from pipeline.train.optim import OptimizerName, ParamDtype, make_optimizer

Example = tuple[Sequence[int], int]
"""(token ids of prompt + completion, index where the completion starts)."""
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
OnStep = Callable[[int, torch.nn.Module], dict[str, float]]


class TrainArgs(BaseModel):
    """Optimisation settings shared by the training stages (their Config inherits these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Steps = 500
    """Optimizer steps."""
    batch_size: BatchSize = 32
    """Sequences per optimizer step, over all processes and accumulation micro-steps."""
    grad_accum: GradAccum = 1
    """Micro-steps per optimizer step: more saves memory at the same batch_size, costs speed."""
    lr: LearningRate = 1e-3
    """Peak learning rate (AdamW), reached after warmup, then cosine decay to 0."""
    warmup_steps: WarmupSteps = 50
    """Linear warmup from 0 to lr."""
    weight_decay: WeightDecay = 0.1
    """AdamW weight decay, on matrices only (not norms)."""
    grad_clip: GradClipOrNone = 1.0
    """Clip the global gradient norm to this; None: no clipping."""
    checkpoint_every: CheckpointEvery = 100
    """Save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGINT)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each decoder layer (GPU: faster steps after a compile pause; CPU: rarely worth it)."""
    param_dtype: ParamDtype = Field("float32", json_schema_extra=ADDED_KEY)
    """Latent weights and gradients: float32, or bfloat16 (half the memory; updates stochastically rounded)."""
    optimizer: OptimizerName = Field("adamw", json_schema_extra=ADDED_KEY)
    """adamw (fp32 moments, 8 bytes a parameter) or adamw_8bit (block-wise 8-bit moments, 2 bytes)."""
    report_to: ReportTo = ()
    """Also log each step's metrics row (loss, lr, grad_norm, held-out accuracy, ...) to these trackers, through
    accelerate; tensorboard writes under `<stage>/tensorboard`. Needs `pip install 'reasoning-qat[trackers]'`."""


def check_train_args(args: TrainArgs) -> list[tuple[str, str]]:
    """What the schema alone cannot say about TrainArgs, as (key, message) pairs for a stage's `check`."""
    errors = []
    if args.batch_size % args.grad_accum:
        errors.append(("batch_size", f"must be a multiple of grad_accum ({args.grad_accum})"))
    if args.warmup_steps > args.steps:
        errors.append(("warmup_steps", f"must be <= steps ({args.steps})"))
    return errors + missing_trackers(args.report_to)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


def make_accelerator(report_to: Sequence[str] = (), out_dir: str | Path | None = None) -> Accelerator:
    """bf16 autocast where the GPU supports it, full precision otherwise (CPU); `report_to` trackers, tensorboard's
    event files under `<out_dir>/tensorboard/` (wandb keeps its own run directory)."""
    from accelerate.utils import ProjectConfiguration

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    trackers = {}
    if report_to:
        where = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(Path(out_dir) / "tensorboard"))
        trackers = {"log_with": list(report_to), "project_config": where}
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", **trackers)
    if (
        acc.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    ):
        _fsdp_on_cpu(acc)
    return acc


def _fsdp_on_cpu(acc: Accelerator) -> None:
    """`accelerate launch --use_fsdp` on CPU ranks (gloo), as the tests run it: accelerate 1.15 turns FSDP on only
    for accelerator devices (AcceleratorState takes the FSDP plugin under MULTI_GPU and its kin, not MULTI_CPU),
    leaving CPU ranks plain DDP; torch's `fully_shard` itself runs on CPU over gloo. So set what the state would
    have set: the plugin from the launch's environment, and the FSDP distributed type."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    # AcceleratorState copies PartialState's distributed type over its own each time one is made (accelerate's
    # utilities make them): set it in both
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy on the completion tokens (SFT)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False
    )
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


_MESSAGE_BYTES = 2000


class AcceleratorRanks(Ranks):
    """The processes of an Accelerator. A failure travels as a fixed-size tensor of UTF-8 bytes (an all-gather;
    no pickle), after one all-reduce that, when nothing failed, is all it costs."""

    def __init__(self, acc: Accelerator):
        self.acc, self.rank, self.count = acc, acc.process_index, acc.num_processes

    def first_failure(self, error: str | None) -> tuple[int, str] | None:
        if self.count == 1:
            return super().first_failure(error)
        if not _sum_over_ranks(self.acc, [error is not None])[0]:
            return None
        mine = torch.zeros(1 + _MESSAGE_BYTES, dtype=torch.uint8)  # [failed, message bytes, zero padded]
        if error is not None:
            raw = error.encode()[:_MESSAGE_BYTES]
            mine[0] = 1
            mine[1 : 1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        every = self.acc.gather(mine.to(self.acc.device)).view(self.count, -1).cpu()
        rank = int(every[:, 0].nonzero()[0])
        return rank, bytes(every[rank, 1:].tolist()).rstrip(b"\0").decode(errors="replace")


def _zero_stage(acc: Accelerator) -> int:
    """DeepSpeed's ZeRO stage, 0 without DeepSpeed."""
    return acc.state.deepspeed_plugin.zero_stage if acc.distributed_type == DistributedType.DEEPSPEED else 0


def is_zero3(acc: Accelerator) -> bool:
    """DeepSpeed ZeRO-3: every model's parameters partitioned over the processes."""
    return _zero_stage(acc) == 3


def zero3_settings(acc: Accelerator, hidden_size: int) -> Zero3 | None:
    """Under ZeRO-3, what its config decides of each GPU's memory (offloads, bucket sizes: pipeline.train.memory's
    estimate needs them) from the DeepSpeed config accelerate holds; None elsewhere."""
    return Zero3.of(acc.state.deepspeed_plugin.deepspeed_config, hidden_size) if is_zero3(acc) else None


def _partition(acc: Accelerator, model: torch.nn.Module, config: dict) -> None:
    """ZeRO-3: partition a model built whole on the CPU (`whole_models`) over the processes, one parameter on the
    device at a time (deepspeed.zero.Init(module=...): each moved there, broadcast from rank 0, cut to this
    process's partition, the rest freed). DeepSpeed's engine would partition it too, but only after moving the whole
    model to the device (`module.to(device)` in `DeepSpeedEngine._configure_distributed_model`, skipped for a model
    already partitioned). First the parameters take the dtype that engine casts them to under bf16/fp16 (it casts
    only the models it partitions itself; parameters partitioned already, as transformers loads a model under ZeRO-3
    outside `whole_models`, are left as they are); the buffers go to the device after, as the engine would have
    moved them."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(config)
    if parsed.bfloat16_config.enabled or parsed.float16_config.enabled:
        half = torch.bfloat16 if parsed.bfloat16_config.enabled else torch.float16
        for p in model.parameters():
            if p.is_floating_point() and not hasattr(p, "ds_id"):
                p.data = p.data.to(half)
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    model.to(acc.device)  # the parameters are empty tensors on it already: this moves the buffers


def partition_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Under ZeRO-3, partition a frozen model that only runs forward (the KD teacher), built whole on the CPU, over
    the processes: a DeepSpeed engine of its own with no optimizer (as TRL does for reference models), whose hooks
    gather each submodule's parameters for its forward and free them after; also when the decoder and the output
    head are called apart, as the KD loss calls them (the hooks sit on every submodule). Returns that engine, in
    eval mode (it passes attribute reads on to the model: `get_decoder()`, `config`). Elsewhere the model itself."""
    if not is_zero3(accelerator):
        return model
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    # the engine checks a batch shape; a forward-only one never uses it
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    _partition(accelerator, model, config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def held_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters in this process's partition, parameters of the whole model) of a model partitioned by ZeRO-3."""
    params = list(model.parameters())
    return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)


def _zero_optimizer_state(zero_optimizer) -> dict:
    """This process's partition of a ZeRO optimizer (DeepSpeed's own state_dict: the fp32 master weights and the
    AdamW state of the partition), saveable as safetensors + JSON. DeepSpeed's engine checkpoint is torch.save
    pickles, so we write this ourselves; of DeepSpeed's entries only two need pickle: the loss scaler object
    (kept as its plain attributes, put back onto the engine's own scaler on load) and the parameter slice
    mappings (read only by DeepSpeed's universal-checkpoint converter; dropped)."""
    state = dict(zero_optimizer.state_dict())
    state.pop("param_slice_mappings", None)
    scaler = state.pop("loss_scaler")
    state["loss_scaler"] = {
        k: v for k, v in vars(scaler).items() if v is None or isinstance(v, (bool, int, float, str))
    }
    return state


def _load_zero_optimizer_state(zero_optimizer, state: dict, processes: int) -> None:
    state = dict(state)
    scaler = zero_optimizer.loss_scaler
    for k, v in state.pop("loss_scaler").items():
        setattr(scaler, k, v)
    state["loss_scaler"] = scaler
    # DeepSpeed takes every process's state and reads entry [rank]: each process passes its own in every slot;
    # the fp32 master weights are restored exactly (not rounded from the model's 16-bit ones)
    zero_optimizer.load_state_dict([state] * processes, load_optimizer_states=True, load_from_fp32_weights=True)


def _fsdp(acc: Accelerator) -> bool:
    """FSDP through accelerate (version 2, `fully_shard`: version 1 is refused by `_configure_fsdp`)."""
    return acc.distributed_type == DistributedType.FSDP


def _local_shards(state):
    """`state` with every DTensor replaced by this process's shard of it (a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: _local_shards(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_local_shards(v) for v in state)
    return state


def _fsdp_model_shards(model) -> dict:
    """This process's shard of every parameter of an FSDP2 model (frozen ones too), by name."""
    return {name: _local_shards(p.detach()).clone() for name, p in model.named_parameters()}


def _load_fsdp_model_shards(model, shards: dict) -> None:
    params = dict(model.named_parameters())
    if params.keys() != shards.keys():
        raise ValueError("the checkpoint's parameters are not the model's")
    with torch.no_grad():
        for name, p in params.items():
            local = _local_shards(p)
            if local.shape != shards[name].shape:
                raise ValueError(
                    f"{name}: shard of shape {tuple(shards[name].shape)} in the checkpoint, {tuple(local.shape)} here"
                )
            local.copy_(shards[name])


def _load_fsdp_optimizer_state(optimizer, state: dict) -> None:
    """Put an optimizer state of local shards back: each per-parameter tensor of the shape of its parameter's
    shard becomes a DTensor sharded as the parameter is (AdamW's moments, 8-bit ones too, as torchao makes them;
    its step counter stays a plain tensor)."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, values in state["state"].items():
        p = params[index]
        if isinstance(p, DTensor):
            values = {
                k: DTensor.from_local(
                    v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
                if isinstance(v, torch.Tensor) and v.shape == p.to_local().shape and v.dim()
                else v
                for k, v in values.items()
            }
        per_param[index] = values
    optimizer.load_state_dict({**state, "state": per_param})


def _checkpoint_parts(acc: Accelerator, model, optimizer, shared: dict) -> tuple[dict | None, dict]:
    """(what the main process saves for all, what this process saves of its own): the model in the shared part
    (under ZeRO-3 it is not: its partitions come back with the optimizer's fp32 master weights; under FSDP2 each
    process saves its shards of it), the optimizer there too unless ZeRO or FSDP2 partitions it over processes,
    and every process's RNG state in its own part."""
    zero, fsdp = _zero_stage(acc), _fsdp(acc)
    own = {"rng": rng_state()}
    if zero:
        own["optimizer"] = _zero_optimizer_state(model.optimizer)
    if fsdp:
        own["model_shards"] = _fsdp_model_shards(acc.unwrap_model(model))
        own["optimizer"] = _local_shards(optimizer.state_dict())
    if not acc.is_main_process:
        return None, own
    shared = dict(shared)
    if not zero and not fsdp:
        shared["optimizer"] = optimizer.state_dict()
    if zero != 3 and not fsdp:
        shared["model"] = acc.unwrap_model(model).state_dict()
    return shared, own


def _restore(acc: Accelerator, model, optimizer, scheduler, state: dict) -> None:
    """Inverse of `_checkpoint_parts` (the model before the optimizer: ZeRO-2 restores its fp32 masters after)."""
    if "model" in state:
        acc.unwrap_model(model).load_state_dict(state["model"])
    if "model_shards" in state:
        _load_fsdp_model_shards(acc.unwrap_model(model), state["model_shards"])
    if _zero_stage(acc):
        _load_zero_optimizer_state(model.optimizer, state["optimizer"], acc.num_processes)
    elif _fsdp(acc):
        _load_fsdp_optimizer_state(optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def _configure_deepspeed(acc: Accelerator, args: TrainArgs, micro: int) -> None:
    """DeepSpeed takes the batch shape and the gradient clipping from its config, not from the loop (accelerate
    would otherwise ask for a dataloader, and clip at 1.0): set them from `args`. A value a config file
    states explicitly must agree."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": args.grad_accum,
        "train_batch_size": args.batch_size,
        "gradient_clipping": args.grad_clip or 0.0,
    }
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"the DeepSpeed config sets {key} to {config[key]}; this stage needs {value}")
        config[key] = value
    if config.get("zero_optimization", {}).get("elastic_checkpoint"):
        # an elastic ZeRO state needs every process's file to load one: ours are per process
        raise ValueError(
            "the DeepSpeed config sets zero_optimization.elastic_checkpoint; checkpoints here need it false"
        )
    acc.gradient_accumulation_steps = args.grad_accum


def _configure_fsdp(acc: Accelerator) -> None:
    """FSDP2 only; with no wrap policy from the launch, the transformer-based one (each of the model's
    `_no_split_modules`, its decoder layers, a unit of its own: the whole model as one unit would be gathered
    whole for every forward)."""
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP version 1 is not supported here: launch with --fsdp_version 2")
    # every rank holds the whole model already (`whole_models`); accelerate's rank-0 load would broadcast it again,
    # and fails on a model with persistent buffers (the QuantLinears' zero points), which are not sharded
    plugin.cpu_ram_efficient_loading = False
    # bf16 as on one GPU: latent weights and gradients gathered and reduced in their own dtype (fp32, or bf16 with
    # param_dtype bfloat16), bf16 compute under the accelerator's autocast. accelerate's bf16 policy would gather fp32
    # latent weights in bf16, so that the fake quantizer saw rounded latent weights and scales, and reduce the
    # gradients in bf16
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy()
    if plugin.auto_wrap_policy is None:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy


@contextmanager
def _latent_dtype_kept(acc: Accelerator):
    """Context in which accelerate prepares an FSDP2 model without casting it: with mixed precision on (bf16 on a GPU)
    its FSDP2 preparation upcasts every trainable parameter to fp32, so that bf16 latent weights (param_dtype
    bfloat16) would silently train as fp32 ones, at twice the memory and without stochastic rounding (the optimizer
    was made for bf16). Its other uses of mixed precision (autocast, the loop's `acc.autocast()`) are outside."""
    state = acc.state
    saved = state._mixed_precision
    if _fsdp(acc):
        state._mixed_precision = "no"
    try:
        yield
    finally:
        state._mixed_precision = saved


def shard_frozen(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Under FSDP2, shard a frozen model that only runs forward (the KD teacher) over the processes: each decoder
    layer a `fully_shard` unit of its own, gathered for its forward and freed after. Its embeddings, final norm
    and output head stay whole on every process: the KD loss calls the head apart from the decoder, chunk by
    chunk, and a tied head shares its weight with the embeddings. Elsewhere a no-op: the model stays whole."""
    if not _fsdp(accelerator):
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=True)
    return model


def whole_model(
    accelerator: Accelerator, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]
) -> torch.nn.Module:
    """The trained model, unwrapped, for the main process to save. Under FSDP2 its parameters are shards outside a
    forward (a state dict of it holds DTensors), so its whole state (gathered from every process's shards, with the
    buffers; a collective every process enters) goes into `rebuild()`, a fresh copy of the model as the stage built
    it, made on the main process alone; the others get the sharded model back. Elsewhere the model itself (under
    ZeRO-3 still partitioned: save it inside `gathered`)."""
    unwrapped = accelerator.unwrap_model(model)
    if not _fsdp(accelerator):
        return unwrapped
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return unwrapped
    fresh = rebuild()
    fresh.load_state_dict(state)
    return fresh


@contextmanager
def whole_models(accelerator: Accelerator):
    """Models built in here have all their weights on every rank, also under ZeRO-3, where transformers would
    otherwise build them inside deepspeed.zero.Init (empty, partitioned parameters): the quantized student's
    meta-device load cannot be partitioned that way. Build them on the CPU there: `train` partitions the student
    and `partition_frozen` the teacher from there, a parameter at a time, before their engines get them. Under
    FSDP the same: transformers' rank-0-only load (FSDP_CPU_RAM_EFFICIENT_LOADING) is turned off, the models here
    being loaded on every rank."""
    if _fsdp(accelerator):
        saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
            else:
                os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved
        return
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
    if is_zero3(acc):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    return nullcontext()


def train(
    model: torch.nn.Module,
    examples: Sequence[Example],
    loss_fn: LossFn,
    args: TrainArgs,
    *,
    out_dir: str | Path,
    checkpointer: Checkpointer,
    seed: int,
    pad_id: int,
    log: logging.Logger | None = None,
    accelerator: Accelerator | None = None,
    desc: str = "train",
    on_step: OnStep | None = None,
) -> dict[str, float]:
    """Train `model` in place for `args.steps` steps (resuming from `checkpointer` if it holds a
    checkpoint of the same run); returns {"final_loss", "steps", "train_seconds", "tokens_per_s"}.

    `on_step(step, model)`, when given, runs on every process after each optimizer step (with the
    unwrapped model, in train mode); the metrics it returns join that step's row (held-out evaluation).

    Raises StageInterrupted after checkpointing on SIGTERM/SIGINT, NonFiniteLoss on a NaN/inf loss,
    ValueError when batch_size does not split over processes and grad_accum. With several processes, a
    failure on one (a NaN loss, an exception) stops every one with RankFailed and the same message.
    """
    log = log or logging.getLogger(__name__)
    acc = accelerator or make_accelerator()
    run = _prepare(
        model,
        examples,
        loss_fn,
        args,
        acc,
        checkpointer=checkpointer,
        seed=seed,
        pad_id=pad_id,
        metrics_path=Path(out_dir) / "metrics.jsonl",
        on_step=on_step,
    )
    start = _resume(run, log)
    checkpointer.every = args.checkpoint_every
    started = time.perf_counter()
    if acc.log_with:  # the wandb project; tensorboard writes <logging_dir>/reasoning-qat
        acc.init_trackers("reasoning-qat", init_kwargs={"wandb": {"name": desc}})
    # a first SIGINT/SIGTERM is seen after the step: checkpoint, then stop
    with signals.stop_at_safe_points(), progress(desc, total=args.steps, unit="step", done=start) as bar:
        for step in range(start, args.steps):
            row, stop = _step(run, step)
            _record(run, row, bar)
            if stop or checkpointer.due(row["step"]):
                _save(run, row["step"])
            if stop:
                raise StageInterrupted(f"{desc}: stopped at step {row['step']} on a signal; checkpoint saved")
    return _finish(run, time.perf_counter() - started)


@dataclass
class _Run:
    """One call of `train`: what `_prepare` set up, and what the steps accumulate (`rows`, `tokens_total`)."""

    acc: Accelerator
    ranks: AcceleratorRanks
    args: TrainArgs
    examples: Sequence[Example]
    loss_fn: LossFn
    checkpointer: Checkpointer
    seed: int
    pad_id: int
    micro: int
    """Sequences per micro-batch on each process."""
    model: torch.nn.Module
    """As accelerate prepared it (DDP- or DeepSpeed-wrapped when several processes run)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    signature: dict
    """What a checkpoint must have been made by to be resumed: this same run."""
    metrics_path: Path
    on_step: OnStep | None
    rows: list[dict] = field(default_factory=list)
    tokens_total: int = 0

    @property
    def deepspeed(self) -> bool:
        return self.acc.distributed_type == DistributedType.DEEPSPEED


def _prepare(
    model: torch.nn.Module,
    examples: Sequence[Example],
    loss_fn: LossFn,
    args: TrainArgs,
    acc: Accelerator,
    *,
    checkpointer: Checkpointer,
    seed: int,
    pad_id: int,
    metrics_path: Path,
    on_step: OnStep | None,
) -> _Run:
    """Check that `args` fit the processes, configure DeepSpeed, ready the model (gradient checkpointing,
    compile, device, dtype), build optimizer and schedule, and let accelerate prepare them."""
    micro = args.batch_size // (acc.num_processes * args.grad_accum)
    if micro * acc.num_processes * args.grad_accum != args.batch_size:
        raise ValueError(
            f"batch_size {args.batch_size} must be a multiple of processes ({acc.num_processes}) "
            f"x grad_accum ({args.grad_accum})"
        )
    if not examples:
        raise ValueError("no training examples")
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and (args.param_dtype, args.optimizer) != ("float32", "adamw"):
        # DeepSpeed keeps its own fp32 master weights and optimizer state: these levers are the one-GPU path's
        raise ValueError("param_dtype and optimizer must stay float32 / adamw under DeepSpeed")
    if deepspeed:
        _configure_deepspeed(acc, args, micro)
    if _fsdp(acc):
        _configure_fsdp(acc)

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    zero3 = is_zero3(acc)
    if not zero3:
        model.to(acc.device, torch.bfloat16 if args.param_dtype == "bfloat16" else None)
    model.train()
    # before a ZeRO-3 partition, which leaves every parameter an empty tensor: the optimizer tells matrices (weight
    # decay) from vectors by their shapes
    raw_optimizer = make_optimizer(model, args.optimizer, args.lr, args.weight_decay, acc.device)
    if zero3:
        _partition(acc, model, acc.state.deepspeed_plugin.deepspeed_config)
    with _latent_dtype_kept(acc):
        model, optimizer = acc.prepare(model, raw_optimizer)
    # the scheduler stays outside accelerate (prepared, it would step once per process) and sets the lr of the
    # optimizer that steps, which need not be ours: under ZeRO-Offload accelerate hands DeepSpeed a DeepSpeedCPUAdam
    # made from our AdamW's groups, and a resume's load_state_dict gives it groups of its own, which a scheduler of our
    # AdamW no longer reached (the steps after a resume kept the checkpoint's lr)
    scheduler = get_cosine_schedule_with_warmup(_stepping(optimizer), args.warmup_steps, args.steps)
    signature = run_signature(args, seed, len(examples), acc.num_processes)
    return _Run(
        acc=acc,
        ranks=AcceleratorRanks(acc),
        args=args,
        examples=examples,
        loss_fn=loss_fn,
        checkpointer=checkpointer,
        seed=seed,
        pad_id=pad_id,
        micro=micro,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        signature=signature,
        metrics_path=metrics_path,
        on_step=on_step,
    )


def run_signature(args: TrainArgs, seed: int, examples: int, processes: int) -> dict:
    """What a checkpoint of `train` is signed with: a run resumes only a checkpoint of the same signature."""
    return {
        "args": result_config(type(args), args.model_dump(mode="json")),
        "seed": seed,
        "examples": examples,
        "processes": processes,
    }


def _stepping(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper and, under DeepSpeed, inside its ZeRO optimizer."""
    inner = optimizer.optimizer
    while not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _resume(run: _Run, log: logging.Logger) -> int:
    """Restore the run's checkpoint if `checkpointer` holds one of this same run, and start metrics.jsonl over with
    its rows (those after the checkpoint belong to a lost future); returns the step to start from."""
    acc, start = run.acc, 0
    found = run.checkpointer.resume(run.signature, log, run.ranks)
    if found is not None:
        start, state = found
        on_every_rank(run.ranks, lambda: _restore(acc, run.model, run.optimizer, run.scheduler, state))
        run.rows = state["metrics"]
        log.info("resuming from the checkpoint at step %d", start)
    if acc.is_main_process:
        run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(run.metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in run.rows)
    return start


def _step(run: _Run, step: int) -> tuple[dict, bool]:
    """One optimizer step (0-based `step`) on every process: (its metrics row, whether any process asked to stop)."""
    acc, args, ranks = run.acc, run.args, run.ranks
    t0 = time.perf_counter()
    batches = on_every_rank(
        ranks, lambda: _my_batches(run.examples, run.seed, step, args, run.micro, acc.process_index, run.pad_id)
    )
    weights = [_label_tokens(b) for b in batches]
    # the step's loss is the mean over the label tokens of the global batch, all ranks'
    seen = sum(int(b["attention_mask"].sum()) for b in batches)
    total, tokens = map(int, _sum_over_ranks(acc, [sum(weights), seen]))
    loss_sum, extra = 0.0, {}
    for j, batch in enumerate(batches):
        value, metrics = _micro_step(run, step, batch, weights[j], total, last=j == len(batches) - 1)
        loss_sum += value * weights[j] / total
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + v * weights[j] / total
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), args.grad_clip) if args.grad_clip else None
    lr = float(run.scheduler.get_last_lr()[0])  # a tensor for torchao optimizers
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # each rank held its share of the loss; a stop asked of any rank stops all at the same step
    loss_sum, *parts, stop = _sum_over_ranks(acc, [loss_sum, *extra.values(), run.checkpointer.stop_requested])
    row = {
        "step": step + 1,
        "loss": loss_sum,
        "lr": lr,
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - t0),
        **dict(zip(extra, parts)),
    }
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    run.tokens_total += tokens
    return row, bool(stop)


def _micro_step(
    run: _Run, step: int, batch: dict[str, torch.Tensor], weight: int, total: int, last: bool
) -> tuple[float, dict[str, float]]:
    """Forward and backward of one micro-batch holding `weight` of the global batch's `total` label tokens; gradients
    are
    all-reduced once per step, on the `last` micro-step (DeepSpeed: its engine also steps there, inside
    acc.backward). Returns the loss's value and the loss function's metrics."""
    acc = run.acc
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    if run.deepspeed:
        acc.sync_gradients = last
    # the backward inside too: FSDP2 reads whether to reduce-scatter there (DDP already at the forward)
    with nullcontext() if last else acc.no_sync(run.model):
        with acc.autocast():
            # every rank learns of a NaN or an exception here before any enters the backward's
            # collectives, so all stop together rather than some waiting there forever
            loss, value, metrics = on_every_rank(
                run.ranks, lambda: _finite_loss(run.loss_fn, run.model, batch, step, run.checkpointer)
            )
        # x num_processes: DDP (and DeepSpeed, FSDP) average the gradients over ranks
        # (DeepSpeed would also divide by grad_accum: the weights already do)
        acc.backward(loss * (weight * acc.num_processes / total), **({"scale_wrt_gas": False} if run.deepspeed else {}))
    return value, metrics


def _record(run: _Run, row: dict, bar) -> None:
    """Complete the step's row with `on_step`'s metrics, then keep it: in `rows`, metrics.jsonl, the trackers,
    the progress bar."""
    acc = run.acc
    if run.on_step is not None:
        row.update(on_every_rank(run.ranks, lambda: run.on_step(row["step"], acc.unwrap_model(run.model))))
        run.model.train()
    run.rows.append(row)
    if acc.is_main_process:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    if acc.log_with:
        acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    bar.advance(1, tokens=row["tokens"], loss=f"{row['loss']:.4f}")


def _save(run: _Run, done: int) -> None:
    """Checkpoint the run after `done` steps (every process saves its part)."""
    shared, own = on_every_rank(
        run.ranks,
        lambda: _checkpoint_parts(
            run.acc,
            run.model,
            run.optimizer,
            {"scheduler": run.scheduler.state_dict(), "metrics": run.rows, "step": done, "signature": run.signature},
        ),
    )
    run.checkpointer.save(done, shared, own, run.ranks)


def _finish(run: _Run, seconds: float) -> dict[str, float]:
    run.acc.wait_for_everyone()
    # flushes the event files before the stage directory is renamed into place; not end_training, which also
    # destroys the process group that this stage's last collectives and the stages after it still use
    for tracker in run.acc.trackers:
        tracker.finish()
    tail = [r["loss"] for r in run.rows[-10:]]
    return {
        "final_loss": sum(tail) / len(tail),
        "steps": run.args.steps,
        "train_seconds": seconds,
        "tokens_per_s": run.tokens_total / seconds if seconds > 0 else 0.0,
    }


def _my_batches(
    examples: Sequence[Example], seed: int, step: int, args: TrainArgs, micro: int, rank: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of `step`: its slice of the global batch, sorted by length, split into grad_accum
    pieces. Each micro-batch is padded to its longest sequence; reasoning traces range from hundreds to thousands of
    tokens, so micro-batches of neighbours in length pad far less than random ones, and the update is the same
    (every micro-batch is weighted by its share of the step's label tokens)."""
    indices = batch_indices(seed, step, len(examples), args.batch_size)
    mine = indices[rank * micro * args.grad_accum :][: micro * args.grad_accum]
    mine = sorted(mine, key=lambda i: len(examples[i][0]))
    return [collate([examples[i] for i in mine[j * micro : (j + 1) * micro]], pad_id) for j in range(args.grad_accum)]


def _finite_loss(
    loss_fn: LossFn, model, batch: dict[str, torch.Tensor], step: int, checkpointer: Checkpointer
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(loss, its value, metrics) of one micro-batch; NonFiniteLoss if the loss is NaN or infinite."""
    loss, metrics = loss_fn(model, batch)
    value = loss.item()
    if not math.isfinite(value):
        last = checkpointer.latest_step()
        kept = f"the checkpoint of step {last} is kept" if last is not None else "no checkpoint was saved"
        raise NonFiniteLoss(f"step {step + 1}: loss is {value}; stopped before the update, {kept}")
    return loss, value, metrics
