"""Stage `kd_qat`: train the fake-quantized student against the frozen BF16 teacher.

The second step of the reasoning-QAT workflow (README.md; results in docs/results/): start from a `ptq` stage's
quantized
model (GPTQ init; RTN init for the ablation), and distil the teacher's token distributions on the
teacher's own reasoning traces. The studies found KD beats plain SFT on the same traces, whether the
teacher was trained by SFT or RL, and a PTQ init beats an RTN init; `objective: sft` gives the SFT
baseline with everything else (data, steps, evaluation) equal.

Loss (pipeline.train.distill): forward KL by default, reverse KL, generalised JSD (β) or top-k forward KL,
at a temperature, optionally mixed with the label cross-entropy (`ce_weight`); on completion tokens
only; the logits are made a chunk of tokens at a time so that Qwen3's 151,936-entry vocabulary never
materialises for the whole batch. The teacher stays in eval mode with no gradients, on the same
device, in the recipe's dtype; whole on every rank (DDP, ZeRO-2), except under FSDP2 (`accelerate launch
--use_fsdp --fsdp_version 2`), where its decoder layers are sharded over the ranks as the student's are, and
under ZeRO-3, where a forward-only DeepSpeed engine of its own partitions all its parameters over the ranks.

What trains (`train`): `weights` — every parameter except the quantizer scales (latent weights
through the straight-through estimator, norms, embeddings, the unquantized lm_head); `scales` — the
weight scales only (LSQ); `both`.

The loop is `pipeline.train.loop` (shared with `sft`): AdamW, warmup + cosine, clipping, accumulation,
gradient checkpointing, bf16 autocast on GPU, exact resume, `accelerate launch` for several
processes. Memory levers for large students (`pipeline.train.optim`): `param_dtype: bfloat16` (latent weights
and gradients in bf16, stochastically rounded updates), `optimizer: adamw_8bit`, `gradient_checkpointing`, on one
GPU or under FSDP2 (not DeepSpeed); on a GPU (each GPU's share under FSDP2) the step's memory is estimated first
(`pipeline.train.memory`). A step that cannot fit as set turns on the levers the recipe leaves unset (`fit:
levers`, the default: gradient checkpointing first, then bf16 latent weights with 8-bit AdamW) and logs its choice;
one that cannot fit even so, or under `fit: refuse`, stops before training with the levers that would make it
fit. Output: the student in the quantized representation
(`<out_dir>/model/`, loadable with
`pipeline.load_quantized`) and `metrics.jsonl`.

    reasoning-qat run recipes/demo.yaml --only kd_qat
"""

from __future__ import annotations

from typing import Literal

import torch
from accelerate import DistributedType
from pydantic import Field, model_validator

from pipeline.data.rows import read_jsonl
from pipeline.data.testbed import MAX_PROBLEMS
from pipeline.data.traces import training_traces
from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import (
    ADDED_KEY,
    ANY_MODEL,
    QUANTIZED,
    TRACES,
    StageConfig,
    StageContext,
    stage_ref,
)
from pipeline.generate import GenerationSpec
from pipeline.models import load_model, load_tokenizer
from pipeline.quant.apply import decoding_weights, quant_linears, weight_only
from pipeline.quant.formats.io import read_quant_spec, save_quantized, saved_dtype
from pipeline.quant.formats.layout import is_quantized
from pipeline.train.kd_loss import kd_loss_fn as distill_loss_fn
from pipeline.train.loop import (
    TrainArgs,
    causal_lm_loss,
    check_train_args,
    gathered,
    held_parameters,
    is_zero3,
    make_accelerator,
    partition_frozen,
    run_signature,
    shard_frozen,
    train,
    whole_model,
    whole_models,
    zero3_settings,
)
from pipeline.train.memory import GIB, fit_error, kd_step_memory_of

CODE_VERSION = 2
USES = ("seed", "model", "data")
HEADLINE = "final_loss"
OUTPUT = QUANTIZED


class Config(TrainArgs, StageConfig):
    type: Literal["kd_qat"] = "kd_qat"
    init: stage_ref(QUANTIZED)
    """The quantized student to train: a `ptq` stage (or any stage holding a quantized model)."""
    teacher: stage_ref(*ANY_MODEL)
    """The full-precision teacher: the stage that trained it, or "model" for the recipe's base model."""
    data: stage_ref(TRACES)
    """A `traces` stage: the teacher's own solutions, the domain-matched training data."""
    only_correct: bool = True
    """Train only on traces whose answer was graded correct. A weak teacher (a small pretrained model
    solves a few percent of GSM8K) leaves few or none: the stage logs how many it kept, refuses none,
    and `false` trains on every trace (distillation needs the teacher's distributions, not right answers)."""
    objective: Literal["kd", "sft"] = "kd"
    """kd: distil the teacher's distributions; sft: plain cross-entropy on the traces (the baseline)."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """The divergence for `kd`."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of both models in the KD loss (the loss is scaled by its square)."""
    beta: float = Field(0.5, gt=0, lt=1)
    """Interpolation of the generalised JSD (0.5: symmetric)."""
    top_k: int | None = Field(None, gt=0)
    """forward_kl over the teacher's top-k tokens only (None: the whole vocabulary)."""
    ce_weight: float = Field(0.0, ge=0, le=1)
    """Mix of label cross-entropy into the KD loss: (1 − w)·KD + w·CE."""
    chunk_size: int = Field(2048, gt=0)
    """Tokens per chunk of logits in the KD loss: memory against the number of lm_head calls."""
    train: Literal["weights", "scales", "both"] = "weights"
    """What the optimizer updates (see the module docstring)."""
    transforms: Literal["frozen", "trainable"] = "frozen"
    """Online transforms and learned activation clips of a QuaRot / FlatQuant init: kept as calibrated, or
    trained with the weights (pipeline.quant.online.transform_parameters); trainable also gives a learned
    clip, starting at the scheme's clip_ratio, to every activation quantizer that has none (QuaRot's)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate; QAT starts from a trained model, so far below the from-scratch rate."""
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(0, ge=0)
    """Evaluate the student on held-out problems every this many steps and at the end (0: never);
    `eval_accuracy` joins metrics.jsonl (the accuracy-against-step curve of `reasoning-qat report`).
    It decodes in the training precision (bf16 autocast on GPU): a W4A4KV4 student reads a few points
    lower there than in an `eval` stage, which runs it in float32."""
    eval_bench: str = "testbed"
    """Benchmark of that evaluation (the recipe's testbed test split, or gsm8k, math500, ...)."""
    eval_limit: int = Field(100, ge=1, le=MAX_PROBLEMS)
    """Problems per evaluation."""
    eval_generation: GenerationSpec = GenerationSpec()
    """Decoding of that evaluation (greedy by default)."""
    fit: Literal["levers", "refuse"] = Field("levers", json_schema_extra=ADDED_KEY)
    """On a GPU, a step estimated not to fit as set: "levers" turns on the memory levers this config leaves unset,
    `gradient_checkpointing` first (the same update, about a third more compute), then `param_dtype: bfloat16` with
    `optimizer: adamw_8bit` (a third of the memory a parameter, other rounding), the first that fits, logs it and
    records it in the metrics (`gradient_checkpointing`, `latent_weight_bits`, `moment_bits`): what trains then
    depends on the GPU's free memory, which the stage's fingerprint does not know. A checkpoint is resumed with the
    levers it was made with, or the stage refuses. "refuse" stops instead, naming them."""

    @model_validator(mode="after")
    def _top_k_needs_forward_kl(self):
        if self.top_k is not None and self.loss != "forward_kl":
            raise ValueError("top_k applies to loss forward_kl only")
        return self


def check(config: Config, recipe) -> list[tuple[str, str]]:
    from pipeline.data.benchmarks import check_bench

    bench = check_bench(config.eval_bench, recipe.data, "eval_bench", config.eval_limit) if config.eval_every else []
    return check_train_args(config) + bench


def _select_trainable(model: torch.nn.Module, what: str, transforms: str = "frozen") -> None:
    from pipeline.quant.online import transform_parameters

    scales = {id(m.weight_scale) for _, m in quant_linears(model)}
    frozen = {id(p) for p in transform_parameters(model)} if transforms == "frozen" else set()
    for p in model.parameters():
        is_scale = id(p) in scales
        p.requires_grad_(id(p) not in frozen and (what == "both" or (what == "scales") == is_scale))


def kd_loss_fn(teacher: torch.nn.Module, config: Config):
    """loss_fn for pipeline.train.loop: KD of the student towards `teacher` with this stage's loss settings."""
    return distill_loss_fn(
        teacher,
        loss=config.loss,
        temperature=config.temperature,
        beta=config.beta,
        top_k=config.top_k,
        ce_weight=config.ce_weight,
        chunk_size=config.chunk_size,
    )


def held_out_eval(ctx: StageContext, tokenizer, accelerator):
    """on_step hook of pipeline.train.loop: accuracy on `eval_limit` held-out problems every `eval_every` steps."""
    from pipeline.data.benchmarks import load_benchmark
    from pipeline.evaluation import evaluate

    config, data = ctx.config, ctx.recipe.data
    problems = load_benchmark(
        config.eval_bench, limit=config.eval_limit, data_dir=data.benchmarks_dir, testbed=data.testbed, hub=data.hub
    )

    def on_step(step: int, model) -> dict[str, float]:
        if step % config.eval_every and step != config.steps:
            return {}
        model.eval()
        # accelerate keeps the student's forward under bf16 autocast while its latent weights are
        # fp32: decode on q(w) in bf16 (weight-only), or with the dynamic cache, which takes keys and
        # values of different dtypes (activation-quantized students)
        with torch.no_grad():
            if weight_only(model):
                dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
                with decoding_weights(model, dtype):
                    accuracy = evaluate(
                        model, tokenizer, problems, config.eval_generation, instruction=data.instruction
                    )["accuracy"]
            else:
                spec = config.eval_generation.model_copy(update={"backend": "generate"})
                accuracy = evaluate(model, tokenizer, problems, spec, instruction=data.instruction)["accuracy"]
        ctx.log.info("%s: step %d: held-out accuracy %.1f%%", ctx.name, step, 100 * accuracy)
        return {"eval_accuracy": accuracy}

    return on_step


LEVERS = ("gradient_checkpointing", "param_dtype", "optimizer")


def _lever_ladder(config: Config, deepspeed: bool) -> list[Config]:
    """`config`, then with each lever it leaves unset turned on in turn: gradient checkpointing (the same update),
    then bf16 latent weights with 8-bit AdamW (not under DeepSpeed, which keeps its own fp32 state)."""
    unset = set(LEVERS) - config.model_fields_set
    steps = [{"gradient_checkpointing": True}]
    if not deepspeed:
        steps.append({"param_dtype": "bfloat16", "optimizer": "adamw_8bit"})
    ladder = [config]
    for step in steps:
        update = {k: v for k, v in step.items() if k in unset and getattr(ladder[-1], k) != v}
        if update:
            ladder.append(ladder[-1].model_copy(update=update))
    return ladder


def _levers_used(config: Config) -> dict[str, int]:
    """The memory levers the student trained with, as metrics (numbers): `fit: levers` may have chosen them."""
    return {
        "gradient_checkpointing": int(config.gradient_checkpointing),
        "latent_weight_bits": 16 if config.param_dtype == "bfloat16" else 32,
        "moment_bits": 8 if config.optimizer == "adamw_8bit" else 32,
    }


def _least_free(accelerator) -> int:
    """Free bytes of the GPU with the least, over the processes: every process takes the same levers, or refuses
    together, from the same number (one deciding alone would leave the others waiting in the first collective)."""
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    if accelerator.num_processes == 1:
        return free
    least = torch.tensor([free], dtype=torch.int64, device=accelerator.device)
    torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
    return int(least.item())


def _fitting(ctx: StageContext, student, examples, accelerator, teacher_dtype: str) -> Config:
    """The config to train with. On one GPU (or one per process: DDP; FSDP2 and ZeRO-3, each GPU holding its shares
    of the models, under ZeRO-3 less what its config offloads to the CPU) a step estimated not to fit as set takes
    the levers `fit` allows, or is refused before training; ZeRO-2 and the CPU are not checked. A checkpoint made
    with one of those settings is resumed with it or refused, never cleared for another."""
    config = ctx.config
    zero3, fsdp = is_zero3(accelerator), accelerator.distributed_type == DistributedType.FSDP
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.device.type != "cuda" or (deepspeed and not zero3):
        return config
    processes = accelerator.num_processes if zero3 or fsdp else 1
    zero3_config = zero3_settings(accelerator, student.config.hidden_size)
    micro = config.batch_size // (accelerator.num_processes * config.grad_accum)
    teacher_total = sum(p.numel() for p in student.parameters()) if config.objective == "kd" else 0
    tokens = micro * max(len(ids) for ids, _ in examples)
    free = _least_free(accelerator)
    ladder = _lever_ladder(config, deepspeed) if config.fit == "levers" else [config]
    saved = ctx.checkpointer.latest_signature()
    checkpointed = [
        c for c in ladder if run_signature(c, ctx.recipe.seed, len(examples), accelerator.num_processes) == saved
    ]
    for candidate in checkpointed or ladder:
        memory = kd_step_memory_of(
            student,
            candidate,
            teacher_total=teacher_total,
            teacher_bytes=getattr(torch, teacher_dtype).itemsize,
            tokens=tokens,
            chunk_size=config.chunk_size,
            processes=processes,
            zero3=zero3_config,
        )
        levers = ", ".join(f"{k}: {getattr(candidate, k)}" for k in LEVERS)
        ctx.log.info(
            "%s: estimated step memory %.1f GiB (%s GiB) with %s, %.1f GiB free",
            ctx.name,
            memory.total / GIB,
            memory.describe(),
            levers,
            free / GIB,
        )
        error = fit_error(
            memory,
            free,
            param_dtype=candidate.param_dtype,
            optimizer=candidate.optimizer,
            gradient_checkpointing=candidate.gradient_checkpointing,
            processes=processes,
            deepspeed=deepspeed,
            zero3=zero3_config,
        )
        if error is None:
            if candidate != config:
                why = "as its checkpoint was made" if checkpointed else "to fit the GPU (fit: levers)"
                ctx.log.warning("%s: training with %s, %s", ctx.name, levers, why)
            return candidate
    if checkpointed:
        error += (
            f"; the checkpoint of step {ctx.checkpointer.latest_step()} was made with {levers} and resumes only so: "
            f"free GPU memory and run again, or delete {ctx.checkpointer.directory} to start over"
        )
    raise InputError(f"stages.{ctx.name}", error)


def run(ctx: StageContext) -> dict[str, float]:
    config, recipe = ctx.config, ctx.recipe
    trust = recipe.model.trust_remote_code
    if not is_quantized(ctx.inputs["init"]):
        raise InputError(f"stages.{ctx.name}.init", f"{config.init!r} holds no quantized model (use a ptq stage)")
    spec = read_quant_spec(ctx.inputs["init"])
    accelerator = make_accelerator(config.report_to, ctx.out_dir)
    if config.eval_every and accelerator.distributed_type == DistributedType.FSDP:
        # decoding_weights quantizes each weight outside a forward, where FSDP2 leaves only this rank's shard
        raise InputError(
            f"stages.{ctx.name}.eval_every",
            "held-out evaluation while training is not supported under FSDP2: set 0 and evaluate with an eval stage",
        )
    student = _student(ctx, accelerator)
    tokenizer = load_tokenizer(ctx.inputs["init"], trust_remote_code=trust)
    _select_trainable(student, config.train, config.transforms)

    kept = training_traces(ctx.inputs["data"], config.only_correct, ctx.name, ctx.log)
    examples = [t.example(tokenizer) for t in kept]
    teacher_dtype = recipe.model.dtype if accelerator.device.type == "cuda" else "float32"
    config = _fitting(ctx, student, examples, accelerator, teacher_dtype)
    loss_fn = _loss_fn(ctx, student, accelerator, teacher_dtype)

    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    ctx.log.info(
        "%s: %s on %d traces, %s (%.2fM trainable), %s",
        ctx.name,
        config.objective,
        len(examples),
        config.train,
        trainable / 1e6,
        accelerator.device,
    )
    result = train(
        student,
        examples,
        loss_fn,
        config,
        out_dir=ctx.out_dir,
        checkpointer=ctx.checkpointer,
        seed=recipe.seed,
        pad_id=tokenizer.pad_token_id,
        log=ctx.log,
        accelerator=accelerator,
        desc=f"{ctx.name}: {config.objective}",
        on_step=held_out_eval(ctx, tokenizer, accelerator) if config.eval_every else None,
    )
    _save(ctx, student, tokenizer, spec, accelerator)
    metrics = {**result, "examples": len(examples), "trainable_parameters": trainable, **_levers_used(config)}
    if config.eval_every:  # the last step always evaluates
        metrics["eval_accuracy"] = read_jsonl(ctx.out_dir / "metrics.jsonl", ctx.name)[-1]["eval_accuracy"]
    return metrics


def _student(ctx: StageContext, accelerator):
    """The quantized init, whole on every rank, in float32 (with learned activation clips if `transforms:
    trainable`)."""
    with whole_models(accelerator):
        student = load_model(ctx.inputs["init"], dtype="float32", trust_remote_code=ctx.recipe.model.trust_remote_code)
    if ctx.config.transforms == "trainable":
        from pipeline.quant.online import add_activation_clips

        add_activation_clips(student)
    return student


def _loss_fn(ctx: StageContext, student, accelerator, teacher_dtype: str):
    """`objective: kd`: the distillation loss against the teacher (checked to share the student's vocabulary);
    otherwise next-token cross-entropy."""
    config = ctx.config
    if config.objective != "kd":
        return causal_lm_loss
    # the teacher stays outside the student's engine: replicated on every rank (DDP, ZeRO-2), sharded under FSDP2,
    # partitioned by an engine of its own under ZeRO-3, which takes it from the CPU a parameter at a time
    with whole_models(accelerator):
        teacher = load_model(
            ctx.inputs["teacher"],
            dtype=teacher_dtype,
            device="cpu" if is_zero3(accelerator) else accelerator.device,
            trust_remote_code=ctx.recipe.model.trust_remote_code,
        )
    teacher.requires_grad_(False)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise InputError(
            f"stages.{ctx.name}.teacher",
            f"vocabulary {teacher.config.vocab_size} differs from the student's {student.config.vocab_size}",
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        shard_frozen(accelerator, teacher)
        ctx.log.info(
            "%s: the teacher's %d decoder layers sharded over %d processes (FSDP2)",
            ctx.name,
            len(teacher.get_decoder().layers),
            accelerator.num_processes,
        )
    if is_zero3(accelerator):
        teacher = partition_frozen(accelerator, teacher)
        held, total = held_parameters(teacher)
        ctx.log.info(
            "%s: the teacher's %d parameters partitioned over %d processes (ZeRO-3): %d in this process's partition",
            ctx.name,
            total,
            accelerator.num_processes,
            held,
        )
    return kd_loss_fn(teacher, config)


def _save(ctx: StageContext, student, tokenizer, spec, accelerator) -> None:
    """The trained student in the quantized representation, in the recipe's dtype; gathered whole first under
    ZeRO-3 and FSDP2 (there into a fresh copy of the init on the main process), collectives every process enters."""
    student = whole_model(accelerator, student, lambda: _student(ctx, accelerator)).eval()
    with gathered(accelerator, student):
        if accelerator.is_main_process:
            student = student.to(saved_dtype(student, ctx.recipe.model.dtype))
            save_quantized(student, tokenizer, ctx.out_dir / "model", spec)
    accelerator.wait_for_everyone()
