"""The scheme in compressed-tensors' terms: `QuantizationArgs` of a WeightSpec and back, and the config groups
of a model whose layers got lowered group sizes (what llmcompressor's oneshot and an export's
`quantization_config` take)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.quant.scheme import QuantSpec, WeightSpec

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme


def weight_quantization_args(weights: WeightSpec) -> "QuantizationArgs":
    """compressed-tensors' QuantizationArgs for these weights (integer, static, min-max observer)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=weights.num_bits,
        type="int",
        symmetric=weights.symmetric,
        strategy="channel" if weights.group_size is None else "group",
        group_size=weights.group_size,
    )


def weight_spec_from_args(args: "QuantizationArgs") -> WeightSpec:
    """The inverse of `weight_quantization_args`; refuses what our QuantLinear cannot represent."""
    if args.type != "int" or args.dynamic or args.strategy not in ("group", "channel"):
        raise ValueError(
            f"only static integer group/channel weight quantization is supported, got "
            f"type={args.type} strategy={args.strategy} dynamic={args.dynamic}"
        )
    return WeightSpec(
        num_bits=args.num_bits,
        group_size=args.group_size if args.strategy == "group" else None,
        symmetric=args.symmetric,
    )


def config_groups(spec: QuantSpec, per_layer: dict[str, WeightSpec], **args_update) -> dict[str, "QuantizationScheme"]:
    """compressed-tensors config groups for layers quantized as `per_layer` says: `group_0`, the spec's own
    weights on its targets, and one group per lowered group size on those layers' exact names, which
    compressed-tensors (and so llmcompressor and transformers) prefers to a class or regex target.
    `args_update` sets further QuantizationArgs fields (GPTQ's observer)."""
    from compressed_tensors.quantization import QuantizationScheme

    def scheme(group_size: int | None, targets: list[str]) -> QuantizationScheme:
        args = weight_quantization_args(spec.weights.model_copy(update={"group_size": group_size}))
        return QuantizationScheme(targets=targets, weights=args.model_copy(update=args_update))

    lowered: dict[int, list[str]] = {}
    for name, weights in per_layer.items():
        if weights.group_size != spec.weights.group_size:
            lowered.setdefault(weights.group_size, []).append(name)
    groups = {"group_0": scheme(spec.weights.group_size, list(spec.targets))}
    for index, (group_size, names) in enumerate(lowered.items(), start=1):
        groups[f"group_{index}"] = scheme(group_size, names)
    return groups
