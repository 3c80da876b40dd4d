"""The KD-QAT training loss: the student's distributions distilled towards a frozen teacher's, chunk by chunk.

`kd_loss_fn(teacher, ...)` is the `loss_fn` pipeline.train.loop takes; the `kd_qat` stage builds it from its
config, and bench/kd_qat.py times the same function (so a benchmark never imports a stage). The defaults are
the stage's (stages/kd_qat.py Config).
"""

from __future__ import annotations

import torch

from pipeline.train.distill import Divergence, chunked_kd_loss


def kd_loss_fn(
    teacher: torch.nn.Module,
    *,
    loss: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    ce_weight: float = 0.0,
    chunk_size: int = 2048,
):
    """loss_fn for pipeline.train.loop: KD of the student (the model being trained) towards `teacher`."""

    def loss_fn(model, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        # logits_to_keep=1: the full-vocabulary logits are made chunk by chunk in the loss instead;
        # hidden_states[-1] is the final-norm output that lm_head reads
        student = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        with torch.no_grad():  # the decoder alone: its last hidden state is all the loss reads of the teacher
            teacher_hidden = teacher.get_decoder()(**inputs, use_cache=False).last_hidden_state
        # position t predicts token t + 1
        labels = batch["labels"][:, 1:]
        head = getattr(model, "module", model).get_output_embeddings()
        value, metrics = chunked_kd_loss(
            student.hidden_states[-1][:, :-1],
            teacher_hidden[:, :-1],
            labels,
            head,
            teacher.get_output_embeddings(),
            divergence=loss,
            temperature=temperature,
            beta=beta,
            top_k=top_k,
            ce_weight=ce_weight,
            chunk_size=chunk_size,
        )
        if _fully_sharded(model):
            # FSDP2 hooks the backward of every output of the model's forward; one the backward never reaches
            # (the last position's logits, unused here) crashed it (a segfault, torch 2.13 on CPU): joined with
            # weight 0, the loss and every gradient stay as they were
            value = value + 0.0 * student.logits.sum()
        return value, metrics

    return loss_fn


def _fully_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
