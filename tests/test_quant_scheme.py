"""The recipe's `quant` section: presets, overrides, targets/ignore matching, fit checks, and the group-size policy
for widths the group size does not divide."""

import pytest
from pydantic import ValidationError
from torch import nn

from pipeline.models import Qwen3Arch
from pipeline.quant.apply import lowered_group_sizes, match_targets, prepare, quant_linears
from pipeline.quant.fit import check_fit
from pipeline.quant.formats.compressed import config_groups, weight_quantization_args, weight_spec_from_args
from pipeline.quant.scheme import QuantSpec, WeightSpec, layer_weights
from quant_tiny import family_model, tiny_config, tiny_model


def test_three_recipe_forms():
    assert QuantSpec.model_validate("w3g128").weights == WeightSpec(num_bits=3, group_size=128, symmetric=False)
    spec = QuantSpec.model_validate(
        {"preset": "w3g128", "weights": {"symmetric": True}, "ignore": ["lm_head", "re:.*down_proj"]}
    )
    assert spec.weights == WeightSpec(num_bits=3, group_size=128, symmetric=True)
    assert spec.ignore == ("lm_head", "re:.*down_proj")
    full = QuantSpec.model_validate({"weights": {"num_bits": 2, "group_size": None, "symmetric": True}})
    assert full.weights.group_size is None and full.targets == ("Linear",) and full.ignore == ("lm_head",)
    w4a4 = QuantSpec.model_validate("w4a4kv4")
    assert (w4a4.weights.num_bits, w4a4.weights.group_size, w4a4.activations.num_bits, w4a4.kv_cache.num_bits) == (
        4,
        None,
        4,
        4,
    )


@pytest.mark.parametrize(
    "bad", ["w5g7", {"preset": "nope"}, {"weights": {"num_bits": 9}}, {"weights": {"bits": 3}}, {"targets": []}]
)
def test_bad_specs_are_rejected(bad):
    with pytest.raises(ValidationError):
        QuantSpec.model_validate(bad)


@pytest.mark.parametrize(
    "weights", [WeightSpec(num_bits=3, group_size=128), WeightSpec(num_bits=4, group_size=None, symmetric=True)]
)
def test_compressed_tensors_args_round_trip(weights):
    assert weight_spec_from_args(weight_quantization_args(weights)) == weights


def test_targets_and_ignore_like_llmcompressor():
    model = tiny_model(300)
    names = [n for n, _ in match_targets(model, QuantSpec())]
    assert len(names) == 14 and "lm_head" not in names
    spec = QuantSpec(targets=(r"re:.*mlp\..*",), ignore=("re:.*down_proj",))
    assert [n for n, _ in match_targets(model, spec)] == [
        f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")
    ]
    prepare(model, spec)
    assert len(quant_linears(model)) == 4 and type(model.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize(
    "spec,message",
    [
        (QuantSpec(targets=("Linear", "re:.*no_such_proj")), "matches no Linear"),
        (QuantSpec(targets=("re:.*down_proj",), ignore=("re:.*proj",)), "leave no module"),
        (QuantSpec(targets=("Qwen3MLP",)), "matches no Linear"),
    ],
)
def test_target_filters_that_match_nothing_are_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        match_targets(tiny_model(300), spec)
    assert check_fit(tiny_model(300), spec)[0][0] == "quant.targets"


@pytest.mark.parametrize(
    "group_size,in_features,lowered",
    [
        (128, 1024, 128),
        (128, 576, 96),
        (128, 960, 96),
        (128, 1536, 128),
        (128, 8960, 128),
        (128, 320, 64),
        (128, 96, 96),
        (64, 576, 64),
        (48, 80, 16),
        (None, 576, None),
    ],
)
def test_largest_divisor_policy(group_size, in_features, lowered):
    weights = WeightSpec(num_bits=3, group_size=group_size)
    assert layer_weights(weights, in_features) == WeightSpec(num_bits=3, group_size=lowered)


def test_policy_refusals():
    with pytest.raises(ValueError, match="128 does not divide in_features 100, nor does any smaller multiple of 32"):
        layer_weights(WeightSpec(num_bits=3, group_size=128), 100)
    with pytest.raises(ValueError, match=r"128 does not divide in_features 576 \(group_size_policy: exact\)"):
        layer_weights(WeightSpec(num_bits=3, group_size=128, group_size_policy="exact"), 576)


def test_check_fit_from_arch_config_and_model():
    w3 = QuantSpec.model_validate("w3g128")
    assert check_fit(Qwen3Arch(hidden_size=256, intermediate_size=512, head_dim=64), w3) == []
    # the demo arch's 96-wide MLP rows take groups of 96; "exact" refuses them, and 100 has no fitting group
    assert check_fit(Qwen3Arch(hidden_size=128, intermediate_size=96, head_dim=32), w3) == []
    exact = QuantSpec.model_validate({"preset": "w3g128", "weights": {"group_size_policy": "exact"}})
    assert check_fit(Qwen3Arch(hidden_size=128, intermediate_size=96, head_dim=32), exact) == [
        (
            "quant.weights.group_size",
            "model.layers.0.mlp.down_proj: 128 does not divide in_features 96 (group_size_policy: exact) (and 1 "
            "more layers)",
        )
    ]
    errors = check_fit(Qwen3Arch(hidden_size=128, intermediate_size=100, head_dim=32), w3)
    assert errors == [
        (
            "quant.weights.group_size",
            "model.layers.0.mlp.down_proj: 128 does not divide in_features 100, "
            "nor does any smaller multiple of 32 (and 1 more layers)",
        )
    ]
    assert check_fit(tiny_config(300, hidden_size=200, head_dim=40), w3)[0][0] == "quant.weights.group_size"


def test_prepare_lowers_group_sizes_and_config_groups_name_them():
    model = family_model("llama", 300)  # hidden 192 -> groups of 96, intermediate 320 -> 64
    spec = QuantSpec.model_validate("w3g128")
    prepare(model, spec)
    lowered = lowered_group_sizes(model, spec)
    assert set(lowered.values()) == {96, 64} and len(lowered) == 14
    assert model.model.layers[1].mlp.down_proj.weight_scale.shape == (192, 5)
    groups = config_groups(spec, {name: m.weights for name, m in quant_linears(model)})
    assert list(groups) == ["group_0", "group_1", "group_2"]
    assert groups["group_0"].targets == ["Linear"] and groups["group_0"].weights.group_size == 128
    assert groups["group_2"].targets == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_2"].weights.group_size == 64 and len(groups["group_1"].targets) == 12
    fits = tiny_model(300)  # widths 128 divides: one group, as before the policy
    prepare(fits, spec)
    assert list(config_groups(spec, {n: m.weights for n, m in quant_linears(fits)})) == ["group_0"]
    assert check_fit(
        tiny_model(300), QuantSpec.model_validate({"preset": "w4a4kv4", "kv_cache": {"group_size": 48}})
    ) == [("quant.kv_cache.group_size", "48 does not divide head_dim 64")]
