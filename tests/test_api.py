"""The Python API (pipeline/api.py) called directly: run / plan / status on a recipe of test stages, export and
load_quantized on a tiny RTN-quantized model, evaluate on the tiny testbed model; files on disk, return values,
bad input as InputError with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline
import tiny_lm
from pipeline import api
from pipeline.engine.errors import InputError
from pipeline.engine.recipe import load_recipe
from pipeline.models import save_model
from pipeline.quant.apply import quantize_rtn
from pipeline.quant.formats.io import save_quantized
from pipeline.quant.scheme import QuantSpec
from quant_tiny import save_tiny


def test_the_package_exports_the_api():
    assert [getattr(pipeline, name) for name in pipeline.API] == [getattr(api, name) for name in pipeline.API]


def test_no_submodule_shadows_an_api_function():
    """Importing pipeline.X sets the package attribute X: a module named like an API function would replace it."""
    import pkgutil

    import pipeline.evaluation  # noqa: F401 - the measures behind pipeline.evaluate

    assert not set(pipeline.API) & {m.name for m in pkgutil.iter_modules(pipeline.__path__)}
    assert pipeline.evaluate is api.evaluate and pipeline.perplexity is api.perplexity


def test_run_plan_and_status(fake_stages, write_recipe, tmp_path):
    recipe = write_recipe({"a": {"type": "make", "value": 2}, "b": {"type": "make", "src": "a"}})
    art = tmp_path / "art"
    assert [(d.name, d.action) for d in api.plan(recipe, art)] == [("a", "run"), ("b", "run")]
    assert [(d.name, d.state, d.reason) for d in api.status(recipe, art)] == [
        ("a", "pending", "never run"),
        ("b", "pending", "never run"),
    ]
    assert not art.exists()  # plan and status write nothing

    outcomes = api.run(recipe, art, overrides=["stages.a.value=3"])
    assert [(o.name, o.state, o.headline) for o in outcomes] == [("a", "ran", "value 3"), ("b", "ran", "value 1")]
    assert (art / "t" / "b" / "out.txt").read_text() == "1<3"
    assert [d.state for d in api.status(recipe, art, overrides=["stages.a.value=3"])] == ["complete", "complete"]
    assert [d.state for d in api.status(recipe, art)] == ["stale", "stale"]  # value 2 is not what ran

    outcomes = api.run(load_recipe(recipe, ["stages.a.value=3"]), art, only="b")  # a loaded Recipe works too
    assert [(o.name, o.state) for o in outcomes] == [("b", "ran")] and fake_stages.calls == ["a", "b", "b"]
    with pytest.raises(InputError, match="apply overrides when loading"):
        api.status(load_recipe(recipe), art, overrides=["seed=1"])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A ptq-like stage directory holding a tiny RTN W3G128 model, and that model."""
    root = tmp_path_factory.mktemp("api")
    src = save_tiny(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    spec = QuantSpec.model_validate("w3g128")
    quantize_rtn(model, spec)
    save_quantized(model, AutoTokenizer.from_pretrained(src), root / "ptq" / "model", spec)
    return root, model


def test_export_and_load_quantized(quantized, tmp_path):
    root, model = quantized
    size = api.export(root / "ptq", tmp_path / "ckpt", scheme="w3g128")
    assert (tmp_path / "ckpt" / "config.json").is_file() and 3 < size["bits_per_weight"] < 4
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        expected = model(x).logits
        for path in (root / "ptq", tmp_path / "ckpt"):  # the stage and its export give the model's logits
            torch.testing.assert_close(api.load_quantized(path)(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_export_and_load_quantized_refuse_bad_input(quantized, tmp_path):
    root, _ = quantized
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "a_file").write_text("")
    cases = [
        (lambda: api.export(root / "ptq", tmp_path / "full"), "--out: ", "exists and is not empty"),
        (lambda: api.export(root / "ptq", tmp_path / "a_file"), "--out: ", "a_file is a file, not a directory"),
        (lambda: api.export(root / "ptq", tmp_path / "a_file" / "o"), "--out: ", "a_file is a file, so"),
        (lambda: api.export(root / "ptq", "/proc/reasoning-qat"), "--out: ", "reasoning-qat cannot be created ("),
        (lambda: api.export(root / "ptq", tmp_path / "o", scheme="w4g128"), "scheme: ", "does not match"),
        (lambda: api.export(root / "teacher", tmp_path / "o"), "stage_dir: ", "holds no quantized model"),
        (lambda: api.load_quantized(tmp_path / "nope"), "path: ", "does not exist"),
        (lambda: api.load_quantized(root / "teacher"), "path: ", "holds no quantized model"),
    ]
    for call, where, message in cases:
        with pytest.raises(InputError) as e:
            call()
        assert str(e.value).startswith(where) and message in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "full"]


def test_evaluate_returns_metrics_and_writes_samples(tmp_path):
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), tmp_path / "teacher" / "model")
    samples = tmp_path / "samples.jsonl"
    metrics = api.evaluate(
        tmp_path / "teacher",
        "testbed",
        limit=2,
        generation={"max_new_tokens": 4, "num_samples": 2, "temperature": 1.0},
        samples_path=samples,
    )
    assert metrics["num_problems"] == 2 and 0 <= metrics["accuracy"] <= metrics["pass_at_k"] <= 1
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 0, 1] and all(r["num_tokens"] <= 4 for r in rows)
    with pytest.raises(InputError, match="MODEL_DIR: no such directory"):
        api.evaluate(tmp_path / "nope", limit=1)


def test_perplexity_of_a_text_file(tmp_path):
    from pipeline.evaluation import perplexity, text_examples

    save_model(tiny_lm.model(), tiny_lm.tokenizer(), tmp_path / "m" / "model")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8}) + "\n")
    metrics = api.perplexity(tmp_path / "m", text=text, max_length=16)
    tokenizer = tiny_lm.tokenizer()
    examples = text_examples(tokenizer, [json.loads(text.read_text())["text"]], 16)
    assert metrics == pytest.approx(perplexity(tiny_lm.model(), examples, tokenizer.pad_token_id))
    with pytest.raises(InputError, match="--max-length: must be >= 2"):
        api.perplexity(tmp_path / "m", text=text, max_length=1)
