"""`reasoning-qat export STAGE_DIR [--scheme PRESET] --out DIR [--format pack-quantized|gptq]`: a real low-bit
checkpoint of a quantized model, through pipeline.api.export (pipeline.quant.formats.export writes it).

    reasoning-qat export artifacts/demo/ptq --scheme w3g128 --out ckpt/
    reasoning-qat export artifacts/demo/ptq --format gptq --out ckpt-gptq/  # vllm serve ... --quantization gptq
    reasoning-qat export artifacts/gpu/ptq_flatquant --scheme w4a4kv4 --out ckpt/
"""

from __future__ import annotations

import argparse

from pipeline.cli.common import trust_remote_code_argument

HELP = "write a real low-bit checkpoint from a stage directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.quant.formats.export import FORMATS

    parser.add_argument(
        "stage_dir", help="a quantized model: a stage directory (ptq, kd_qat, ...) or a model directory"
    )
    parser.add_argument(
        "--scheme", default=None, help="preset the model must be quantized with (default: the model's own)"
    )
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--format",
        default="pack-quantized",
        choices=FORMATS,
        help="pack-quantized: compressed-tensors (transformers; W4A4KV4 with our loader); "
        "gptq: GPTQ v1 layout that vLLM serves (--quantization gptq), weight-only models",
    )
    trust_remote_code_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Returns 0; bad input raises InputError (exit 2), nothing written."""
    from pipeline.api import export
    from pipeline.quant.formats.export import describe_size

    size = export(args.stage_dir, args.out, args.scheme, args.trust_remote_code, args.format)
    print(f"exported {args.stage_dir} -> {args.out}: {describe_size(size)}")
    return 0
