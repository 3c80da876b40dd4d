"""Export to compressed-tensors pack-quantized: stock transformers in a fresh process reproduces our
fake-quant logits, also for a 576-wide model whose groups the policy lowers; pipeline.load_quantized reads the
export back; sizes are what the format implies."""

import argparse
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
from pipeline.cli.export import add_arguments as add_export_arguments, run as cli_export
from pipeline.engine.errors import InputError
from pipeline.quant.apply import quant_linears, quantize_rtn
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.scheme import QuantSpec
from pipeline.engine.stage_api import StageContext
from quant_tiny import moves_whole, one_thread, save_tiny
from stages import export as export_stage

STOCK_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x).logits, sys.argv[3])
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


SMOLLM2_WIDTHS = {
    "family": "llama",
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 384,
    "num_hidden_layers": 1,
}
"""SmolLM2-135M's attention (hidden 576 = 9 heads × 64, 3 KV heads, tied embeddings), one layer, a narrower MLP:
groups of 128 do not divide 576, so q/k/v/o, gate and up take groups of 96 (down_proj's 384 keeps 128)."""


@pytest.fixture(
    scope="module",
    params=[
        ("w3g128", {}),
        ({"weights": {"num_bits": 4, "group_size": None, "symmetric": True}}, {}),
        ("w3g128", SMOLLM2_WIDTHS),
    ],
    ids=["w3g128", "w4-channel-sym", "w3g128-576-wide"],
)
def quantized(request, tmp_path_factory):
    """A ptq-like stage directory holding an RTN-quantized tiny model, its logits on a batch, and its layers'
    group sizes."""
    preset, shape = request.param
    root = tmp_path_factory.mktemp("export")
    src = save_tiny(root / "teacher", **shape)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec = QuantSpec.model_validate(preset)
    quantize_rtn(model, spec)
    save_quantized(model, AutoTokenizer.from_pretrained(src), root / "ptq" / "model", spec)
    x = torch.randint(0, 200, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
    layers = {name: (m.weight.numel(), m.weights.group_size) for name, m in quant_linears(model)}
    return SimpleNamespace(root=root, stage=root / "ptq", spec=spec, x=x, logits=logits, layers=layers)


def _run_export_stage(q, out_dir, scheme=None):
    config = export_stage.Config(model="ptq", scheme=scheme)
    out_dir.mkdir()
    recipe = SimpleNamespace(quant=q.spec, model=SimpleNamespace(trust_remote_code=False))
    ctx = StageContext(
        name="export",
        config=config,
        recipe=recipe,
        out_dir=out_dir,
        inputs={"model": q.stage},
        input_manifests={"model": {}},
        checkpointer=None,
        log=logging.getLogger("test"),
    )
    return export_stage.run(ctx)


def test_stock_transformers_fresh_process_reproduces_logits(quantized, tmp_path):
    metrics = _run_export_stage(quantized, tmp_path / "export")
    ckpt = tmp_path / "export" / "model"
    qconfig = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized" and qconfig["quant_method"] == "compressed-tensors"
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "generation_config.json").exists()

    torch.save(quantized.x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", STOCK_RELOAD, str(ckpt), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        capture_output=True,
    )
    stock = torch.load(tmp_path / "y.pt")
    assert (stock - quantized.logits).abs().max() <= 1e-3

    # and back into our representation, which moves whole to another device (eval on CUDA)
    loaded = pipeline.load_quantized(ckpt)
    with torch.no_grad():
        ours = loaded(quantized.x).logits
    assert (ours - quantized.logits).abs().max() <= 1e-3
    assert moves_whole(loaded)

    # 3-bit codes + one fp32 scale (+ one packed 3-bit zero point when asymmetric) per group of each layer
    w = quantized.spec.weights
    if w.group_size:
        bits = sum(
            n * (w.num_bits + 32 / g + (0 if w.symmetric else w.num_bits / g)) for n, g in quantized.layers.values()
        )
        assert metrics["bits_per_weight"] == pytest.approx(
            bits / sum(n for n, _ in quantized.layers.values()), rel=1e-3
        )
    assert metrics["bits_per_weight"] < 4.5 and metrics["bytes_on_disk"] > metrics["safetensors_bytes"]
    # one config group per group size, which stock transformers applied above: the spec's on its targets, a
    # lowered one on the names of its layers
    groups = {g["weights"]["group_size"]: g["targets"] for g in qconfig["config_groups"].values()}
    assert groups == {
        size: ["Linear"] if size == w.group_size else [n for n, (_, g) in quantized.layers.items() if g == size]
        for size in {g for _, g in quantized.layers.values()}
    }


def test_cli_export(quantized, tmp_path):
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "ckpt"
    scheme = "w3g128" if quantized.spec.weights.group_size else "w4a4kv4"
    if scheme == "w3g128":
        assert cli_export(parser.parse_args([str(quantized.stage), "--scheme", scheme, "--out", str(out)])) == 0
        assert (out / "config.json").exists()
    with pytest.raises(InputError) as e:
        cli_export(parser.parse_args([str(quantized.stage), "--scheme", "w2g128", "--out", str(tmp_path / "x")]))
    assert e.value.where == "scheme" and "does not match the model's scheme" in e.value.message
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="holds no quantized model"):
        cli_export(parser.parse_args([str(quantized.root / "teacher"), "--out", str(tmp_path / "y")]))
