"""The recipe's `quant` section: presets, overrides, targets/ignore matching, and fit checks."""
import pytest
from pydantic import ValidationError
from torch import nn

from pipeline.models import Qwen3Arch
from pipeline.quant.apply import match_targets, prepare, quant_linears
from pipeline.quant.scheme import QuantSpec, WeightSpec, check_fit, weight_quantization_args, weight_spec_from_args
from quant_tiny import tiny_config, tiny_model


def test_three_recipe_forms():
    assert QuantSpec.model_validate("w3g128").weights == WeightSpec(num_bits=3, group_size=128, symmetric=False)
    spec = QuantSpec.model_validate({"preset": "w3g128", "weights": {"symmetric": True}, "ignore": ["lm_head", "re:.*down_proj"]})
    assert spec.weights == WeightSpec(num_bits=3, group_size=128, symmetric=True)
    assert spec.ignore == ("lm_head", "re:.*down_proj")
    full = QuantSpec.model_validate({"weights": {"num_bits": 2, "group_size": None, "symmetric": True}})
    assert full.weights.group_size is None and full.targets == ("Linear",) and full.ignore == ("lm_head",)
    w4a4 = QuantSpec.model_validate("w4a4kv4")
    assert (w4a4.weights.num_bits, w4a4.weights.group_size, w4a4.activations.num_bits, w4a4.kv_cache.num_bits) == (4, None, 4, 4)


@pytest.mark.parametrize("bad", ["w5g7", {"preset": "nope"}, {"weights": {"num_bits": 9}}, {"weights": {"bits": 3}},
                                 {"targets": []}])
def test_bad_specs_are_rejected(bad):
    with pytest.raises(ValidationError):
        QuantSpec.model_validate(bad)


@pytest.mark.parametrize("weights", [WeightSpec(num_bits=3, group_size=128), WeightSpec(num_bits=4, group_size=None, symmetric=True)])
def test_compressed_tensors_args_round_trip(weights):
    assert weight_spec_from_args(weight_quantization_args(weights)) == weights


def test_targets_and_ignore_like_llmcompressor():
    model = tiny_model(300)
    names = [n for n, _ in match_targets(model, QuantSpec())]
    assert len(names) == 14 and "lm_head" not in names
    spec = QuantSpec(targets=(r"re:.*mlp\..*",), ignore=("re:.*down_proj",))
    assert [n for n, _ in match_targets(model, spec)] == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    prepare(model, spec)
    assert len(quant_linears(model)) == 4 and type(model.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize("spec,message", [
    (QuantSpec(targets=("Linear", "re:.*no_such_proj")), "matches no Linear"),
    (QuantSpec(targets=("re:.*down_proj",), ignore=("re:.*proj",)), "leave no module"),
    (QuantSpec(targets=("Qwen3MLP",)), "matches no Linear"),
])
def test_target_filters_that_match_nothing_are_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        match_targets(tiny_model(300), spec)
    assert check_fit(tiny_model(300), spec)[0][0] == "quant.targets"


def test_check_fit_from_arch_config_and_model():
    w3 = QuantSpec.model_validate("w3g128")
    assert check_fit(Qwen3Arch(hidden_size=256, intermediate_size=512, head_dim=64), w3) == []
    # the demo arch: hidden 128 fits, but 96-wide MLP rows do not
    errors = check_fit(Qwen3Arch(hidden_size=128, intermediate_size=96, head_dim=32), w3)
    assert errors == [("quant.weights.group_size",
                       "128 does not divide in_features 96 of model.layers.0.mlp.down_proj (and 1 more layers)")]
    assert check_fit(tiny_config(300, hidden_size=192, head_dim=48), w3)[0][0] == "quant.weights.group_size"
    assert check_fit(tiny_model(300), QuantSpec.model_validate({"preset": "w4a4kv4", "kv_cache": {"group_size": 48}})) == [
        ("quant.kv_cache.group_size", "48 does not divide head_dim 64")]
