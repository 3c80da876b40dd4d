"""PTQ: GPTQ through llmcompressor becomes our QuantLinear model exactly; GPTQ beats RTN on layer
outputs; the ptq stage writes a model pipeline.load_quantized reads back with identical logits."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.engine.errors import InputError
from pipeline.engine.stage_api import StageContext
from pipeline.models import Qwen3Arch
from pipeline.quant import sqnr
from pipeline.quant.apply import quant_linears, quantize_rtn
from pipeline.quant.calibration import generic_samples, packed_traces_samples, traces_samples
from pipeline.quant.methods.gptq import gptq_modifier, run_gptq
from pipeline.quant.scheme import QuantSpec
from quant_tiny import one_thread, save_tiny, write_traces
from stages import ptq

W3G128 = QuantSpec.model_validate("w3g128")


def _recipe(spec: QuantSpec) -> SimpleNamespace:
    """What ptq.run reads of a recipe."""
    return SimpleNamespace(quant=spec, seed=0, model=SimpleNamespace(trust_remote_code=False))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptq")
    return SimpleNamespace(dir=save_tiny(root / "teacher"), traces=write_traces(root / "traces", n=8))


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_gptq_is_llmcompressors_exactly_and_beats_rtn(teacher):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(teacher.dir)
    samples = traces_samples(tok, teacher.traces, nsamples=8, seqlen=256, seed=0)

    bare = _load(teacher.dir)  # llmcompressor's own oneshot, nothing of ours after it
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from pipeline.quant.calibration import calibration_loader

    oneshot(
        model=bare,
        recipe=gptq_modifier(bare, W3G128, 128, 0.01, "static", "minmax"),
        dataset=calibration_loader(samples),
        processor=tok,
    )
    active_session().reset()

    model = _load(teacher.dir)
    originals = sqnr.snapshot_weights(model, W3G128)
    names = run_gptq(model, tok, W3G128, samples, block_size=128, dampening_frac=0.01, actorder="static")
    assert len(names) == 14
    for name, module in quant_linears(model):
        gptq_weight = bare.get_submodule(name).weight
        # our fake quantization of the latent weight is GPTQ's quantized weight, to the bit
        torch.testing.assert_close(module.quantized_weight(), gptq_weight, atol=0, rtol=0)
        torch.testing.assert_close(module.weight_scale, bare.get_submodule(name).weight_scale, atol=0, rtol=0)

    rtn = _load(teacher.dir)
    quantize_rtn(rtn, W3G128)
    gptq_report = sqnr.layer_sqnr(model, originals, samples[:4])
    rtn_report = sqnr.layer_sqnr(rtn, originals, samples[:4])
    gptq_out = [r["output_sqnr"] for r in gptq_report]
    rtn_out = [r["output_sqnr"] for r in rtn_report]
    assert sum(gptq_out) / len(gptq_out) > sum(rtn_out) / len(rtn_out) + 1.0  # dB
    assert sum(g > r for g, r in zip(gptq_out, rtn_out)) >= 12


def test_generic_samples(teacher):
    tok = AutoTokenizer.from_pretrained(teacher.dir)
    samples = generic_samples(tok, nsamples=3, seqlen=64, seed=0)
    assert [len(s) for s in samples] == [64] * 3 and samples == generic_samples(tok, 3, 64, 0)
    assert "boxed" not in tok.decode(sum(samples, []))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_stage_run_and_reload(teacher, tmp_path, method):
    config = ptq.Config(model="teacher", calibration="traces", method=method, nsamples=6, seqlen=128, sqnr_samples=2)
    ctx = StageContext(
        name="ptq",
        config=config,
        recipe=_recipe(W3G128),
        out_dir=tmp_path,
        inputs={"model": teacher.dir, "calibration": teacher.traces},
        input_manifests={"model": {}, "calibration": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    metrics = ptq.run(ctx)
    assert metrics["quantized_layers"] == 14 and metrics["wall_time_s"] > 0
    assert 0 < metrics["output_sqnr_min"] <= metrics["output_sqnr_mean"] < 40
    assert 0 < metrics["hidden_sqnr"] < 60
    assert len(json.loads((tmp_path / "sqnr.json").read_text())) == 14

    loaded = pipeline.load_quantized(tmp_path)
    x = torch.randint(0, 200, (2, 21), generator=torch.Generator().manual_seed(1))
    reference = _load(teacher.dir)
    quantized = dict(quant_linears(loaded))
    with torch.no_grad():  # the saved model is the fake-quant model: rebuild it from its weights and compare
        for name, module in quantized.items():
            reference.get_submodule(name).weight.copy_(module.quantized_weight())
        assert torch.equal(loaded(x).logits, reference(x).logits)


def test_stage_lowers_group_sizes_it_does_not_divide_and_says_so(tmp_path, caplog):
    teacher = save_tiny(tmp_path / "teacher", family="llama")  # hidden 192, intermediate 320
    config = ptq.Config(
        model="teacher", method="rtn", calibration_source="generic", nsamples=2, seqlen=32, sqnr_samples=1
    )
    ctx = StageContext(
        name="ptq",
        config=config,
        recipe=SimpleNamespace(quant=W3G128, seed=0, model=SimpleNamespace(trust_remote_code=False)),
        out_dir=tmp_path / "ptq",
        inputs={"model": teacher},
        input_manifests={"model": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    (tmp_path / "ptq").mkdir()
    with caplog.at_level(logging.WARNING, logger="test"):
        metrics = ptq.run(ctx)
    assert metrics["lowered_group_size_layers"] == 14
    record = json.loads((tmp_path / "ptq" / "model" / "reasoning_qat_quant.json").read_text())
    assert record["lowered_group_sizes"]["model.layers.0.self_attn.q_proj"] == 96
    assert record["lowered_group_sizes"]["model.layers.1.mlp.down_proj"] == 64
    assert (
        "quant.weights.group_size 128 does not divide in_features 320: 2 layers (model.layers.0.mlp.down_proj, ...) "
        "use group size 64 (group_size_policy largest_divisor)"
    ) in caplog.messages
    loaded = pipeline.load_quantized(tmp_path / "ptq")
    assert loaded.model.layers[1].mlp.down_proj.weights.group_size == 64


def _double_precision_layer_sqnr(model, originals, samples):
    """The SQNR report's reference: every QuantLinear's output against x @ W_original^T, all in float64,
    on the fake-quantizing forward."""
    import math

    energy = {}

    def hook(name, module, args, output):
        reference = torch.nn.functional.linear(args[0].double(), originals[name].double(), None)
        signal, noise = energy.get(name, (0.0, 0.0))
        energy[name] = (
            signal + float(reference.square().sum()),
            noise + float((reference - output.double()).square().sum()),
        )

    hooks = [m.register_forward_hook(lambda m, a, o, n=n: hook(n, m, a, o)) for n, m in quant_linears(model)]
    with torch.no_grad():
        logits = [model(torch.tensor([s])).logits[0] for s in samples]
    for h in hooks:
        h.remove()
    return {n: 10 * math.log10(s / e) for n, (s, e) in energy.items()}, logits


def test_sqnr_report_in_one_pass(teacher):
    """One forward pass per sample gives the per-layer report and the final outputs; a weight-only model runs
    it on q(w) computed once, which changes neither (against the fake-quantizing forward, in float64)."""
    tok = AutoTokenizer.from_pretrained(teacher.dir)
    samples = traces_samples(tok, teacher.traces, nsamples=3, seqlen=64, seed=0)
    model = _load(teacher.dir)
    originals = sqnr.snapshot_weights(model, W3G128)
    quantize_rtn(model, W3G128)
    report, hidden, logits = sqnr.layer_sqnr_and_outputs(model, originals, samples)
    expected, expected_logits = _double_precision_layer_sqnr(model, originals, samples)
    assert [r["layer"] for r in report] == list(expected)
    assert [r["output_sqnr"] for r in report] == pytest.approx(list(expected.values()), rel=1e-4)
    for ours, reference in zip(logits, expected_logits):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert [len(h) for h in hidden] == [len(s) for s in samples]


def _ptq_context(teacher, tmp_path, **config):
    config = ptq.Config(model="teacher", calibration="traces", **config)
    return StageContext(
        name="ptq",
        config=config,
        recipe=SimpleNamespace(quant=W3G128, seed=0, model=SimpleNamespace(trust_remote_code=False)),
        out_dir=tmp_path,
        inputs={"model": teacher.dir, "calibration": teacher.traces},
        input_manifests={"model": {}, "calibration": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )


def test_sqnr_report_is_optional_and_truncated(teacher, tmp_path, caplog):
    off = ptq.run(_ptq_context(teacher, tmp_path / "off", method="rtn", nsamples=4, seqlen=64, sqnr_samples=0))
    assert (
        set(off) == {"wall_time_s", "quantized_layers", "calibration_tokens", "lowered_group_size_layers"}
        and off["quantized_layers"] == 14
    )
    assert not (tmp_path / "off" / "sqnr.json").exists() and pipeline.load_quantized(tmp_path / "off") is not None
    with caplog.at_level(logging.INFO):
        on = ptq.run(
            _ptq_context(teacher, tmp_path / "on", method="rtn", nsamples=4, seqlen=64, sqnr_samples=2, sqnr_seqlen=16)
        )
    assert "per-layer SQNR (dB), rtn, traces text, 2 x 16 tokens" in caplog.text
    assert {"output_sqnr_mean", "logits_sqnr", "hidden_sqnr"} <= set(on)
    assert len(json.loads((tmp_path / "on" / "sqnr.json").read_text())) == 14


def test_generic_calibration_from_a_user_corpus(teacher, tmp_path):
    tok = AutoTokenizer.from_pretrained(teacher.dir)
    corpus = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen liquor jugs. " * 20]
    samples = generic_samples(tok, nsamples=3, seqlen=32, seed=0, texts=corpus)
    assert [len(s) for s in samples] == [32] * 3
    assert all(tok.decode(s) in "\n\n".join(corpus) for s in samples)
    with pytest.raises(InputError, match="seqlen: the calibration text has .* tokens, not more than seqlen 100000"):
        generic_samples(tok, nsamples=1, seqlen=100_000, seed=0, texts=corpus)
    with pytest.raises(ValidationError, match="calibration_text is the generic source"):
        ptq.Config(model="teacher", calibration="traces", calibration_text="c.jsonl")
    config = ptq.Config(
        model="model", method="rtn", calibration_source="generic", calibration_text=str(tmp_path / "c.jsonl")
    )
    local = SimpleNamespace(
        model=SimpleNamespace(arch=None, path=str(teacher.dir), trust_remote_code=False), quant=W3G128
    )
    assert ptq.check(config, local) == [("calibration_text", f"no such file: {tmp_path / 'c.jsonl'}")]


def test_config_and_check_errors(teacher):
    with pytest.raises(ValidationError, match="needs `calibration"):
        ptq.Config(model="teacher")
    with pytest.raises(ValidationError, match="drop one"):
        ptq.Config(model="teacher", calibration="traces", calibration_source="generic")
    recipe = SimpleNamespace(
        model=SimpleNamespace(arch=Qwen3Arch(hidden_size=128, intermediate_size=100, head_dim=32)), quant=W3G128
    )
    errors = ptq.check(ptq.Config(model="model", method="rtn"), recipe)
    assert errors == [
        (
            "quant.weights.group_size",
            "model.layers.0.mlp.down_proj: 128 does not divide in_features 100, "
            "nor does any smaller multiple of 32 (and 1 more layers)",
        )
    ]
    local = SimpleNamespace(
        model=SimpleNamespace(arch=None, path=str(teacher.dir), trust_remote_code=False), quant=W3G128
    )
    assert ptq.check(ptq.Config(model="model", method="rtn"), local) == []
    g512 = QuantSpec.model_validate({"preset": "w3g128", "weights": {"group_size": 512, "group_size_policy": "exact"}})
    assert ptq.check(ptq.Config(model="model", method="rtn"), SimpleNamespace(model=local.model, quant=g512))[0] == (
        "quant.weights.group_size",
        "model.layers.0.self_attn.q_proj: 512 does not divide in_features 256 (group_size_policy: exact) (and 11 "
        "more layers)",
    )


W4A4KV4 = QuantSpec.model_validate("w4a4kv4")


@pytest.mark.parametrize("method,weight_method", [("quarot", "gptq"), ("flatquant", "rtn"), ("flatquant", "gptq")])
def test_stage_w4a4kv4_transform_methods(teacher, tmp_path, method, weight_method):
    config = ptq.Config.model_validate(
        {
            "type": "ptq",
            "model": "teacher",
            "calibration": "traces",
            "method": method,
            "weight_method": weight_method,
            "nsamples": 4,
            "seqlen": 64,
            "sqnr_samples": 2,
            **({"epochs": 1} if method == "flatquant" else {}),
        }
    )  # quarot has no epochs
    ctx = StageContext(
        name="ptq",
        config=config,
        recipe=_recipe(W4A4KV4),
        out_dir=tmp_path,
        inputs={"model": teacher.dir, "calibration": teacher.traces},
        input_manifests={"model": {}, "calibration": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    metrics = ptq.run(ctx)
    assert metrics["quantized_layers"] == 14 and 0 < metrics["logits_sqnr"] < 60
    assert 0 < metrics["output_sqnr_min"] <= metrics["output_sqnr_mean"] < 40
    assert ("hidden_sqnr" in metrics) == (method == "flatquant")
    if method == "flatquant":
        assert len(json.loads((tmp_path / "flatquant.json").read_text())) == 2
        assert metrics["flatquant_mse_mean"] <= metrics["flatquant_mse_init_mean"]
    loaded = pipeline.load_quantized(tmp_path)
    x = torch.randint(0, 200, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_logits = _load(teacher.dir)(x).logits
        from pipeline.quant.apply import set_fake_quant

        quantized = loaded(x).logits
        set_fake_quant(loaded, False)
        unquantized = loaded(x).logits
    # weights: fake-quant off shows the transformed full-precision latent weights, except after GPTQ
    # (its latent weights are the quantized ones), so only RTN's equal the teacher
    if weight_method == "rtn":
        assert (unquantized - teacher_logits).abs().max() < 1e-4
    assert (quantized - teacher_logits).abs().max() > 1e-3


def test_transform_methods_need_every_decoder_linear(teacher, tmp_path):
    spec = QuantSpec.model_validate({"preset": "w4a4kv4", "targets": ["re:.*self_attn.*"]})
    config = ptq.Config(
        model="teacher", method="quarot", calibration_source="generic", nsamples=1, seqlen=32, sqnr_samples=1
    )
    ctx = StageContext(
        name="ptq",
        config=config,
        recipe=_recipe(spec),
        out_dir=tmp_path,
        inputs={"model": teacher.dir},
        input_manifests={"model": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    with pytest.raises(InputError, match="quant.targets: quarot: rotate needs the model prepared"):
        ptq.run(ctx)
    with pytest.raises(ValidationError, match="needs `calibration"):
        ptq.Config(model="teacher", method="flatquant")


def test_flatquant_batch_size_is_left_out_of_old_configs_and_batches_the_steps(teacher, tmp_path):
    from pipeline.engine.stage_api import result_config

    base = {
        "type": "ptq",
        "model": "teacher",
        "calibration": "traces",
        "method": "flatquant",
        "nsamples": 4,
        "seqlen": 64,
        "epochs": 1,
        "sqnr_samples": 1,
    }
    # unset, the key is not in what the fingerprint hashes: flatquant artifacts made before it stay current
    assert "batch_size" not in result_config(ptq.Config, ptq.Config.model_validate(base).model_dump(mode="json"))
    config = ptq.Config.model_validate({**base, "batch_size": 4})
    assert result_config(ptq.Config, config.model_dump(mode="json"))["batch_size"] == 4
    ctx = StageContext(
        name="ptq",
        config=config,
        recipe=_recipe(W4A4KV4),
        out_dir=tmp_path,
        inputs={"model": teacher.dir, "calibration": teacher.traces},
        input_manifests={"model": {}, "calibration": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    ptq.run(ctx)
    report = json.loads((tmp_path / "flatquant.json").read_text())
    # the traces are packed into 4 windows of 64 tokens: one batch of 4, one step a layer
    assert [r["steps"] for r in report] == [1] * 2


def test_packed_traces_samples_are_equal_windows_of_the_traces(teacher):
    tokenizer = AutoTokenizer.from_pretrained(teacher.dir)
    whole = [t for s in traces_samples(tokenizer, teacher.traces, 8, 10**6, 0) for t in s]  # same seeded order
    windows = packed_traces_samples(tokenizer, teacher.traces, 3, 16, 0)
    assert [len(w) for w in windows] == [16, 16, 16] and [t for w in windows for t in w] == whole[:48]
    assert len(packed_traces_samples(tokenizer, teacher.traces, 10**4, 16, 0)) == len(whole) // 16
    with pytest.raises(InputError, match="fewer than one window of seqlen"):
        packed_traces_samples(tokenizer, teacher.traces, 1, len(whole) + 1, 0)


def test_a_key_of_another_method_is_refused_in_one_line_naming_it_and_the_method():
    from pipeline.engine.recipe import RecipeError, parse_recipe

    def errors(**stage):
        raw = {
            "name": "r",
            "model": {"arch": {"hidden_size": 64, "intermediate_size": 128, "head_dim": 32}},
            "quant": "w3g128",
            "stages": {"q": {"type": "ptq", "calibration_source": "generic", **stage}},
        }
        with pytest.raises(RecipeError) as e:
            parse_recipe(raw)
        return e.value.errors

    assert errors(epochs=3) == [("stages.q.epochs", "is a key of method flatquant, not of method gptq")]
    assert errors(method="rtn", block_size=64) == [
        ("stages.q.block_size", "is a key of methods gptq, quarot and flatquant, not of method rtn")
    ]
    assert errors(method="quarot", batch_size=4) == [
        ("stages.q.batch_size", "is a key of method flatquant, not of method quarot")
    ]
    assert errors(method="flatquant", epoch=3) == [("stages.q.epoch", "unknown key (did you mean 'epochs'?)")]
    assert errors(method="flatquant", epochs=-1) == [("stages.q.epochs", "must be >= 0")]
    assert errors(method="awq") == [
        ("stages.q.method", "must be one of 'rtn', 'gptq', 'quarot' or 'flatquant', got 'awq'")
    ]
    with pytest.raises(ValidationError, match="epochs"):
        ptq.Config(method="gptq", calibration="traces", epochs=3)
    # the method's own config, with only its keys; `method` left out is gptq, as before
    assert type(ptq.Config(calibration="traces")) is ptq.Gptq and not hasattr(ptq.Config(method="rtn"), "block_size")
    assert isinstance(ptq.Config(method="flatquant", calibration="traces"), ptq.Config)


# Dumps of the flat Config that every method shared before the per-method configs (#16): what manifests made
# before then record, for the ptq stages of recipes/smollm2-w4a4kv4.yaml and recipes/demo.yaml.
FLAT_DUMPS = [
    {
        "type": "ptq",
        "when": None,
        "model": "model",
        "calibration": None,
        "calibration_source": "traces",
        "calibration_text": None,
        "method": "rtn",
        "weight_method": "rtn",
        "epochs": 15,
        "lr": 0.001,
        "smooth_alpha": 0.5,
        "batch_size": None,
        "nsamples": 4,
        "seqlen": 256,
        "block_size": 128,
        "dampening_frac": 0.01,
        "actorder": "static",
        "observer": "minmax",
        "sqnr_samples": 4,
        "sqnr_seqlen": 256,
    },
    {
        "type": "ptq",
        "when": None,
        "model": "model",
        "calibration": "traces",
        "calibration_source": "traces",
        "calibration_text": None,
        "method": "quarot",
        "weight_method": "gptq",
        "epochs": 15,
        "lr": 0.001,
        "smooth_alpha": 0.5,
        "batch_size": None,
        "nsamples": 16,
        "seqlen": 384,
        "block_size": 128,
        "dampening_frac": 0.01,
        "actorder": "static",
        "observer": "minmax",
        "sqnr_samples": 4,
        "sqnr_seqlen": 256,
    },
    {
        "type": "ptq",
        "when": None,
        "model": "model",
        "calibration": "traces",
        "calibration_source": "traces",
        "calibration_text": None,
        "method": "flatquant",
        "weight_method": "rtn",
        "epochs": 2,
        "lr": 0.001,
        "smooth_alpha": 0.5,
        "batch_size": None,
        "nsamples": 8,
        "seqlen": 256,
        "block_size": 128,
        "dampening_frac": 0.01,
        "actorder": "static",
        "observer": "minmax",
        "sqnr_samples": 4,
        "sqnr_seqlen": 256,
    },
    {
        "type": "ptq",
        "when": None,
        "model": "teacher",
        "calibration": "traces",
        "calibration_source": "traces",
        "calibration_text": None,
        "method": "gptq",
        "weight_method": "rtn",
        "epochs": 15,
        "lr": 0.001,
        "smooth_alpha": 0.5,
        "batch_size": None,
        "nsamples": 64,
        "seqlen": 128,
        "block_size": 128,
        "dampening_frac": 0.01,
        "actorder": "static",
        "observer": "minmax",
        "sqnr_samples": 4,
        "sqnr_seqlen": 256,
    },
]


@pytest.mark.parametrize("recorded", FLAT_DUMPS, ids=[d["method"] for d in FLAT_DUMPS])
def test_manifests_of_the_flat_config_stay_up_to_date(recorded):
    """A manifest written before the per-method configs compares equal to the same stage now, as the runner
    compares them (runner._changed: result_config of the recorded dump against the current config's)."""
    from pipeline.engine.runner import _diff
    from pipeline.engine.stage_api import result_config

    stage = {k: v for k, v in recorded.items() if v is not None}  # the recipe's stage: the keys that apply
    stage = {k: v for k, v in stage.items() if k in ptq.METHODS.members[recorded["method"]].model_fields}
    config = ptq.Config.model_validate(stage)
    # the flat key set, the other methods' keys at their defaults; and the keys added since (ADDED_KEY), at theirs
    assert config.model_dump(mode="json") == {**recorded, "compile": False, "tf32": False}
    now = result_config(type(config), config.model_dump(mode="json"))
    assert _diff(result_config(type(config), recorded), now) == ""  # what _changed reports: nothing
    assert result_config(type(config), recorded) == now and "batch_size" not in now
    before_batch_size = {k: v for k, v in recorded.items() if k != "batch_size"}  # manifests older than that key
    assert result_config(type(config), before_batch_size) == now
