"""`reasoning-qat init --model MODEL_DIR --scheme w3g128|w4a4kv4 [--out RECIPE]`: a commented starting recipe
for the user's own model folder, written by pipeline.starter."""

from __future__ import annotations

import argparse

HELP = "write a commented starting recipe for your model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="a local Hugging Face model folder")
    parser.add_argument("--scheme", required=True, metavar="SCHEME", help="w3g128 or w4a4kv4")
    parser.add_argument(
        "--out",
        default=None,
        metavar="RECIPE",
        help="file to write (default ./<folder>-<scheme>.yaml); never overwritten",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.starter import write_starter

    out = write_starter(args.model, args.scheme, args.out)
    print(f"wrote {out}; next: reasoning-qat validate {out}")
    return 0
