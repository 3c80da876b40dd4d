"""The KD-QAT step-memory estimate and the fit check that refuses a setting before training (pipeline.train.memory)."""

import pytest
from real_shapes import QWEN3_SIZES, REAL_SHAPES
from transformers import Qwen3Config

from pipeline.train.memory import GIB, Zero3, fit_error, kd_step_memory, trained_transform_width
from pipeline.train.optim import bytes_per_trainable_parameter

QWEN3_8B = Qwen3Config(**QWEN3_SIZES["8b"])
N_8B = 8_190_735_360  # parameters of that shape (embeddings and lm_head untied)


def estimate(param_dtype, optimizer, checkpointing=True, processes=1, zero3=None, teacher_total=N_8B):
    return kd_step_memory(
        QWEN3_8B,
        trainable=N_8B,
        student_total=N_8B,
        teacher_total=teacher_total,
        teacher_bytes=2,
        param_dtype=param_dtype,
        optimizer=optimizer,
        tokens=8 * 2048,
        chunk_size=2048,
        gradient_checkpointing=checkpointing,
        activation_quant=False,
        processes=processes,
        zero3=zero3,
    )


def test_bytes_per_trainable_parameter_of_each_lever():
    assert bytes_per_trainable_parameter("float32", "adamw") == 16  # weight, gradient, two fp32 moments
    assert bytes_per_trainable_parameter("bfloat16", "adamw") == 12
    assert bytes_per_trainable_parameter("bfloat16", "adamw_8bit") == 6


def test_an_8b_student_fits_one_80gb_gpu_only_with_the_levers():
    levers, plain = estimate("bfloat16", "adamw_8bit"), estimate("float32", "adamw")
    assert levers.student == 6 * N_8B and levers.teacher == 2 * N_8B
    # measured on an H100 with bench/kd_qat.py: 70.2 GiB peak; the estimate stays within 10%
    assert abs(levers.total / GIB - 70.2) / 70.2 < 0.10
    h100_free = 78.6 * GIB
    assert (
        fit_error(levers, h100_free, param_dtype="bfloat16", optimizer="adamw_8bit", gradient_checkpointing=True)
        is None
    )
    message = fit_error(plain, h100_free, param_dtype="float32", optimizer="adamw", gradient_checkpointing=True)
    assert message.startswith(f"a KD-QAT step needs about {plain.total / GIB:.1f} GiB (student ")
    assert "the GPU has 78.6 GiB free: try param_dtype: bfloat16, optimizer: adamw_8bit" in message
    assert "gradient_checkpointing" not in message  # already on


def test_without_checkpointing_every_layer_keeps_its_activations():
    on, off = estimate("bfloat16", "adamw_8bit"), estimate("bfloat16", "adamw_8bit", checkpointing=False)
    assert off.activations > 10 * on.activations and off.quantized_weights == 36 * on.quantized_weights
    message = fit_error(off, 78.6 * GIB, param_dtype="bfloat16", optimizer="adamw_8bit", gradient_checkpointing=False)
    assert "try gradient_checkpointing: true" in message


def test_under_fsdp2_each_gpu_holds_its_share_of_the_sharded_parts():
    one, two = estimate("bfloat16", "adamw_8bit"), estimate("bfloat16", "adamw_8bit", processes=2)
    embeddings = 2 * QWEN3_8B.vocab_size * QWEN3_8B.hidden_size  # and the head: whole on every GPU
    layer = (N_8B - embeddings) // 36
    # the student's weights, gradients and 8-bit moments halved, plus two decoder layers gathered whole (the one
    # computing and the one prefetched) with their bf16 gradients
    assert two.student == 6 * N_8B // 2 + 2 * layer * 2 * 2
    # the teacher's decoder layers halved, its embeddings and head whole, two layers gathered
    assert two.teacher == 2 * embeddings + 2 * (N_8B - embeddings) // 2 + 2 * layer * 2
    # each GPU runs its own micro-batch: activations, quantized weights and logits as on one GPU
    assert (two.activations, two.quantized_weights, two.logits) == (one.activations, one.quantized_weights, one.logits)
    # the 8B student without the levers does not fit one H100 (see above); over two it still does not, with them it
    # leaves room
    plain = estimate("float32", "adamw", processes=2)
    assert fit_error(plain, 78.6 * GIB, param_dtype="float32", optimizer="adamw", gradient_checkpointing=True)
    assert two.total < 0.75 * 78.6 * GIB


HEAD_8B = QWEN3_8B.vocab_size * QWEN3_8B.hidden_size  # the largest module ZeRO-3 gathers whole (a layer: 193M)
# DeepSpeed's defaults, as `accelerate launch --use_deepspeed` writes a config without them: 2 bytes (bf16) an element
BUCKETS = 2 * 500_000_000  # the student's gradient bucket (reduce_bucket_size)
PREFETCH = 2 * 50_000_000  # each model's parameters gathered ahead (stage3_prefetch_bucket_size)


def test_under_zero3_each_gpu_holds_its_share_of_student_and_teacher_and_what_deepspeed_gathers():
    one, two, four = (estimate("float32", "adamw", processes=n, zero3=Zero3()) for n in (1, 2, 4))
    # DeepSpeed's 16 bytes a parameter halved, plus the head gathered with its gradient, the prefetch and the bucket
    assert two.student == 16 * N_8B // 2 + 4 * HEAD_8B + PREFETCH + BUCKETS
    assert two.teacher == 2 * N_8B // 2 + 2 * HEAD_8B + PREFETCH
    # each process runs its own micro-batch through a whole layer at a time: activations as on one GPU
    assert (two.activations, two.quantized_weights, two.logits) == (one.activations, one.quantized_weights, one.logits)
    h100_free = 78.6 * GIB
    # fp32 latent weights and AdamW for 8B at 8 x 2048 tokens a GPU: 4 GPUs under ZeRO-3, not 2
    fits = {"param_dtype": "float32", "optimizer": "adamw", "gradient_checkpointing": True, "deepspeed": True}
    assert fit_error(four, h100_free, **fits, processes=4, zero3=Zero3()) is None
    eager = estimate("float32", "adamw", checkpointing=False, processes=4, zero3=Zero3())
    message = fit_error(eager, h100_free, **{**fits, "gradient_checkpointing": False}, processes=4, zero3=Zero3())
    # DeepSpeed refuses param_dtype bfloat16 and adamw_8bit: not offered
    assert "free: try gradient_checkpointing: true, offload_optimizer.device: cpu in the DeepSpeed" in message
    assert "bfloat16" not in message and "adamw_8bit" not in message


def test_an_8b_step_on_two_80gb_gpus_under_zero3_is_refused_without_offload_and_fits_with_the_optimizer_offloaded():
    """Qwen3-8B, fp32 AdamW (DeepSpeed's), 8 x 2048 tokens a GPU, checkpointing, 2 processes: the issue's setting."""
    settings = {"param_dtype": "float32", "optimizer": "adamw", "gradient_checkpointing": True, "deepspeed": True}
    h100_free = 78.6 * GIB
    plain = estimate("float32", "adamw", processes=2, zero3=Zero3())
    message = fit_error(plain, h100_free, **settings, processes=2, zero3=Zero3())
    assert plain.total / GIB > 90 and message is not None
    assert (
        "try offload_optimizer.device: cpu in the DeepSpeed config's zero_optimization (accelerate launch "
        "--offload_optimizer_device cpu), offload_param.device: cpu in the DeepSpeed config's zero_optimization "
        "(accelerate launch --offload_param_device cpu), or a smaller batch_size" in message
    )
    offloaded = Zero3(offload_optimizer=True)
    optimizer_off = estimate("float32", "adamw", processes=2, zero3=offloaded)
    # by hand: the GPU keeps the student's bf16 partition (2 bytes a parameter, halved), not its fp32 master weights,
    # gradient partitions or moments (CPU RAM), plus what it gathers and its gradient bucket; the teacher as before
    assert optimizer_off.student == 2 * N_8B // 2 + 4 * HEAD_8B + PREFETCH + BUCKETS  # 8.19 + 2.49 + 0.1 + 1.0 GB
    assert optimizer_off.teacher == plain.teacher
    assert plain.student - optimizer_off.student == 14 * N_8B // 2  # 53.4 GiB moved to CPU RAM
    assert fit_error(optimizer_off, h100_free, **settings, processes=2, zero3=offloaded) is None
    assert 38 < optimizer_off.total / GIB < 43
    # offload_param moves both models' bf16 partitions off the GPU too: only what is gathered stays
    both = estimate("float32", "adamw", processes=2, zero3=Zero3(offload_optimizer=True, offload_param=True))
    assert (both.student, both.teacher) == (4 * HEAD_8B + PREFETCH + BUCKETS, 2 * HEAD_8B + PREFETCH)
    # offload_param alone: the bf16 partitions leave, the optimizer's other 14 bytes a parameter stay on the GPU
    params_off = estimate("float32", "adamw", processes=2, zero3=Zero3(offload_param=True))
    assert params_off.student == 14 * N_8B // 2 + 4 * HEAD_8B + PREFETCH + BUCKETS
    assert params_off.total > 0.95 * h100_free  # at the edge of an H100, where offload_optimizer leaves half free


def test_under_zero3_sft_counts_no_teacher():
    assert estimate("float32", "adamw", processes=2, zero3=Zero3(), teacher_total=0).teacher == 0


def test_zero3_settings_are_read_from_the_deepspeed_config_accelerate_holds():
    # as `accelerate launch --use_deepspeed --zero_stage 3 --offload_optimizer_device cpu` writes it: DeepSpeed's
    # default bucket sizes
    launched = {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "nvme_path": None},
            "offload_param": {"device": "none", "nvme_path": None},
        }
    }
    assert Zero3.of(launched, hidden_size=4096) == Zero3(offload_optimizer=True)
    # a config file's "auto" sizes are those accelerate fills in from the hidden size
    auto = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}}
    assert Zero3.of(auto, hidden_size=4096) == Zero3(
        reduce_bucket_size=4096**2, prefetch_bucket_size=int(0.9 * 4096**2)
    )
    nvme = {"zero_optimization": {"offload_param": {"device": "nvme"}, "reduce_bucket_size": 2e8}}
    assert Zero3.of(nvme, hidden_size=4096) == Zero3(offload_param=True, reduce_bucket_size=200_000_000)


def test_compiled_layers_are_estimated_from_the_measured_share_not_refused_as_eager():
    """1.7B, bf16 latent weights and 8-bit AdamW, no checkpointing, layers compiled: 56.5 GiB measured on an H100
    (bench/kd_qat.py, docs/results/scale). Counted as eager (94 GiB) the stage would refuse a step that runs."""
    qwen3_1_7b = Qwen3Config(**QWEN3_SIZES["1.7b"])
    n = 1_720_574_976  # parameters of that shape (tied embeddings)
    settings = dict(param_dtype="bfloat16", optimizer="adamw_8bit", gradient_checkpointing=False)
    eager, compiled = (
        kd_step_memory(
            qwen3_1_7b,
            trainable=n,
            student_total=n,
            teacher_total=n,
            teacher_bytes=2,
            tokens=8 * 2048,
            chunk_size=2048,
            activation_quant=False,
            compiled=compiled,
            **settings,
        )
        for compiled in (False, True)
    )
    h100_free = 78.6 * GIB
    assert fit_error(eager, h100_free, **settings) is not None
    assert fit_error(compiled, h100_free, **settings) is None
    assert abs(compiled.total / GIB - 56.5) / 56.5 < 0.15
    assert (compiled.student, compiled.teacher, compiled.logits) == (eager.student, eager.teacher, eager.logits)


def smollm2_w4a4kv4_step(trained_transform_width: int):
    """SmolLM2-135M's W4A4KV4 KD step of recipes/smollm2-study-w4a4kv4.yaml's kd_flatquant_reference: 16 sequences of
    up to 587 tokens (the longest of the 4,000 reference solutions with its prompt in SmolLM2's tokenizer; 16 x 587
    tokens give the 19.8 GiB the stage logged, run-6-h200-reference.log), fp32 latent weights, AdamW, eager."""
    from transformers import LlamaConfig

    return kd_step_memory(
        LlamaConfig(**REAL_SHAPES["artifacts/smollm2-135m-instruct"][1]),
        trainable=135_189_138,  # the stage's log: weights, transforms and clips
        student_total=135_189_138,
        teacher_total=134_515_008,
        teacher_bytes=2,
        param_dtype="float32",
        optimizer="adamw",
        tokens=16 * 587,
        chunk_size=2048,
        gradient_checkpointing=False,
        activation_quant=True,
        trained_transform_width=trained_transform_width,
    )


def test_trained_online_transforms_count_what_their_gradients_keep():
    """Measured on an H200 (docs/results/smollm2/): 28.3 GiB peak with FlatQuant's five transforms a layer trained;
    the estimate without them said 19.8, and 8 GiB too little is an out-of-memory error where a refusal was due.
    The one measurement there is: this pins the count of 8 bytes an element to it (within 5%)."""
    h, i = 576, 1536
    width = 3 * h + i + (9 + 3) * 64  # inputs of q/k/v, o_proj, gate/up and down_proj; every query and key head
    assert abs(smollm2_w4a4kv4_step(0).total / GIB - 19.8) < 0.05
    assert abs(smollm2_w4a4kv4_step(width).total / GIB - 28.3) / 28.3 < 0.05


@pytest.mark.parametrize("transforms", ["frozen", "trainable"])
def test_the_width_through_trained_transforms_is_read_off_the_student(transforms):
    """A QuaRot student (Llama family: 3 heads, 1 KV head of 64, MLP 320) keeps online transforms before o_proj and
    down_proj and on the attention's queries and keys; only trained ones count."""
    from pipeline.quant.apply import calibrate, prepare
    from pipeline.quant.methods import quarot
    from pipeline.quant.online import transform_parameters
    from pipeline.quant.scheme import QuantSpec
    from quant_tiny import family_model

    student = family_model("llama", vocab_size=64)
    prepare(student, QuantSpec.model_validate("w4a4kv4"))
    quarot.rotate(student)
    calibrate(student)
    for p in transform_parameters(student):
        p.requires_grad_(transforms == "trainable")
    expected = 3 * 64 + 320 + (3 + 1) * 64 if transforms == "trainable" else 0
    assert trained_transform_width(student) == expected
