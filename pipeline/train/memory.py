"""Will a KD-QAT step fit the GPU? An estimate made before anything is moved to it, so that a setting that
cannot fit fails in seconds with the levers that would make it fit, not after minutes of loading.

The estimate adds what stays resident (the student's latent weights, gradients and optimizer moments, per
`pipeline.train.optim.bytes_per_trainable_parameter`; frozen student weights; the teacher) and the activations of
one micro-batch. Activations per layer and token follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", §4.1) with flash attention (no s×s scores), adapted to a SwiGLU
MLP and to fake quantization, which saves each quantized input a second time; with gradient checkpointing
only each layer's input is kept, plus one layer's full set while it is recomputed. It is an estimate that errs high:
eager single-GPU steps within 10% of the peaks measured on an H100 (-7% to +9%), compiled and FSDP2 steps 20-24%
above (1.7B compiled 83.8 GiB estimated, 68.1 measured); `bench/kd_qat.py` prints it beside the measured peak
(`estimate_gib` and `peak_gib`).

Under FSDP2 (`processes` > 1) each GPU holds its share of what is sharded: every student parameter with its gradient
and moments, and the teacher's decoder layers (its embeddings and head stay whole, `pipeline.train.loop.shard_frozen`);
plus the layers it has gathered whole, two of each model at a time (the one computing and the next, prefetched), with
their gradients in the student's. Activations, quantized weights and logits are each process's own micro-batch's, as
on one GPU. Under ZeRO-3 (`Zero3`) every parameter of both models is partitioned, embeddings and head included, each
process holding its share, plus what DeepSpeed gathers whole and its buckets (`_zero3_resident`); with the optimizer
offloaded (ZeRO-Offload) the student's fp32 master weights, gradient partitions and AdamW moments live in CPU RAM and
each GPU keeps only its bf16 partition, which offload_param moves to the CPU too. Measured under FSDP2 (two H100s,
bench/kd_qat.py, docs/results/scale/): 8B 38.0 GiB a GPU against an estimate of 47.1, a 14B shape 65.3 against 78.1;
no ZeRO-3 peak has been measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.train.optim import bytes_per_trainable_parameter

GIB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one KD-QAT step on one GPU, by what holds them."""

    student: int
    teacher: int
    activations: int
    quantized_weights: int
    logits: int

    @property
    def total(self) -> int:
        return self.student + self.teacher + self.activations + self.quantized_weights + self.logits

    def describe(self) -> str:
        parts = {
            "student": self.student,
            "teacher": self.teacher,
            "activations": self.activations,
            "quantized weights": self.quantized_weights,
            "logits": self.logits,
        }
        return ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())


@dataclass(frozen=True)
class Zero3:
    """What a DeepSpeed ZeRO-3 config (its `zero_optimization` section) decides of each GPU's memory. The defaults are
    DeepSpeed's own, for a key the config leaves out (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig)."""

    offload_optimizer: bool = False
    """fp32 master weights, gradient partitions and AdamW moments in CPU RAM (`offload_optimizer.device`)."""
    offload_param: bool = False
    """The bf16 parameter partitions in CPU RAM too, fetched for each forward (`offload_param.device`)."""
    reduce_bucket_size: int = 500_000_000
    """Elements of the gradient bucket (`reduce_bucket_size`)."""
    prefetch_bucket_size: int = 50_000_000
    """Elements gathered ahead of the module computing (`stage3_prefetch_bucket_size`)."""

    @classmethod
    def of(cls, deepspeed_config: dict, hidden_size: int) -> Zero3:
        """From a DeepSpeed config as accelerate holds it before `prepare` (accelerate's
        `deepspeed_plugin.deepspeed_config`): an "auto" bucket size is the one accelerate will fill in from the
        model's hidden size (`Accelerator._prepare_deepspeed`: hidden², 0.9 hidden²)."""
        zero = deepspeed_config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:  # "cpu" or "nvme": either way off the GPU
            return (zero.get(key) or {}).get("device") not in (None, "none")

        def size(key: str, default: int, auto: int) -> int:
            value = zero.get(key, default)
            return auto if value == "auto" else int(value)

        return cls(
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            reduce_bucket_size=size("reduce_bucket_size", cls.reduce_bucket_size, hidden_size**2),
            prefetch_bucket_size=size(
                "stage3_prefetch_bucket_size", cls.prefetch_bucket_size, int(0.9 * hidden_size**2)
            ),
        )


def _zero3_resident(
    zero3: Zero3,
    *,
    student_bytes: int,
    student_params: int,
    teacher_params: int,
    teacher_bytes: int,
    largest_params: int,
    processes: int,
) -> tuple[int, int]:
    """(student, teacher) bytes on each GPU under ZeRO-3, `student_bytes` being the student's resident bytes on one
    GPU without offload and `largest_params` the parameters of the largest module either model gathers whole (its
    head or embeddings). bf16 (2 bytes) is what DeepSpeed computes in: `pipeline.train.loop._partition` casts to it
    under bf16 (fp32 compute would double the gathered and bucket terms). What stays gathered is also capped by
    `stage3_max_live_parameters` (1e9 elements by default), which this leaves out: no ZeRO-3 peak is measured yet."""
    # the bf16 partitions: in CPU RAM under offload_param (deepspeed.zero.Init's remote_device is offload_param.device,
    # partition_parameters.py; DeepSpeedZeroOptimizer_Stage3 keeps the flat fp16 groups in
    # `_create_param_groups_fp16_flat_cpu_memory`), else on the GPU (`lp_param_buffer`)
    weights = 0 if zero3.offload_param else 2 * student_params // processes
    # the fp32 master weights, AdamW moments and flat gradient partitions (`_create_fp32_partitions`,
    # `grad_partitions_flat_buffer`): made on `self.device`, which DeepSpeedZeroOptimizer_Stage3.__init__ sets to the
    # CPU under offload_optimizer; otherwise the rest of DeepSpeed's 16 bytes a trainable parameter in bf16
    optimizer = 0 if zero3.offload_optimizer else student_bytes // processes - 2 * student_params // processes
    teacher_part = 0 if zero3.offload_param else teacher_params * teacher_bytes // processes
    # gathered whole while it computes, then released (partitioned_param_coordinator.py fetch_sub_module /
    # release_sub_module): the largest module, the student's with its bf16 gradient before the reduce-scatter; each
    # model's engine also prefetches `prefetch_bucket_size` elements ahead
    gathered_student = (2 + 2) * largest_params + 2 * zero3.prefetch_bucket_size
    gathered_teacher = teacher_bytes * largest_params + 2 * zero3.prefetch_bucket_size if teacher_params else 0
    # the student's gradient bucket, bf16 on the GPU whether or not the optimizer is offloaded (stage3.py __init__,
    # "IPG": torch.empty(reduce_bucket_size) on the current device, contiguous_gradients being on by default)
    bucket = 2 * zero3.reduce_bucket_size
    return weights + optimizer + gathered_student + bucket, teacher_part + gathered_teacher


COMPILED_SHARE = 0.6
"""Share of the eager activations (and saved fake-quantized weights) a step keeps with its decoder layers compiled."""


def kd_step_memory(
    config,
    *,
    trainable: int,
    student_total: int,
    teacher_total: int,
    teacher_bytes: int,
    param_dtype: str,
    optimizer: str,
    tokens: int,
    chunk_size: int,
    gradient_checkpointing: bool,
    activation_quant: bool,
    compiled: bool = False,
    trained_transform_width: int = 0,
    processes: int = 1,
    zero3: Zero3 | None = None,
) -> StepMemory:
    """Estimate for a student of transformers `config` with `trainable` of `student_total` parameters trained,
    `teacher_total` parameters of `teacher_bytes` each, `tokens` per micro-batch, bf16 autocast, on each of
    `processes` GPUs sharing the models under FSDP2, or under ZeRO-3 as `zero3` sets it (1: one GPU, or DDP);
    `trained_transform_width`: elements of a token's activations that pass through trained online transforms in
    one decoder layer (`trained_transform_width`)."""
    weight_bytes = 4 if param_dtype == "float32" else 2
    student = (
        trainable * bytes_per_trainable_parameter(param_dtype, optimizer) + (student_total - trainable) * weight_bytes
    )
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)  # and the head
    if zero3:  # every parameter of both models partitioned
        student, teacher = _zero3_resident(
            zero3,
            student_bytes=student,
            student_params=student_total,
            teacher_params=teacher_total,
            teacher_bytes=teacher_bytes,
            # ZeRO-3 gathers leaf modules; a whole decoder layer bounds its largest Linear from above
            largest_params=max(config.vocab_size * h, (student_total - embeddings) // layers),
            processes=processes,
        )
    else:  # FSDP2 (or one GPU): the teacher's embeddings and head stay whole, its decoder layers are sharded
        teacher_whole = min(teacher_total, embeddings)
        teacher = teacher_whole * teacher_bytes + (teacher_total - teacher_whole) * teacher_bytes // processes
        if processes > 1:  # two layers gathered whole: the student's weights and gradients, the teacher's weights
            student = student // processes + 2 * ((student_total - embeddings) // layers) * 2 * weight_bytes
            teacher += 2 * ((teacher_total - teacher_whole) // layers) * teacher_bytes
    kv = config.num_key_value_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    # one layer, per token, in bf16 (2 bytes): inputs of q/k/v, o, gate/up, down projections and of the two
    # norms, q/k/v outputs, attention output, gate/up outputs and the SwiGLU product
    per_token_layer = 2 * (2 * h + h + (h + 2 * kv) + h + h + h + 3 * i)
    if activation_quant:
        per_token_layer += 2 * (3 * h + i)  # each quantized linear input saved again, fake-quantized
    per_token_layer += 2 * weight_bytes * h  # the residual stream and the norm inputs in the weights' dtype
    # autograd keeps about twice what is counted above (q/k norms, RoPE, attention output and log-sum-exp,
    # SiLU): calibrated on the Qwen3-0.6B eager step, 57.5 GiB measured on an H100
    per_token_layer *= 2
    # a trained online transform x -> diag(s)^-1 x (A (x) B) keeps, for the gradients of s, A and B, x / s in the
    # residual stream's fp32, its bf16 cast for the first matmul and the bf16 half-transformed grid: 8 bytes an
    # element (pipeline.quant.online.KroneckerTransform.forward). Those before o_proj, down_proj and the heads see
    # bf16 inputs and keep less; the learned activation clips that come with trained transforms keep more than the
    # fixed ratio counted above. Counted at 8 bytes throughout, the estimate of SmolLM2-135M's W4A4KV4 step with
    # FlatQuant's transforms trained is 28.3 GiB, as measured on an H200 (19.8 without it; docs/results/smollm2/)
    per_token_layer += 8 * trained_transform_width
    # autograd keeps each layer's fake-quantized weight (its bf16 copy, 2 bytes) and the fp32 intermediates
    # of the quantizer that the scale's gradient needs (about 2 more fp32 copies): 10 bytes a weight
    layer_weights = 10 * (student_total - 2 * config.vocab_size * h) // layers
    if gradient_checkpointing:
        activations = tokens * (layers * weight_bytes * h + per_token_layer)
        quantized_weights = layer_weights
    else:
        activations = tokens * layers * per_token_layer
        quantized_weights = layer_weights * layers
    if compiled:
        # Inductor fuses the norms, RoPE, SwiGLU and the fake quantizer and saves fewer intermediates for backward:
        # measured on H100/H200 without checkpointing, activations + quantized weights took 0.48-0.69 of the eager
        # count (0.6B fp32 0.69, 1.7B fp32 0.48, 1.7B bf16 + 8-bit 0.51); 0.6 keeps the estimate within ~15%
        activations, quantized_weights = int(COMPILED_SHARE * activations), int(COMPILED_SHARE * quantized_weights)
    # one chunk of fp32 logits at a time: student and teacher, their log-softmaxes, the gradient (4 copies)
    logits = 4 * min(chunk_size, tokens) * config.vocab_size * 4
    return StepMemory(
        student=student,
        teacher=teacher,
        activations=activations,
        quantized_weights=max(quantized_weights, 0),
        logits=logits,
    )


def kd_step_memory_of(
    student,
    args,
    *,
    teacher_total: int,
    teacher_bytes: int,
    tokens: int,
    chunk_size: int,
    processes: int = 1,
    zero3: Zero3 | None = None,
) -> StepMemory:
    """`kd_step_memory` of a student model (whole) as it will train under `args` (pipeline.train.loop.TrainArgs):
    its parameters, which of them train, and whether it quantizes activations, read off the model."""
    from pipeline.quant.apply import weight_only

    params = list(student.parameters())
    return kd_step_memory(
        student.config,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        student_total=sum(p.numel() for p in params),
        teacher_total=teacher_total,
        teacher_bytes=teacher_bytes,
        param_dtype=args.param_dtype,
        optimizer=args.optimizer,
        tokens=tokens,
        chunk_size=chunk_size,
        gradient_checkpointing=args.gradient_checkpointing,
        compiled=args.compile,
        trained_transform_width=trained_transform_width(student),
        activation_quant=not weight_only(student),
        processes=processes,
        zero3=zero3,
    )


def trained_transform_width(student) -> int:
    """Elements of one token's activations that pass through online transforms being trained, per decoder layer: a
    transform's own width where it sits before a Linear, every query and key head's where it is the attention's
    (`self_attn.qk_transform`: k -> kP, q -> q P^-T)."""
    from pipeline.quant.online import transforms

    config = student.config
    heads = config.num_attention_heads + config.num_key_value_heads
    width = 0
    for name, transform in transforms(student):
        if transform.left.requires_grad:
            n1, n2 = transform.sizes
            width += n1 * n2 * (heads if name.endswith("qk_transform") else 1)
    return width // config.num_hidden_layers


# The estimate was within 10% of the measured peak of every eager one-GPU step bench/kd_qat.py ran on an H100 (Qwen3
# shapes 0.6B-8B, 8 x 2048 tokens: -7% to +9%) and above it elsewhere (compiled, FSDP2: +20-24%), so only a setting
# estimated to need more than this much of the free memory is refused; one near the limit is left to try (and may run
# out of memory at its first step).
REFUSE_ABOVE = 1.10


def fit_error(
    memory: StepMemory,
    available: int,
    *,
    param_dtype: str,
    optimizer: str,
    gradient_checkpointing: bool,
    processes: int = 1,
    deepspeed: bool = False,
    zero3: Zero3 | None = None,
) -> str | None:
    """None unless `memory` is clearly more than `available` bytes (REFUSE_ABOVE), else the message: what it
    needs, what the GPU has, and the levers not yet pulled (under `deepspeed`, only those DeepSpeed allows; under
    `zero3`, its offloads)."""
    if memory.total <= REFUSE_ABOVE * available:
        return None
    levers = []
    if not gradient_checkpointing:
        levers.append("gradient_checkpointing: true")
    # ZeRO-Offload: the optimizer's 16 bytes a parameter go to CPU RAM, then the bf16 partitions too
    if zero3 and not zero3.offload_optimizer:
        levers.append(
            "offload_optimizer.device: cpu in the DeepSpeed config's zero_optimization (accelerate launch "
            "--offload_optimizer_device cpu)"
        )
    if zero3 and not zero3.offload_param:
        levers.append(
            "offload_param.device: cpu in the DeepSpeed config's zero_optimization (accelerate launch "
            "--offload_param_device cpu)"
        )
    # DeepSpeed keeps its own fp32 master weights and AdamW state: the bf16 and 8-bit levers are not its
    if param_dtype == "float32" and not deepspeed:
        levers.append("param_dtype: bfloat16")
    if optimizer == "adamw" and not deepspeed:
        levers.append("optimizer: adamw_8bit")
    more = "more GPUs" if processes > 1 else "several GPUs (FSDP2, ZeRO-3)"
    advice = (
        "try " + ", ".join(levers) + ", or a smaller batch_size / more grad_accum / chunk_size"
        if levers
        else f"use a smaller batch_size / more grad_accum / a smaller chunk_size, or {more}"
    )
    return (
        f"a KD-QAT step needs about {memory.total / GIB:.1f} GiB ({memory.describe()} GiB), the GPU has "
        f"{available / GIB:.1f} GiB free: {advice}"
    )
