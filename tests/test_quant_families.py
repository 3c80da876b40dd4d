"""Every family users bring (quant_tiny.FAMILIES: Qwen3 with q/k norms and head_dim 128; Qwen2 = R1-Distill-Qwen
with q/k/v biases, head_dim 32 and widths 96/192; Llama = SmolLM2 / R1-Distill-Llama with tied embeddings,
head_dim 64 and widths 192/320) through every quantization path: RTN and GPTQ W3G128 with the group sizes the
policy lowers (96, 64), QuaRot and FlatQuant W4A4KV4 with the 4-bit KV cache after RoPE, KD-QAT, both exports and
their loaders. Every loaded model moves whole with `.to(device)`."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.quant.methods import flatquant, quarot
from pipeline.quant.apply import calibrate, lowered_group_sizes, prepare, quant_linears, quantize_rtn, set_fake_quant
from pipeline.quant.formats.export import export_checkpoint
from pipeline.quant.methods.gptq import gptq_modifier, run_gptq
from pipeline.quant.formats.io import read_quant_spec, save_quantized
from pipeline.quant.online import transform_parameters
from pipeline.quant.scheme import QuantSpec
from quant_tiny import FAMILIES, family_model, moves_whole, one_thread, save_tiny

W3G128 = QuantSpec.model_validate("w3g128")
W4A4KV4 = QuantSpec.model_validate("w4a4kv4")
LOWERED = {"qwen3": set(), "qwen2": {96}, "llama": {96, 64}}
"""The group sizes W3G128 gives each family's layers besides 128 (quant_tiny.FAMILIES's widths)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    teacher = save_tiny(root / "teacher", family=request.param)
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        name=request.param,
        teacher=teacher,
        tokenizer=AutoTokenizer.from_pretrained(teacher),
        samples=[torch.randint(0, 250, (40,), generator=g).tolist() for _ in range(3)],
        x=torch.randint(0, 250, (2, 17), generator=g),
    )


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_rtn_w3g128_lowered_groups_export_and_reload(family, tmp_path):
    model = _load(family.teacher)
    quantize_rtn(model, W3G128)
    assert set(lowered_group_sizes(model, W3G128).values()) == LOWERED[family.name]
    expected = _logits(model, family.x)
    save_quantized(model, family.tokenizer, tmp_path / "ptq" / "model", W3G128)
    saved = pipeline.load_quantized(tmp_path / "ptq")
    assert torch.equal(_logits(saved, family.x), expected)
    assert {n: m.weights for n, m in quant_linears(saved)} == {n: m.weights for n, m in quant_linears(model)}

    export_checkpoint(tmp_path / "ptq", None, tmp_path / "ckpt")
    stock = _load(tmp_path / "ckpt")  # stock transformers + compressed-tensors
    assert (_logits(stock, family.x) - expected).abs().max() <= 1e-5
    exported = pipeline.load_quantized(tmp_path / "ckpt")
    assert (_logits(exported, family.x) - expected).abs().max() <= 1e-5
    sizes = {n: m.weights.group_size for n, m in quant_linears(model)}
    assert {n: m.weights.group_size for n, m in quant_linears(exported)} == sizes
    # the export's config groups are compressed-tensors' own, one per group size used: the spec read back from
    # them has the largest, and each layer keeps its own
    assert read_quant_spec(tmp_path / "ckpt").weights.group_size == max(sizes.values())
    assert moves_whole(saved) and moves_whole(exported)


def test_gptq_is_llmcompressors_with_lowered_groups(family):
    bare = _load(family.teacher)  # llmcompressor's own oneshot on our config groups, nothing of ours after it
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from pipeline.quant.calibration import calibration_loader

    oneshot(
        model=bare,
        recipe=gptq_modifier(bare, W3G128, 128, 0.01, "static", "minmax"),
        dataset=calibration_loader(family.samples),
        processor=family.tokenizer,
    )
    active_session().reset()
    model = _load(family.teacher)
    assert len(run_gptq(model, family.tokenizer, W3G128, family.samples)) == 14
    for name, module in quant_linears(model):
        assert bare.get_submodule(name).quantization_scheme.weights.group_size == module.weights.group_size
        torch.testing.assert_close(module.quantized_weight(), bare.get_submodule(name).weight, atol=0, rtol=0)
    assert set(lowered_group_sizes(model, W3G128).values()) == LOWERED[family.name]


def test_quarot_keeps_the_function_and_its_kv4_decoding_and_export(family, tmp_path):
    reference = family_model(family.name, len(family.tokenizer)).double()
    model = family_model(family.name, len(family.tokenizer)).double()
    prepare(model, W4A4KV4)
    set_fake_quant(model, False)
    quarot.rotate(model, seed=1)
    assert (_logits(model, family.x) - _logits(reference, family.x)).abs().max() < 1e-5
    assert model.lm_head.weight is not model.get_input_embeddings().weight  # a tied head was untied

    model = family_model(family.name, len(family.tokenizer))
    prepare(model, W4A4KV4)
    quarot.rotate(model)
    calibrate(model)
    prompt = family.x[:1, :9]
    with torch.no_grad():  # cached decoding with the 4-bit KV cache on rotated keys = one full forward
        out = model.generate(
            prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
        full = model(out.sequences).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, 8 + step], atol=1e-4, rtol=0)
    _check_w4a4kv4_round_trip(model, family, tmp_path)


def test_flatquant_keeps_the_function_and_exports(family, tmp_path):
    reference = _load(family.teacher)
    model = _load(family.teacher)
    prepare(model, W4A4KV4)
    flatquant.calibrate(model, family.samples[:2], epochs=1)
    set_fake_quant(model, False)
    assert (_logits(model, family.x) - _logits(reference, family.x)).abs().max() < 1e-4
    set_fake_quant(model, True)
    _check_w4a4kv4_round_trip(model, family, tmp_path)
    # KD-QAT trains through it: gradients reach every latent weight (STE of weights, activations and the KV
    # cache) and every transform and learned clip
    model.train()
    trainable = transform_parameters(model) + [m.weight for _, m in quant_linears(model)]
    for p in trainable:
        p.requires_grad_(True)
    model(family.x).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def _check_w4a4kv4_round_trip(model, family, tmp_path):
    """Our layout and the W4A4KV4 export reload to the model that was saved: the same logits, to the bit."""
    expected = _logits(model, family.x)
    save_quantized(model, family.tokenizer, tmp_path / "ptq" / "model", W4A4KV4)
    saved = pipeline.load_quantized(tmp_path / "ptq")
    assert torch.equal(_logits(saved, family.x), expected)
    export_checkpoint(tmp_path / "ptq", "w4a4kv4", tmp_path / "ckpt")
    exported = pipeline.load_quantized(tmp_path / "ckpt")
    assert torch.equal(_logits(exported, family.x), expected)
    assert moves_whole(saved) and moves_whole(exported)


def test_kd_qat_trains_a_lowered_group_student_and_saves_it(family, tmp_path):
    import stages.kd_qat as kd_qat
    from pipeline.engine.checkpoint import Checkpointer
    from pipeline.engine.recipe import parse_recipe
    from pipeline.engine.stage_api import StageContext
    from quant_tiny import write_traces

    student = _load(save_tiny(tmp_path / "other", seed=1, family=family.name))
    quantize_rtn(student, W3G128)
    save_quantized(student, family.tokenizer, tmp_path / "ptq" / "model", W3G128)
    recipe = parse_recipe(
        {
            "name": "t",
            "seed": 0,
            "model": {"path": "org/tiny", "dtype": "float32"},
            "quant": "w3g128",
            "stages": {
                "teacher": {"type": "sft"},
                "traces": {"type": "traces", "model": "teacher"},
                "ptq": {"type": "ptq", "model": "teacher", "method": "rtn", "calibration_source": "generic"},
                "kd": {
                    "type": "kd_qat",
                    "init": "ptq",
                    "teacher": "teacher",
                    "data": "traces",
                    "steps": 2,
                    "batch_size": 4,
                    "warmup_steps": 0,
                    "lr": 3e-3,
                    "checkpoint_every": 0,
                },
            },
        }
    )
    ctx = StageContext(
        name="kd",
        config=recipe.stages["kd"],
        recipe=recipe,
        out_dir=tmp_path / "out",
        inputs={"init": tmp_path / "ptq", "teacher": family.teacher, "data": write_traces(tmp_path / "traces", n=4)},
        input_manifests={},
        checkpointer=Checkpointer(tmp_path / "ckpt"),
        log=logging.getLogger("t"),
    )
    assert kd_qat.run(ctx)["steps"] == 2
    trained = pipeline.load_quantized(tmp_path / "out")
    assert set(lowered_group_sizes(trained, W3G128).values()) == LOWERED[family.name]
    before = dict(quant_linears(student))
    assert all(not torch.equal(m.weight, before[n].weight) for n, m in quant_linears(trained))
