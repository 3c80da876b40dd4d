"""GPTQ export (`--format gptq`): an unpacker written here from the published layout (vLLM's gptq.py and
q_gemm.cu, AutoGPTQ's pack; not our packer) reads the checkpoint back to the fake-quant model's weights:
exactly for a bf16 model, within float16's half ulp of the scale for a float32 one. What GPTQ cannot hold is
refused in one line, exit 2, nothing written. Exported files get the umask's mode.

No reference GPTQ loader runs here: transformers' GPTQ path needs gptqmodel, whose releases (7.7) are source
only, need torch >= 2.14.1 and transformers >= 5.20.2 (outside this project's pins) and build CUDA kernels.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.quant.apply import prepare, quant_linears, quantize_rtn
from pipeline.quant.formats.gptq_format import pack_bits
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.scheme import QuantSpec
from quant_tiny import one_thread, save_tiny


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def unpack_gptq_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] int32 packed along rows -> [rows * 32 / bits, cols] unsigned values.

    3 bits, as vLLM's torch fallback and AutoGPTQ's pack spell it, per three words w0 w1 w2 of 32 values:
    values 0-9 at bits 3j of w0; value 10 = bits 30-31 of w0 and bit 0 of w1; values 11-20 at bits 3j + 1
    of w1; value 21 = bit 31 of w1 and bits 0-1 of w2; values 22-31 at bits 3j + 2 of w2.
    Other widths: value j of a word at bits [bits * j, bits * (j + 1)).
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    if bits != 3:
        per_word = 32 // bits
        shifts = torch.arange(per_word) * bits
        values = (w.unsqueeze(1) >> shifts[None, :, None]) & (2**bits - 1)
        return values.reshape(-1, w.shape[-1])
    w0, w1, w2 = w[0::3], w[1::3], w[2::3]
    parts = [(w0 >> (3 * j)) & 7 for j in range(10)]
    parts.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    parts += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
    parts.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    parts += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return torch.stack(parts, dim=1).reshape(-1, w.shape[-1])


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """W [out, in] float32 from qweight / qzeros / scales / g_idx: (u - (zero + 1)) * scale per g_idx."""
    codes = unpack_gptq_words(tensors["qweight"], bits)  # [in, out]
    zeros = unpack_gptq_words(tensors["qzeros"].t().contiguous(), bits).t() + 1  # [groups, out]
    g = tensors["g_idx"].long()
    w = (codes - zeros[g]).float() * tensors["scales"].float()[g]
    return w.t()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_reads_back_with_the_published_layout(bits):
    values = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 64 * bits // 32)
    assert torch.equal(unpack_gptq_words(packed.t().contiguous(), bits).t(), values)


CASES = {
    "w3g128-bf16": ("w3g128", torch.bfloat16),
    "w3g128-fp32": ("w3g128", torch.float32),
    "w4-channel-sym-bf16": ({"weights": {"num_bits": 4, "group_size": None, "symmetric": True}}, torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(CASES))
def stage(request, tmp_path_factory):
    """A ptq-like stage with an RTN-quantized tiny Qwen3 and the fake-quant weights its forward uses."""
    preset, dtype = CASES[request.param]
    root = tmp_path_factory.mktemp("gptq")
    src = save_tiny(root / "teacher", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    spec = QuantSpec.model_validate(preset)
    quantize_rtn(model, spec)
    save_quantized(model, AutoTokenizer.from_pretrained(src), root / "ptq" / "model", spec)
    with torch.no_grad():
        fake = {name: m.quantized_weight().clone() for name, m in quant_linears(model)}
    plain = {k: v.clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in fake}
    return SimpleNamespace(root=root, path=root / "ptq", spec=spec, dtype=dtype, fake=fake, plain=plain)


def test_gptq_checkpoint_dequantizes_to_the_fake_quant_weights(stage, tmp_path, run_cli):
    out = tmp_path / "ckpt"
    old = os.umask(0o022)
    try:
        code, stdout, _ = run_cli("export", stage.path, "--format", "gptq", "--out", out)
    finally:
        os.umask(old)
    assert code == 0 and "bits per quantized weight" in stdout
    w = stage.spec.weights
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig == json.loads((out / "quantize_config.json").read_text())
    assert {k: qconfig[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act")} == {
        "quant_method": "gptq",
        "bits": w.num_bits,
        "group_size": w.group_size or -1,
        "sym": w.symmetric,
        "desc_act": False,
    }
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}

    state = load_file(out / "model.safetensors")
    for name, fake in stage.fake.items():
        tensors = {k: state.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert tensors["scales"].dtype == torch.float16 and tensors["qweight"].dtype == torch.int32
        assert tensors["qweight"].shape == (fake.shape[1] * w.num_bits // 32, fake.shape[0])
        assert torch.equal(
            tensors["g_idx"], torch.arange(fake.shape[1], dtype=torch.int32) // (w.group_size or fake.shape[1])
        )
        ours = dequantize_gptq(tensors, w.num_bits)
        if stage.dtype == torch.bfloat16:
            # bf16 scales are exact in float16, (u - zp) * scale exact in float32: equal to the bit
            assert torch.equal(ours.to(stage.dtype), fake), name
        else:
            # float32 scales rounded to float16: half an ulp, 2^-11 relative (these scales are all normal)
            assert ((ours - fake).abs() <= 2**-11 * fake.abs()).all(), name
            assert (ours - fake).abs().max() > 0  # a float32 model does lose scale bits
    assert state.keys() == stage.plain.keys()
    assert all(torch.equal(state[k], v) for k, v in stage.plain.items())

    size = pipeline.quant.formats.export.checkpoint_size(out)
    group = w.group_size or 256
    assert w.num_bits < size["bits_per_weight"] < w.num_bits + (16 + w.num_bits) / group + 32 / 128 + 1e-9


def test_eval_of_a_gptq_export_points_to_what_this_project_evaluates(stage, tmp_path, run_cli, monkeypatch):
    """transformers would hand the checkpoint to optimum / gptqmodel (not installed): one line, exit 2, before any
    weights load, naming the engines it is for and what to evaluate instead."""
    assert run_cli("export", stage.path, "--format", "gptq", "--out", tmp_path / "ckpt")[0] == 0
    monkeypatch.setattr("pipeline.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for args, where in (
        ([tmp_path / "ckpt"], "MODEL_DIR"),
        ([stage.path, "--teacher", tmp_path / "ckpt"], "--teacher"),
    ):
        code, stdout, stderr = run_cli("eval", *args, "--perplexity")
        assert (code, stdout) == (2, "")
        assert stderr == (
            f"{where}: {tmp_path / 'ckpt'} is a GPTQ-format checkpoint (export --format gptq), for vLLM / SGLang "
            "(docs/serving.md); evaluate the stage directory it was exported from, or its default (pack-quantized) "
            "export\n"
        )


def test_gptq_stage_and_pack_quantized_modes(tmp_path):
    """The export stage's `format: gptq`; the default format's files also get the umask's mode (0600 before)."""
    import logging

    from pipeline.engine.stage_api import StageContext, result_config
    from stages import export as export_stage

    spec = QuantSpec.model_validate("w3g128")
    path = _quantized_stage(tmp_path, spec, dtype=torch.bfloat16)
    assert "format" in result_config(export_stage.Config, export_stage.Config(model="ptq").model_dump(mode="json"))
    old = os.umask(0o027)
    try:
        for fmt in ("gptq", "pack-quantized"):
            config = export_stage.Config(model="ptq", format=fmt)
            ctx = StageContext(
                name="export",
                config=config,
                out_dir=tmp_path / fmt,
                inputs={"model": path},
                recipe=SimpleNamespace(quant=spec, model=SimpleNamespace(trust_remote_code=False)),
                input_manifests={"model": {}},
                checkpointer=None,
                log=logging.getLogger("test"),
            )
            (tmp_path / fmt).mkdir()
            metrics = export_stage.run(ctx)
            files = list((tmp_path / fmt / "model").iterdir())
            assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o640"} and len(files) > 4
            assert 3 < metrics["bits_per_weight"] < 3.5
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "gptq" / "model" / "config.json").read_text())["quantization_config"]["bits"] == 3


def _quantized_stage(tmp_path, spec, edit=None, dtype=torch.float32):
    src = save_tiny(tmp_path / "teacher", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    quantize_rtn(model, spec)
    if edit is not None:
        edit(model)
    save_quantized(model, AutoTokenizer.from_pretrained(src), tmp_path / "ptq" / "model", spec)
    return tmp_path / "ptq"


def _zero_point_zero(model):
    """One group whose GPTQ zero point is 0 (our z = -4 at 3 bits): v1 stores zero - 1 and cannot."""
    module = quant_linears(model)[0][1]
    module.weight_zero_point[0, 0] = -4


@pytest.mark.parametrize(
    "spec, edit, message",
    [
        ({"weights": {"num_bits": 5, "group_size": 128}}, None, "GPTQ takes 2/3/4/8-bit weights, the model has 5"),
        (
            {"weights": {"num_bits": 3, "group_size": 16}},
            None,
            "group sizes that are multiples of 32, the model has 16",
        ),
        ("w3g128", _zero_point_zero, "1 groups have the zero point 0, which GPTQ v1 stores as -1"),
        (
            {"weights": {"num_bits": 3, "group_size": 128}, "ignore": ["lm_head", "re:.*down_proj"]},
            None,
            "expects every Linear but lm_head quantized; not quantized: model.layers.0.mlp.down_proj",
        ),
    ],
)
def test_gptq_refuses_what_it_cannot_hold(tmp_path, run_cli, capsys, spec, edit, message):
    path = _quantized_stage(tmp_path, QuantSpec.model_validate(spec), edit)
    capsys.readouterr()
    code, _, stderr = run_cli("export", path, "--format", "gptq", "--out", tmp_path / "ckpt")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert stderr.strip().endswith("; export it in the pack-quantized format (the default)")
    assert "Traceback" not in stderr and not (tmp_path / "ckpt").exists()


def test_gptq_refuses_w4a4kv4(tmp_path, run_cli, capsys):
    from quant_tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    spec = QuantSpec.model_validate("w4a4kv4")
    prepare(model, spec)
    pipeline.quant.apply.calibrate(model)
    save_quantized(model, tok, tmp_path / "ptq" / "model", spec)
    capsys.readouterr()
    code, _, stderr = run_cli("export", tmp_path / "ptq", "--format", "gptq", "--out", tmp_path / "ckpt")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "GPTQ checkpoints hold weight-only models" in stderr and "pack-quantized format (the default)" in stderr
    assert not (tmp_path / "ckpt").exists()
