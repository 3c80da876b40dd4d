"""Run by tests/test_train.py under torchrun, 2 CPU ranks (gloo): FSDP2 with the accelerator in bf16 mixed precision,
as on a GPU, and bf16 latent weights (`param_dtype: bfloat16`). Each rank writes to <out>/rank-<r>.json the dtypes
of the trained model's parameters and the losses."""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from pipeline.data.chat import chat_example
from pipeline.data.testbed import TestbedSpec, make_problems
from pipeline.data.tokenizer import build_tokenizer
from pipeline.engine.checkpoint import Checkpointer
from pipeline.models import Qwen3Arch, build_model
from pipeline.train import loop as training

ARCH = Qwen3Arch(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
)


def main(out: Path) -> None:
    tok = build_tokenizer()
    examples = [chat_example(tok, p.question, p.solution) for p in make_problems(TestbedSpec(), "train", n=8)]
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    PartialState(cpu=True)  # CPU ranks share a gloo group only when asked (as pipeline.engine.runner does)
    # make_accelerator's choice on a GPU with bf16; on CPU ranks it would take "no"
    acc = Accelerator(mixed_precision="bf16")
    training._fsdp_on_cpu(acc)
    args = training.TrainArgs(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, param_dtype="bfloat16")
    model = build_model(ARCH, tok, seed=0)
    training.train(
        model,
        examples,
        training.causal_lm_loss,
        args,
        out_dir=out / "run",
        accelerator=acc,
        checkpointer=Checkpointer(out / "ckpt"),
        seed=0,
        pad_id=tok.pad_token_id,
    )
    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    report = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}), "losses": [r["loss"] for r in rows]}
    (out / f"rank-{acc.process_index}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
