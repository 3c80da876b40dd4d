"""Stage `kd_qat`: distils a teacher into the quantized student; the loss is the KD of the full logits."""

import json
import logging

import pytest
import torch

import stages.kd_qat as kd_qat
from pipeline.data.chat import chat_example
from pipeline.engine.checkpoint import Checkpointer
from pipeline.engine.recipe import RecipeError, parse_recipe
from pipeline.engine.stage_api import StageContext
from pipeline.models import load_model, load_tokenizer
from pipeline.quant.apply import quant_linears, quantize_rtn
from pipeline.quant.formats.io import load_quantized, save_quantized
from pipeline.quant.scheme import QuantSpec
from pipeline.train.distill import token_divergence
from pipeline.train.loop import collate
from quant_tiny import one_thread, save_tiny, write_traces

TRAIN = {"steps": 6, "batch_size": 4, "warmup_steps": 0, "lr": 3e-3, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    save_tiny(root / "teacher" / "model", seed=0)
    # the student starts from a different model so there is something to distil
    student = load_model(save_tiny(root / "other", seed=1))
    spec = QuantSpec.model_validate("w3g128")
    quantize_rtn(student, spec)
    save_quantized(student, load_tokenizer(root / "other"), root / "ptq" / "model", spec)
    write_traces(root / "traces", n=8)
    return root


def recipe(**stage):
    return parse_recipe(
        {
            "name": "t",
            "seed": 0,
            "model": {"path": "org/tiny", "dtype": "float32"},
            "quant": "w3g128",
            "stages": {
                "teacher": {"type": "sft"},
                "traces": {"type": "traces", "model": "teacher"},
                "ptq": {"type": "ptq", "model": "teacher", "method": "rtn", "calibration_source": "generic"},
                "kd": {"type": "kd_qat", "init": "ptq", "teacher": "teacher", "data": "traces", **TRAIN, **stage},
            },
        }
    )


def run(artifacts, tmp_path, init=None, **stage):
    """The kd stage of `recipe(**stage)` from `init` (the RTN student at artifacts/ptq by default)."""
    rec = recipe(**stage)
    ctx = StageContext(
        name="kd",
        config=rec.stages["kd"],
        recipe=rec,
        out_dir=tmp_path / "out",
        inputs={"init": init or artifacts / "ptq", "teacher": artifacts / "teacher", "data": artifacts / "traces"},
        input_manifests={},
        checkpointer=Checkpointer(tmp_path / "ckpt"),
        log=logging.getLogger("t"),
    )
    with one_thread():
        return kd_qat.run(ctx)


def _kl_to_teacher(student, teacher, tokenizer, traces):
    rows = [json.loads(line) for line in open(traces / "traces.jsonl")]
    batch = collate([chat_example(tokenizer, r["question"], r["completion"]) for r in rows], tokenizer.pad_token_id)
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    return float(token_divergence(s, t).mean())


def test_loss_fn_is_the_mean_forward_kl_of_the_full_logits_on_completion_tokens(artifacts):
    student, teacher = load_quantized(artifacts / "ptq"), load_model(artifacts / "teacher")
    tok = load_tokenizer(artifacts / "ptq")
    config = recipe(chunk_size=7).stages["kd"]
    with torch.no_grad():
        loss, parts = kd_qat.kd_loss_fn(teacher, config)(
            student,
            collate(
                [
                    chat_example(tok, r["question"], r["completion"])
                    for r in map(json.loads, open(artifacts / "traces" / "traces.jsonl"))
                ],
                tok.pad_token_id,
            ),
        )
    assert loss.item() == pytest.approx(_kl_to_teacher(student, teacher, tok, artifacts / "traces"), rel=1e-5)
    assert parts["kd"] == pytest.approx(loss.item(), rel=1e-6)


def test_kd_brings_the_quantized_student_towards_the_teacher_and_keeps_its_format(artifacts, tmp_path):
    metrics = run(artifacts, tmp_path)
    assert metrics["steps"] == 6 and metrics["examples"] == 8
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert rows[-1]["kd"] < rows[0]["kd"]
    before, after = load_quantized(artifacts / "ptq"), load_quantized(tmp_path / "out")
    teacher, tok = load_model(artifacts / "teacher"), load_tokenizer(artifacts / "ptq")
    assert _kl_to_teacher(after, teacher, tok, artifacts / "traces") < 0.8 * _kl_to_teacher(
        before, teacher, tok, artifacts / "traces"
    )
    b, a = dict(quant_linears(before)), dict(quant_linears(after))
    assert a.keys() == b.keys() and len(a) == 14
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(a[name].weight_scale, b[name].weight_scale)  # train: weights leaves scales alone
    assert not torch.equal(a[name].weight, b[name].weight)


def test_scales_only_moves_the_scales(artifacts, tmp_path):
    run(artifacts, tmp_path, train="scales", steps=2)
    b = dict(quant_linears(load_quantized(artifacts / "ptq")))
    a = dict(quant_linears(load_quantized(tmp_path / "out")))
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(a[name].weight, b[name].weight)
    assert not torch.equal(a[name].weight_scale, b[name].weight_scale)


def test_sft_objective_trains_on_the_traces_without_a_teacher(artifacts, tmp_path):
    metrics = run(artifacts, tmp_path, objective="sft", steps=2)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert metrics["steps"] == 2 and "kd" not in rows[0]


def test_bad_settings_name_their_key():
    with pytest.raises(RecipeError) as e:
        recipe(temperature=0, ce_weight=2)
    assert set(e.value.lines()) == {"stages.kd.temperature: must be > 0", "stages.kd.ce_weight: must be <= 1"}
    with pytest.raises(RecipeError, match="top_k applies to loss forward_kl only"):
        recipe(top_k=5, loss="jsd")
    with pytest.raises(RecipeError, match="stages.kd.warmup_steps: must be <= steps"):
        recipe(warmup_steps=50)


def test_held_out_evaluation_every_n_steps_and_at_the_end(artifacts, tmp_path):
    metrics = run(
        artifacts, tmp_path, steps=5, eval_every=2, eval_limit=3, eval_generation={"max_new_tokens": 4, "batch_size": 3}
    )
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 4, 5]
    assert metrics["eval_accuracy"] == rows[-1]["eval_accuracy"] == 0.0  # a random tiny model solves nothing


@pytest.mark.parametrize("scheme", ["w3g128", "w4a4kv4"])
def test_held_out_evaluation_under_bf16_autocast_with_a_static_cache(artifacts, tmp_path, monkeypatch, scheme):
    """As on a GPU: accelerate wraps the student's forward in bf16 autocast while its latent weights
    stay fp32; decoding during training must not mix fp32 and bf16 in the preallocated KV cache."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def bf16_cpu(*_):  # make_accelerator's report_to and out_dir: no trackers here
        AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
        return Accelerator(mixed_precision="bf16", cpu=True)

    monkeypatch.setattr(kd_qat, "make_accelerator", bf16_cpu)
    init = artifacts / f"ptq-{scheme}"
    if not init.exists():
        student = load_model(artifacts / "other")
        spec = QuantSpec.model_validate(scheme)
        quantize_rtn(student, spec)
        save_quantized(student, load_tokenizer(artifacts / "other"), init / "model", spec)
    generation = {"max_new_tokens": 4, "batch_size": 2, "backend": "static"}
    try:
        metrics = run(artifacts, tmp_path, init, steps=2, eval_every=1, eval_limit=2, eval_generation=generation)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [1, 2]
    # graded on 2 problems (a 4-token answer is seldom right, but can be: the value itself is not the point)
    assert metrics["eval_accuracy"] == rows[-1]["eval_accuracy"] and metrics["eval_accuracy"] in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("transforms", ["frozen", "trainable"])
def test_transforms_of_a_quarot_init_train_only_when_asked(artifacts, tmp_path, transforms):
    """trainable: the online rotations move and every activation quantizer gets a learned clip that starts
    at the scheme's ratio (the student's forward is unchanged at step 0) and is saved with the model;
    frozen: both stay exactly as the PTQ stage left them."""
    from pipeline.quant.apply import calibrate, prepare
    from pipeline.quant.methods import quarot
    from pipeline.quant.online import add_activation_clips
    from pipeline.quant.online import transforms as online_transforms

    init = artifacts / "ptq-quarot"
    spec = QuantSpec.model_validate({"preset": "w4a4kv4", "activations": {"clip_ratio": 0.9}})
    if not init.exists():
        student = load_model(artifacts / "other")
        prepare(student, spec)
        quarot.rotate(student)
        calibrate(student)
        save_quantized(student, load_tokenizer(artifacts / "other"), init / "model", spec)
    before = load_quantized(init)
    x = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = before(x).logits
    assert add_activation_clips(before) == 14
    with torch.no_grad():
        assert torch.equal(before(x).logits, logits)

    run(artifacts, tmp_path, init, transforms=transforms, steps=3)
    after = load_quantized(tmp_path / "out")
    moved = [
        not torch.equal(a.left, b.left) for (_, a), (_, b) in zip(online_transforms(after), online_transforms(before))
    ]
    clips = [m.activation_clip for _, m in quant_linears(after)]
    if transforms == "frozen":
        assert not any(moved) and all(c is None for c in clips)
    else:
        assert all(moved) and len(moved) == 6  # o_proj, down_proj and the keys' rotation of 2 layers
        assert all(c is not None for c in clips) and all(c.item() != pytest.approx(0.9, abs=1e-7) for c in clips)


def test_traces_kept_are_logged_and_none_left_fails_the_stage(artifacts, tmp_path, caplog):
    """A weak teacher's traces: the stage says how many it kept, and refuses to train on none, naming only_correct."""
    from pipeline.data.traces import read_traces
    from pipeline.data.traces import write_traces as write

    wrong = tmp_path / "wrong"
    write(
        [t.model_copy(update={"correct": i == 0}) for i, t in enumerate(read_traces(artifacts / "traces", "x"))], wrong
    )
    links = tmp_path / "links"
    links.mkdir()
    for name in ("ptq", "teacher"):
        (links / name).symlink_to(artifacts / name)
    (links / "traces").symlink_to(wrong)
    with caplog.at_level(logging.INFO):
        assert run(links, tmp_path / "one", steps=1, batch_size=1)["examples"] == 1
    assert "kd: 1 of 8 traces kept (only_correct: true)" in caplog.text

    write([t.model_copy(update={"correct": False}) for t in read_traces(wrong, "x")], wrong)
    with pytest.raises(RuntimeError) as err:
        run(links, tmp_path / "none", steps=1, batch_size=1)
    assert str(err.value).startswith("stages.kd.only_correct: none of the 8 traces was graded correct")
    assert "set only_correct: false to train on every trace" in str(err.value)
    assert run(links, tmp_path / "all", steps=1, batch_size=1, only_correct=False)["examples"] == 8


def _meta_qwen3(size: str):
    """A Qwen3 of a real size on the meta device: counted by the memory estimate, never allocated."""
    from real_shapes import QWEN3_SIZES
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        return Qwen3ForCausalLM(Qwen3Config(**QWEN3_SIZES[size]))


def _fit_ctx(tmp_path, **keys):
    """A kd_qat stage's context as `_fitting` reads it: the config of `keys` (8 sequences a step by default), its
    checkpoints under tmp_path, a log."""
    from types import SimpleNamespace

    config = kd_qat.Config.model_validate(
        {"type": "kd_qat", "init": "ptq", "teacher": "model", "data": "traces", "batch_size": 8, **keys}
    )
    return SimpleNamespace(
        config=config,
        name="student",
        log=logging.getLogger("test"),
        checkpointer=Checkpointer(tmp_path / "ckpt"),
        recipe=SimpleNamespace(seed=0),
    )


def _gpus(monkeypatch, processes=1, distributed="NO", deepspeed_config=None):
    """An accelerator of `processes` 80 GB GPUs with 78.6 GiB free each (an H100's), as `_fitting` sees it."""
    from types import SimpleNamespace

    from accelerate import DistributedType

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(78.6 * 2**30), 80 * 2**30))
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config=deepspeed_config or {})
    return SimpleNamespace(
        distributed_type=getattr(DistributedType, distributed),
        device=torch.device("cuda", 0),
        num_processes=processes,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


TOKENS_2048 = [(list(range(2048)), 256)]


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_the_fit_check_under_zero3_reads_the_optimizer_offload_from_the_deepspeed_config(
    monkeypatch, tmp_path, offload
):
    """Qwen3-8B (meta tensors: only counted), fp32 AdamW, 8 x 2048 tokens a GPU, 2 processes under ZeRO-3 on 80 GB
    GPUs: refused before training, naming the offload lever, unless accelerate's DeepSpeed config (as `accelerate
    launch --use_deepspeed --zero_stage 3 --offload_optimizer_device cpu` writes it) offloads the optimizer."""
    from pipeline.engine.errors import InputError

    monkeypatch.setattr(kd_qat, "_least_free", lambda accelerator: int(78.6 * 2**30))  # the least over the GPUs
    ds_config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": offload, "nvme_path": None}}}
    accelerator = _gpus(monkeypatch, 2, "DEEPSPEED", ds_config)
    ctx = _fit_ctx(tmp_path, batch_size=16, gradient_checkpointing=True)
    student = _meta_qwen3("8b")
    if offload == "cpu":
        assert kd_qat._fitting(ctx, student, TOKENS_2048, accelerator, "bfloat16") is ctx.config  # about 40 GiB
        return
    with pytest.raises(InputError, match="--offload_optimizer_device cpu"):
        kd_qat._fitting(ctx, student, TOKENS_2048, accelerator, "bfloat16")


def test_a_step_that_does_not_fit_takes_the_levers_the_recipe_leaves_unset(monkeypatch, tmp_path, caplog):
    """Qwen3-8B, 8 x 2048 tokens on one 80 GB GPU: as set (fp32 AdamW, no checkpointing) and with checkpointing
    alone it cannot fit; with bf16 latent weights and 8-bit AdamW too it does (70.2 GiB measured on an H100), and
    the stage trains so, saying why."""
    ctx = _fit_ctx(tmp_path)
    with caplog.at_level(logging.INFO):
        chosen = kd_qat._fitting(ctx, _meta_qwen3("8b"), TOKENS_2048, _gpus(monkeypatch), "bfloat16")
    assert (chosen.gradient_checkpointing, chosen.param_dtype, chosen.optimizer) == (True, "bfloat16", "adamw_8bit")
    assert chosen.model_copy(update=dict.fromkeys(kd_qat.LEVERS)) == ctx.config.model_copy(
        update=dict.fromkeys(kd_qat.LEVERS)
    )  # nothing else changed
    estimates = [r.getMessage() for r in caplog.records if "estimated step memory" in r.getMessage()]
    assert len(estimates) == 3 and "with gradient_checkpointing: False, param_dtype: float32" in estimates[0]
    assert (
        "student: training with gradient_checkpointing: True, param_dtype: bfloat16, optimizer: adamw_8bit, to fit "
        "the GPU (fit: levers)" in caplog.text
    )


@pytest.mark.parametrize(
    "keys, advice",
    [
        ({"fit": "refuse"}, "try gradient_checkpointing: true, param_dtype: bfloat16, optimizer: adamw_8bit"),
        ({"gradient_checkpointing": False}, "try gradient_checkpointing: true, or a smaller batch_size"),
        ({"param_dtype": "float32"}, "try param_dtype: bfloat16, or a smaller batch_size"),
    ],
    ids=["fit-refuse", "no-checkpointing-set", "fp32-set"],
)
def test_levers_the_recipe_sets_are_kept_and_a_step_that_cannot_fit_so_is_refused(monkeypatch, tmp_path, keys, advice):
    """`fit: refuse`, or a lever the recipe sets to its default: the 8B step is refused before training, naming what
    is left to try (the other levers taken as far as they go)."""
    from pipeline.engine.errors import InputError

    with pytest.raises(InputError) as refused:
        kd_qat._fitting(_fit_ctx(tmp_path, **keys), _meta_qwen3("8b"), TOKENS_2048, _gpus(monkeypatch), "bfloat16")
    assert str(refused.value).startswith("stages.student: a KD-QAT step needs about ")
    assert advice in str(refused.value)


def _checkpoint(ctx, step: int, config, processes: int = 1) -> None:
    """A checkpoint of `step` as the loop signs it, for a run of `config` over TOKENS_2048's one example."""
    from pipeline.train.loop import run_signature

    signature = run_signature(config, ctx.recipe.seed, len(TOKENS_2048), processes)
    ctx.checkpointer.save(step, {"signature": signature, "x": torch.zeros(1)})


def test_a_checkpoint_made_with_levers_resumes_with_them_and_one_of_other_settings_changes_nothing(
    monkeypatch, tmp_path, caplog
):
    """Qwen3-0.6B fits one 80 GB GPU as set. A checkpoint saved with gradient checkpointing (a run that once had less
    free memory) is resumed with it; one of other settings (another lr, or bf16 latents under DeepSpeed, which cannot
    take them) changes nothing: the loop starts that run over, as it always did."""
    ctx, student, gpu = _fit_ctx(tmp_path), _meta_qwen3("0.6b"), _gpus(monkeypatch)
    assert kd_qat._fitting(ctx, student, TOKENS_2048, gpu, "bfloat16") is ctx.config

    _checkpoint(ctx, 2, ctx.config.model_copy(update={"gradient_checkpointing": True, "lr": 1e-3}))
    assert kd_qat._fitting(ctx, student, TOKENS_2048, gpu, "bfloat16") is ctx.config
    _checkpoint(ctx, 4, ctx.config)
    with caplog.at_level(logging.INFO):
        assert kd_qat._fitting(ctx, student, TOKENS_2048, gpu, "bfloat16") is ctx.config
    assert "training with" not in caplog.text  # its own settings: nothing to say
    _checkpoint(ctx, 6, ctx.config.model_copy(update={"gradient_checkpointing": True}))
    with caplog.at_level(logging.INFO):
        resumed = kd_qat._fitting(ctx, student, TOKENS_2048, gpu, "bfloat16")
    assert resumed == ctx.config.model_copy(update={"gradient_checkpointing": True})
    assert "as its checkpoint was made" in caplog.text

    # under ZeRO-3 the bf16 and 8-bit levers are not on offer: a checkpoint made with them is not resumed
    monkeypatch.setattr(kd_qat, "_least_free", lambda accelerator: int(78.6 * 2**30))
    zero3 = _gpus(monkeypatch, 2, "DEEPSPEED", {"zero_optimization": {"stage": 3}})
    levers = {"gradient_checkpointing": True, "param_dtype": "bfloat16", "optimizer": "adamw_8bit"}
    _checkpoint(ctx, 8, ctx.config.model_copy(update=levers), processes=2)
    chosen = kd_qat._fitting(ctx, student, TOKENS_2048, zero3, "bfloat16")
    assert (chosen.param_dtype, chosen.optimizer) == ("float32", "adamw")


def test_a_checkpoint_whose_settings_no_longer_fit_is_refused_not_cleared(monkeypatch, tmp_path):
    """Qwen3-8B checkpointed with every lever, run again with 40 GiB free: the levers would not fit, and no other
    setting may take over (the loop would clear the checkpoint): refused, naming the checkpoint and both ways out."""
    from pipeline.engine.errors import InputError

    ctx = _fit_ctx(tmp_path)
    levers = {"gradient_checkpointing": True, "param_dtype": "bfloat16", "optimizer": "adamw_8bit"}
    _checkpoint(ctx, 300, ctx.config.model_copy(update=levers))
    gpu = _gpus(monkeypatch)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (40 * 2**30, 80 * 2**30))
    with pytest.raises(InputError) as refused:
        kd_qat._fitting(ctx, _meta_qwen3("8b"), TOKENS_2048, gpu, "bfloat16")
    message = str(refused.value)
    assert "the GPU has 40.0 GiB free" in message
    assert "the checkpoint of step 300 was made with gradient_checkpointing: True, param_dtype: bfloat16, " in message
    assert f"free GPU memory and run again, or delete {ctx.checkpointer.directory} to start over" in message
    assert ctx.checkpointer.latest_step() == 300
