"""A shipped recipe, stage by stage, on a random-weight model of a real shape: each stage's wall time and peak GPU
memory, from the runner's own manifests.

    python bench/recipe_stages.py --recipe recipes/qwen3-0.6b-w3g128.yaml --shape 0.6b --out DIR
    python bench/recipe_stages.py --recipe recipes/qwen3-0.6b-w4a4kv4.yaml --shape 0.6b --out DIR
    python bench/recipe_stages.py --recipe recipes/qwen3-8b-w3g128.yaml --shape 8b --out DIR
    python bench/recipe_stages.py --recipe recipes/qwen3-0.6b-w3g128.yaml --shape tiny --out DIR   # CPU smoke test

The model (DIR/model-SHAPE-vN, built once and reused) is a Qwen3ForCausalLM with the published config of Qwen3-0.6B
or Qwen3-8B (tests/real_shapes.py), random bf16 weights (initialised on the GPU when there is one), saved as
safetensors, with a tokenizer of Qwen3's layout (pipeline.data.tokenizer.build_tokenizer(pad_to=...): 151,669
tokens, <|endoftext|> <|im_start|> <|im_end|> at 151643..151645, <think> </think> at 151667/151668) and Qwen3's
chat format. No network: the benchmark files come from REASONING_QAT_BENCHMARKS as in any run.

The recipe runs through the CLI's `run` (artifacts under DIR/artifacts) with `model.path` set to that folder and
overrides that make it a timing run, by stage type: traces `--traces` prompts at `--new-tokens` each (a random model
seldom samples one of its 2 end tokens among 151,936, so nearly every trace runs to the limit); ptq as the recipe
says, FlatQuant for `--flatquant-epochs`; kd_qat `--kd-steps` steps on every trace (`only_correct: false`: random
traces are never correct), no evals during training; eval and gate `--eval-limit` problems at `--eval-new-tokens`;
rl (when its gate lets it) `--rl-steps` steps. `--set` overrides go last and win. After a stage fails (out of
memory, say), every later stage whose inputs completed still runs on its own (`--only`); the table shows the failure
with its error and the stages that could not run as not run (8B: `--set stages.export.model=gptq` exports the GPTQ
init, so that the export stages are timed even where kd_qat does not fit).

The same command again reuses the model folder and skips the stages already complete (the runner's own rule, their
recorded times kept), so a run cut short goes on with the stage it was in (from its start, or its last checkpoint).

Printed and written to DIR/stages.json and DIR/stages.md: per stage its type, state, wall seconds, peak GPU GiB
(`peak_gpu_gib`, the runner's record of torch's allocator peak), tokens/s where the stage reports it, and its
headline metric (a failed stage: its error; a skipped one: why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from real_shapes import REAL_SHAPES, TINY_QWEN3  # noqa: E402

from pipeline.engine.errors import InputError  # noqa: E402
from pipeline.engine.recipe import RecipeError  # noqa: E402

# the tiny tokenizer's 1,026 tokens, padded to a multiple of 64 as Qwen3 pads its own
TINY = dict(TINY_QWEN3, vocab_size=1088, tie_word_embeddings=True)
# shape -> (config values, learned tokens before the special ones)
SHAPES = {
    "tiny": (TINY, 1000),
    "0.6b": (REAL_SHAPES["Qwen/Qwen3-0.6B"][1], None),
    "8b": (REAL_SHAPES["Qwen/Qwen3-8B"][1], None),
}


MODEL_FOLDER_VERSION = 2
"""In the model folder's name (DIR/model-SHAPE-vN): a folder an earlier version of build_model_folder made (before
favour_learned_tokens: traces of fillers) is not reused."""


def favour_learned_tokens(model, tokenizer, scale: float = 10.0) -> None:
    """Scale the output head's rows of the learned tokens (the embeddings too, where tied) so that the random model
    samples those. Left alone it samples the ~150k fillers, which no merge produces: a filler decodes to its name
    (`<|filler_123|>`), which kd_qat's tokenization of the trace text makes ~10 tokens, so 4k-token traces became
    sequences of up to ~50k tokens (measured on an H100) where a real model's round-trip one to one. The end-of-turn
    and other added tokens keep their rows, so a trace still seldom stops before its limit. Row std 0.02 over
    hidden 1024 gives logits of std ~0.6; x10 puts the learned tokens' best ~3 sigma, ~19, above 150k fillers at 0."""
    import torch

    added = set(tokenizer.added_tokens_encoder.values())
    learned = [i for t, i in tokenizer.get_vocab().items() if i not in added and not t.startswith("<|filler_")]
    with torch.no_grad():
        model.get_output_embeddings().weight[learned] *= scale


def build_model_folder(shape: str, out: Path) -> Path:
    """A Qwen3 of `shape` with random bf16 weights and a Qwen3-layout tokenizer, saved as safetensors."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from pipeline.data.tokenizer import QWEN3_LEARNED, build_tokenizer
    from pipeline.models import save_model

    sizes, learned = SHAPES[shape]
    tokenizer = build_tokenizer(pad_to=learned or QWEN3_LEARNED)
    # Qwen3's own config values beside the shapes: its context length and RoPE base
    config = Qwen3Config(
        **sizes,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    # an 8B model's initialisation takes minutes on the CPU, seconds on a GPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    favour_learned_tokens(model, tokenizer)
    # as Qwen3's generation_config: stop at end of turn or end of text
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    save_model(model, tokenizer, out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def timing_overrides(recipe, args: argparse.Namespace) -> list[str]:
    """`--set` strings that make each stage of `recipe` a short timing run of its own type."""
    sets = []
    for name, config in recipe.stages.items():
        at = f"stages.{name}"
        if config.type == "traces":
            sets += [f"{at}.count={args.traces}", f"{at}.generation.max_new_tokens={args.new_tokens}"]
        elif config.type in ("eval", "gate"):
            sets += [f"{at}.limit={args.eval_limit}", f"{at}.generation.max_new_tokens={args.eval_new_tokens}"]
        elif config.type == "kd_qat":
            warmup = min(config.warmup_steps, args.kd_steps // 10)
            sets += [f"{at}.steps={args.kd_steps}", f"{at}.warmup_steps={warmup}", f"{at}.only_correct=false"]
            sets += [f"{at}.eval_every=0"]
        elif config.type == "rl":
            sets += [f"{at}.steps={args.rl_steps}", f"{at}.max_completion_length={args.eval_new_tokens}"]
        elif config.type == "ptq" and config.method == "flatquant":
            sets += [f"{at}.epochs={args.flatquant_epochs}"]
    return sets


def run_what_fits(recipe_arg: str, recipe, artifacts: Path, sets: list[str]) -> int:
    """Run the recipe through the CLI; its exit code. When a stage fails (out of memory, say), the run stops there,
    so then every stage not yet run is tried on its own (`--only`): those whose inputs completed run and are timed,
    the others are refused at once. A run stopped by SIGINT or SIGTERM (the CLI exits 128 + the signal) stops the
    bench, there or in a stage run alone: the same command resumes."""
    import gc

    from pipeline import cli
    from pipeline.engine import dag, signals
    from pipeline.engine.store import Store

    stopped = {128 + int(sig) for sig in signals.SIGNALS}
    run = ["run", recipe_arg, "--artifacts", str(artifacts), *(a for s in sets for a in ("--set", s))]
    code = cli.main(run)
    if code in (0, *stopped):
        return code
    store = Store(artifacts, recipe.name)
    for name in dag.topological_order(recipe):
        if store.manifest(name) is None and store.failed(name) is None:
            gc.collect()  # what the failed stage held goes before the next one loads its model
            alone = cli.main([*run, "--only", name])
            if alone in stopped:
                return alone
    return code


def stage_rows(recipe, artifacts: Path) -> list[dict]:
    """Each stage in run order: state, wall seconds, peak GPU GiB, tokens/s (of the stages that decode or train) and a
    note, from its manifest (or the record of its failed attempt)."""
    from pipeline.engine import dag
    from pipeline.engine.runner import headline
    from pipeline.engine.store import Store

    store = Store(artifacts, recipe.name)
    rows = []
    for name in dag.topological_order(recipe):
        manifest, failed = store.manifest(name), store.failed(name)
        record = manifest or failed or {}
        state = "failed" if manifest is None and failed else (record.get("status") or "not run")
        metrics = record.get("metrics", {})
        # what to read beside the time: the error of a failure, why a stage was skipped, else the headline
        note = (
            failed.get("error", "") if state == "failed" else record.get("reason") or headline(recipe, name, manifest)
        )
        rows.append(
            {
                "stage": name,
                "type": recipe.stages[name].type,
                "state": state,
                "wall_s": record.get("wall_seconds"),
                "peak_gpu_gib": metrics.get("peak_gpu_gib"),
                "tokens_per_s": metrics.get("tokens_per_s"),
                "note": note,
                "metrics": metrics,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["| stage | type | state | wall s | peak GiB | tokens/s | key metric |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        wall, peak, speed = cell(r["wall_s"], ".1f"), cell(r["peak_gpu_gib"], ".2f"), cell(r["tokens_per_s"], ".0f")
        lines.append(f"| {r['stage']} | {r['type']} | {r['state']} | {wall} | {peak} | {speed} | {r['note']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe file or shipped recipe name")
    parser.add_argument("--shape", required=True, choices=SHAPES)
    parser.add_argument("--out", required=True, type=Path, help="model folder, artifacts and the table go here")
    parser.add_argument("--traces", type=int, default=128, help="traces: prompts (default 128)")
    parser.add_argument("--new-tokens", type=int, default=4096, help="traces: new tokens each (default 4096)")
    parser.add_argument("--kd-steps", type=int, default=20, help="kd_qat: optimizer steps (default 20)")
    parser.add_argument("--eval-limit", type=int, default=16, help="eval, gate: problems (default 16)")
    parser.add_argument("--eval-new-tokens", type=int, default=512, help="eval, gate, rl: new tokens (default 512)")
    parser.add_argument("--flatquant-epochs", type=int, default=1, help="ptq flatquant: epochs (default 1)")
    parser.add_argument("--rl-steps", type=int, default=2, help="rl, when its gate passes: steps (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V", help="last, wins")
    args = parser.parse_args(argv)
    for flag in ("traces", "new_tokens", "kd_steps", "eval_limit", "eval_new_tokens", "rl_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.flatquant_epochs < 0:
        parser.error("--flatquant-epochs must be at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    from pipeline import api

    args = parse_args(argv)
    model_dir = args.out / f"model-{args.shape}-v{MODEL_FOLDER_VERSION}"
    started = time.monotonic()
    if not model_dir.is_dir():
        # built aside and renamed, so that a folder there is always a whole model
        build_model_folder(args.shape, model_dir.with_name(model_dir.name + ".partial")).rename(model_dir)
    build_s = time.monotonic() - started
    base = [f"model.path={model_dir}"]
    try:
        recipe = api.load(args.recipe, base + args.overrides)
        sets = base + timing_overrides(recipe, args) + args.overrides
        recipe = api.load(args.recipe, sets)
    except RecipeError as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return 2
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    artifacts = args.out / "artifacts"
    code = run_what_fits(args.recipe, recipe, artifacts, sets)
    rows = stage_rows(recipe, artifacts)
    table = markdown(rows)
    print(f"\n{recipe.name} on a random {args.shape} model (model folder built or found in {build_s:.0f}s)\n")
    print(table)
    report = {"recipe": recipe.name, "shape": args.shape, "build_model_s": build_s, "overrides": sets, "exit": code}
    (args.out / "stages.json").write_text(json.dumps({**report, "stages": rows}, indent=1) + "\n")
    (args.out / "stages.md").write_text(table)
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
