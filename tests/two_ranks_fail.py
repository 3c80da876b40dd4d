"""Run by tests/test_train.py under torchrun, 2 CPU ranks (DDP, gloo): three trainings in one process group, each
failing on one rank only: a NaN loss on rank 1, an exception on rank 0, rank 1 unable to write its part of the
second checkpoint. Each rank writes what each training raised, one line each, to <out>/rank-<r>.txt, and the
step of the newest checkpoint after the third."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from pipeline.train import loop as training
from pipeline.engine.checkpoint import Checkpointer
from pipeline.data.chat import chat_example
from pipeline.models import Qwen3Arch, build_model
from pipeline.data.testbed import TestbedSpec, make_problems
from pipeline.data.tokenizer import build_tokenizer

ARCH = Qwen3Arch(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
)


def main(out: Path) -> None:
    tok = build_tokenizer()
    examples = [chat_example(tok, p.question, p.solution) for p in make_problems(TestbedSpec(), "train", n=8)]
    PartialState(cpu=True)  # CPU ranks share a gloo group only when asked (as pipeline.engine.runner does)
    acc = training.make_accelerator()
    rank = acc.process_index
    args = training.TrainArgs(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, checkpoint_every=1)

    def failing_on(fail_rank: int, at_call: int, error: Exception | None):
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            loss, metrics = training.causal_lm_loss(model, batch)
            if rank == fail_rank and calls["n"] == at_call:
                if error is None:
                    return loss * float("nan"), metrics
                raise error
            return loss, metrics

        return loss_fn

    real_rng_state = training.rng_state
    saves = {"n": 0}

    def unsaveable_second_time():
        saves["n"] += 1
        return {"bad": object()} if rank == 1 and saves["n"] == 2 else real_rng_state()

    runs = [
        (failing_on(1, 2, None), False),
        (failing_on(0, 1, RuntimeError("power cut")), False),
        (training.causal_lm_loss, True),
    ]
    lines = []
    for i, (loss_fn, bad_checkpoint) in enumerate(runs):
        training.rng_state = unsaveable_second_time if bad_checkpoint else real_rng_state
        model = build_model(ARCH, tok, seed=0)
        try:
            training.train(
                model,
                examples,
                loss_fn,
                args,
                out_dir=out / f"run{i}",
                accelerator=acc,
                checkpointer=Checkpointer(out / f"ckpt{i}"),
                seed=0,
                pad_id=tok.pad_token_id,
            )
            lines.append("finished")
        except Exception as e:
            lines.append(f"{type(e).__name__}: {e}")
    lines.append(f"newest checkpoint: {Checkpointer(out / 'ckpt2').latest_step()}")
    (out / f"rank-{rank}.txt").write_text("\n".join(lines) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
