"""Export to compressed-tensors pack-quantized: stock transformers in a fresh process reproduces our
fake-quant logits; pipeline.load_quantized reads the export back; sizes are what the format implies."""
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
from pipeline.errors import InputError
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.export import add_export_arguments, cli_export
from pipeline.quant.io import save_quantized
from pipeline.quant.scheme import QuantSpec
from pipeline.stage_api import StageContext
from quant_tiny import one_thread, save_tiny
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


@pytest.fixture(scope="module", params=["w3g128", {"weights": {"num_bits": 4, "group_size": None, "symmetric": True}}],
                ids=["w3g128", "w4-channel-sym"])
def quantized(request, tmp_path_factory):
    """A ptq-like stage directory holding an RTN-quantized tiny model, and its logits on a batch."""
    root = tmp_path_factory.mktemp("export")
    src = save_tiny(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec = QuantSpec.model_validate(request.param)
    quantize_rtn(model, spec)
    save_quantized(model, AutoTokenizer.from_pretrained(src), root / "ptq" / "model", spec)
    x = torch.randint(0, 200, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
    return SimpleNamespace(root=root, stage=root / "ptq", spec=spec, x=x, logits=logits)


def _run_export_stage(q, out_dir, scheme=None):
    config = export_stage.Config(model="ptq", scheme=scheme)
    out_dir.mkdir()
    recipe = SimpleNamespace(quant=q.spec, model=SimpleNamespace(trust_remote_code=False))
    ctx = StageContext(name="export", config=config, recipe=recipe, out_dir=out_dir,
                       inputs={"model": q.stage}, input_manifests={"model": {}}, checkpointer=None,
                       log=logging.getLogger("test"))
    return export_stage.run(ctx)


def test_stock_transformers_fresh_process_reproduces_logits(quantized, tmp_path):
    metrics = _run_export_stage(quantized, tmp_path / "export")
    ckpt = tmp_path / "export" / "model"
    qconfig = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized" and qconfig["quant_method"] == "compressed-tensors"
    assert (ckpt / "tokenizer.json").exists() and (ckpt / "generation_config.json").exists()

    torch.save(quantized.x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(ckpt), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, capture_output=True)
    stock = torch.load(tmp_path / "y.pt")
    assert (stock - quantized.logits).abs().max() <= 1e-3

    # and back into our representation
    with torch.no_grad():
        ours = pipeline.load_quantized(ckpt)(quantized.x).logits
    assert (ours - quantized.logits).abs().max() <= 1e-3

    # 3-bit codes + one fp32 scale (+ one packed 3-bit zero point when asymmetric) per group
    w = quantized.spec.weights
    if w.group_size:
        expected = w.num_bits + 32 / w.group_size + (0 if w.symmetric else w.num_bits / w.group_size)
        assert metrics["bits_per_weight"] == pytest.approx(expected, rel=1e-3)
    assert metrics["bits_per_weight"] < 4.5 and metrics["bytes_on_disk"] > metrics["safetensors_bytes"]


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
