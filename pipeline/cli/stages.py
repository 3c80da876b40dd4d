"""`reasoning-qat stages [TYPE | --markdown]`: the stage reference, generated from the schemas
(pipeline.engine.reference)."""

from __future__ import annotations

import argparse

from pipeline.engine.errors import InputError

HELP = "the stage types; with TYPE, every key of its schema"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "topic", nargs="?", metavar="TYPE", help="a stage type, or a recipe-wide section (model, quant, data)"
    )
    parser.add_argument("--markdown", action="store_true", help="the whole reference as docs/stages.md holds it")


def run(args: argparse.Namespace) -> int:
    from pipeline.engine import reference

    if args.markdown:
        print(reference.markdown(), end="")
    elif args.topic is None:
        for stage_type, summary in reference.summaries():
            print(f"{stage_type:<8} {summary}")
    elif args.topic in reference.topics():
        print(reference.topic_text(args.topic), end="")
    else:
        raise InputError("TYPE", f"unknown stage type {args.topic!r}; known: {', '.join(reference.topics())}")
    return 0
