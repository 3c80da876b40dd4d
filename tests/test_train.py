"""The shared training loop: exact resume (also past a damaged checkpoint), signals, NaN stop, failures on one of
two ranks, bf16 latent weights under FSDP2 in bf16 mixed precision, batching, accumulation."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.chat import chat_example
from pipeline.data.testbed import TestbedSpec, make_problems
from pipeline.data.tokenizer import build_tokenizer
from pipeline.engine import signals
from pipeline.engine.checkpoint import Checkpointer, StageInterrupted
from pipeline.models import Qwen3Arch, build_model
from pipeline.train.loop import NonFiniteLoss, TrainArgs, batch_indices, causal_lm_loss, collate, train

ARCH = Qwen3Arch(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
)
ARGS = TrainArgs(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    examples = [chat_example(tok, p.question, p.solution) for p in make_problems(TestbedSpec(), "train", n=10)]
    return tok, examples


def run(setup, tmp_path, args=ARGS, loss_fn=causal_lm_loss, ckpt_dir="ckpt", arch=ARCH):
    tok, examples = setup
    torch.manual_seed(123)  # a fresh process would start from some other global RNG state
    model = build_model(arch, tok, seed=0)
    result = train(
        model,
        examples,
        loss_fn,
        args,
        out_dir=tmp_path / "out",
        checkpointer=Checkpointer(tmp_path / ckpt_dir),
        seed=0,
        pad_id=tok.pad_token_id,
    )
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    return model, result, rows


def test_batches_are_a_pure_function_of_seed_and_step():
    assert batch_indices(0, 5, 10, 4) == batch_indices(0, 5, 10, 4)
    epoch = [i for step in range(5) for i in batch_indices(0, step, 10, 4)]  # 20 positions = 2 epochs
    assert sorted(epoch[:10]) == list(range(10)) == sorted(epoch[10:]) and epoch[:10] != epoch[10:]
    assert batch_indices(1, 0, 10, 4) != batch_indices(0, 0, 10, 4)


def test_collate_pads_right_and_masks_prompt_and_padding():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_crash_and_resume_gives_the_uninterrupted_run_exactly(setup, tmp_path):
    straight, result, rows = run(setup, tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(3e-3)  # warmup, then cosine

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # in step 5, after the checkpoint of step 4
            raise RuntimeError("power cut")
        return causal_lm_loss(model, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        run(setup, tmp_path / "b", loss_fn=crashing)
    assert Checkpointer(tmp_path / "b" / "ckpt").latest()[0] == 4
    calls["n"] = 0

    def counting(model, batch):
        calls["n"] += 1
        return causal_lm_loss(model, batch)

    # checkpoint_every is operational: a checkpoint made with another value resumes all the same
    resumed, result_b, rows_b = run(
        setup, tmp_path / "b", args=ARGS.model_copy(update={"checkpoint_every": 5}), loss_fn=counting
    )
    assert calls["n"] == 2  # only steps 5 and 6 ran again
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]
    assert result_b["final_loss"] == result["final_loss"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_newest_checkpoint_resumes_from_the_one_before_and_matches(setup, tmp_path, caplog):
    """Issue 14: a truncated newest checkpoint used to fail every later run (SafetensorError) while status
    promised a resume from it."""
    straight, _, rows = run(setup, tmp_path / "a")

    def crashing(model, batch):
        if crashing.calls == 4:  # in step 5, after the checkpoint of step 4
            raise RuntimeError("power cut")
        crashing.calls += 1
        return causal_lm_loss(model, batch)

    crashing.calls = 0
    with pytest.raises(RuntimeError, match="power cut"):
        run(setup, tmp_path / "b", loss_fn=crashing)
    newest = tmp_path / "b" / "ckpt" / "step-000000004" / "shared.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert Checkpointer(tmp_path / "b" / "ckpt").latest_step() == 2  # what `status` says

    with caplog.at_level(logging.INFO):
        resumed, _, rows_b = run(setup, tmp_path / "b")
    assert "checkpoint step-000000004 is damaged: shared.safetensors is 1000 bytes" in caplog.text
    assert "resuming from the checkpoint at step 2" in caplog.text
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert Checkpointer(tmp_path / "b" / "ckpt").latest_step() == 6


def test_sigterm_checkpoints_then_raises(setup, tmp_path):
    calls = {"n": 0}

    def signalled(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return causal_lm_loss(model, batch)

    before = signal.getsignal(signal.SIGTERM)
    with signals.owned(), pytest.raises(StageInterrupted, match="step 3"):  # the runner owns the signals
        run(setup, tmp_path, args=ARGS.model_copy(update={"checkpoint_every": 0}), loss_fn=signalled)
    assert signal.getsignal(signal.SIGTERM) is before
    step, state = Checkpointer(tmp_path / "ckpt").latest()
    assert step == 3 and len(state["metrics"]) == 3


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(setup, tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    with pytest.raises(NonFiniteLoss, match="step 3: loss is nan.*checkpoint of step 2 is kept"):
        run(setup, tmp_path, loss_fn=poisoned)
    assert Checkpointer(tmp_path / "ckpt").latest()[0] == 2


def test_a_failure_on_one_of_two_ranks_stops_both_with_the_same_message(tmp_path):
    """torchrun, 2 CPU ranks (DDP over gloo): a NaN on one rank, an exception on the other, a checkpoint one rank
    cannot write; each time both ranks raise the same RankFailed, and the process group is still in step for
    the next training (a rank left waiting in a collective would hang until the timeout below)."""
    done = _two_torchrun_ranks("two_ranks_fail.py", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "rank-0.txt").read_text()
    assert (tmp_path / "rank-1.txt").read_text() == lines
    assert lines.splitlines() == [
        "RankFailed: rank 1 of 2 failed: NonFiniteLoss: step 2: loss is nan; stopped before the update, "
        "the checkpoint of step 1 is kept",
        "RankFailed: rank 0 of 2 failed: RuntimeError: power cut",
        "RankFailed: rank 1 of 2 failed: TypeError: checkpoint state holds a object, which cannot be saved "
        "without pickle",
        "newest checkpoint: 1",
    ]


def test_fsdp2_in_bf16_mixed_precision_keeps_bf16_latent_weights_bf16(tmp_path):
    """torchrun, 2 CPU ranks under FSDP2, the accelerator in bf16 mixed precision as on a GPU: `param_dtype:
    bfloat16` latent weights stay bf16 through accelerate's preparation (which upcasts trainable parameters to fp32
    when mixed precision is on) and train."""
    done = _two_torchrun_ranks("fsdp2_bf16_latents.py", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "rank-0.json").read_text())
    assert (tmp_path / "rank-1.json").read_text() == json.dumps(report)
    assert report["dtypes"] == ["torch.bfloat16"]
    assert report["losses"][1] < report["losses"][0]


def test_accumulation_matches_one_big_batch(setup, tmp_path):
    args = ARGS.model_copy(update={"steps": 3, "checkpoint_every": 0})
    one, _, rows_one = run(setup, tmp_path / "one", args=args)
    two, _, rows_two = run(setup, tmp_path / "two", args=args.model_copy(update={"grad_accum": 2}))
    # micro-batches are weighted by their label tokens, so only float rounding differs
    assert [r["loss"] for r in rows_one] == pytest.approx([r["loss"] for r in rows_two], rel=1e-5)
    torch.testing.assert_close(one.lm_head.weight, two.lm_head.weight, rtol=1e-4, atol=1e-6)


def test_a_step_groups_sequences_of_like_length_into_its_micro_batches():
    """Traces of mixed lengths: each micro-batch pads only to its own longest, and every example of the step is in
    exactly one micro-batch (the padding the step holds is the least a split into grad_accum pieces can have)."""
    from pipeline.train.loop import _my_batches

    lengths = [10, 100, 12, 95, 11, 98, 13, 97]
    examples = [(list(range(1, n + 1)), 2) for n in lengths]
    args = TrainArgs(steps=1, batch_size=8, grad_accum=4, lr=1e-3)
    batches = _my_batches(examples, seed=0, step=1, args=args, micro=2, rank=0, pad_id=0)
    assert [b["input_ids"].shape for b in batches] == [(2, 11), (2, 13), (2, 97), (2, 100)]
    real = sorted(int(n) for b in batches for n in b["attention_mask"].sum(dim=1))
    assert real == sorted(lengths)


def test_checkpoint_of_other_settings_is_not_resumed(setup, tmp_path):
    run(setup, tmp_path, args=ARGS.model_copy(update={"steps": 2}))
    _, _, rows = run(setup, tmp_path, args=ARGS.model_copy(update={"steps": 3, "lr": 1e-3}))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["lr"] == pytest.approx(5e-4)


def test_bf16_weights_and_8bit_adam_resume_exactly_and_still_learn(setup, tmp_path):
    from torchao.optim.subclass_8bit import OptimState8bit

    args = ARGS.model_copy(update={"param_dtype": "bfloat16", "optimizer": "adamw_8bit"})
    arch = ARCH.model_copy(update={"intermediate_size": 128})  # MLP matrices of 4096 values: 8-bit moments
    straight, result, rows = run(setup, tmp_path / "a", args=args, arch=arch)
    assert all(p.dtype == torch.bfloat16 for p in straight.parameters())
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the 8-bit moments (tensors of >= 4096 values) are saved as their codes and scales, and come back as such
    step, state = Checkpointer(tmp_path / "a" / "ckpt").latest()
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert any(isinstance(m, OptimState8bit) and m.codes.dtype == torch.uint8 for m in moments)

    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("power cut")
        return causal_lm_loss(model, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        run(setup, tmp_path / "b", args=args, loss_fn=crashing, arch=arch)
    resumed, _, rows_b = run(setup, tmp_path / "b", args=args, arch=arch)
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _two_torchrun_ranks(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """tests/`script` on 2 CPU ranks under torchrun, its output folder `tmp_path`."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port: test runs side by side do not meet on the default one
            "--nproc_per_node",
            "2",
            str(root / "tests" / script),
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
