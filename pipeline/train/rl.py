"""GRPO on the quantized student: TRL's GRPOTrainer, subclassed where our representation needs it.

    from pipeline.train.rl import GRPOSettings, grpo_train
    policy, metrics = grpo_train(model, tokenizer, problems, GRPOSettings(...), out_dir=ctx.out_dir,
                                 checkpointer=ctx.checkpointer, seed=recipe.seed)

The math is TRL's (GRPO / DAPO / Dr. GRPO / BNPO losses, group-normalised advantages, the clipped
ratio with ε / ε_high, the optional k3 KL to a reference); what `QuantGRPOTrainer` (in
pipeline.train.grpo_trainer, imported only when training: TRL is heavy) changes is plumbing, each for a
stated reason:

- Rollouts go through `pipeline.generate.generate_ids`, the one generation path eval and traces use
  (same backends, same stop tokens, seeded sampling), so the policy is sampled exactly as it is
  evaluated. The rollout seed is a function of (seed, step, process), so a resumed run draws the
  same completions as an uninterrupted one.
- Prompts are the chat-templated strings of `pipeline.data.chat.chat_prompt`, tokenized without special
  tokens, as `pipeline.generate` does (TRL's default would add a BOS on tokenizers that have one).
- The reference model (β > 0): TRL rebuilds it from `config._name_or_path`, which for a QuantLinear
  model silently loads the latent weights as plain Linears. `qat` mode therefore passes a reference
  built by the caller (the stage loads the initial quantized policy again); `lora` mode needs none:
  TRL disables the adapters, which leaves the frozen quantized base, the natural reference.
- Checkpoints: TRL/transformers save optimizer, scheduler and RNG with torch.save (pickle). Here a
  callback saves the trainable parameters, optimizer, scheduler, RNG, TrainerState (JSON) and the
  metrics rows through the engine's Checkpointer (safetensors + JSON) every `checkpoint_every` steps
  and on SIGTERM/SIGINT; resume hands transformers a directory holding only `trainer_state.json` and
  overrides the three loaders, so transformers' own data skipping puts the sampler where it was.
  Under DeepSpeed the optimizer is sharded and loaded by DeepSpeed itself: resume is refused there.
- AQN (QeRL's adaptive quantization noise): Gaussian noise on every RMSNorm weight of the rollout
  policy, drawn once per optimizer step (rollouts happen once per step: μ = 1, one generation batch
  per step), added just before generation and restored bit-exactly right after. The loss forwards
  see the clean weights, so the noise shapes which completions are explored, not the gradient; with
  μ = 1 TRL takes the old log-probs from the clean policy, so no importance correction is made for
  the noise (as QeRL, whose rollout engine is noised and whose trainer is not).
- Rollouts of a weight-only policy decode with each QuantLinear's q(w) computed once per rollout
  batch instead of at every token, in bf16 on GPU (`pipeline.quant.apply.decoding_weights`), as `eval` runs the saved
  model; the loss forwards run the fp32 latents under bf16 autocast, as kd_qat trains them, so the
  rollout policy differs from the trained one by bf16 rounding of norms and embeddings (the same
  kind of mismatch as a vLLM rollout engine; TRL's μ = 1 makes no correction for it).
  bench/rollout.py measures the speed. Policies with activation quantizers (W4A4) decode on the
  fp32 latents under autocast (the refill backend's cache keeps keys and values in their own dtypes;
  the static cache cannot, so `auto` never picks it for them).
- Policy modes: `qat` trains every parameter but the quantizer scales (latent weights through the
  STE of QuantLinear); `lora` wraps each QuantLinear in a peft LoRA adapter (peft accepts it: it is
  an nn.Linear, and the adapter's base forward is the fake-quantized one, QLoRA-style). At the end
  the adapters are merged into the latent weights, which then re-quantize with the unchanged
  scales: the saved policy is q(W + BA), not the q(W) + BA that was trained, so an update smaller
  than half a quantization step in a weight is rounded away. `codes_changed` (the fraction of
  integer weight codes that differ from the initial policy's) measures how much survived.

Rewards: `accuracy_reward` is pipeline.data.grading (math-verify in the worker pool, 1 or 0), and
`format_reward` is 1 for a well-formed `<think>…</think>` followed by a `\\boxed{}` answer; the
stage weights them 1 and `format_weight`.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.engine import signals
from pipeline.engine.checkpoint import Checkpointer, StageInterrupted
from pipeline.data.chat import BOXED_INSTRUCTION, chat_prompt
from pipeline.data.problem import Problem
from pipeline.generate import GenerationSpec
from pipeline.engine.stage_api import result_config
from pipeline.train.aqn import AQNSpec
from pipeline.train.args import (
    BatchSize,
    CheckpointEvery,
    GradAccum,
    GradClip,
    LearningRate,
    ReportTo,
    Steps,
    WarmupSteps,
    WeightDecay,
)

# -- rewards --------------------------------------------------------------------------------------

THINK, END_THINK = "<think>", "</think>"


def accuracy_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion's final answer equals the gold answer (pipeline.data.grading), else 0.0."""
    from pipeline.data.grading import grade_many  # math-verify: only when rewards are computed

    return [float(ok) for ok in grade_many(list(zip(completions, answer)))]


def is_well_formed(completion: str) -> bool:
    """One reasoning block, closed by `</think>`, then an answer holding `\\boxed{`.

    The opening `<think>` may be missing: some chat templates (R1-Distill's) put it in the prompt.
    """
    head, sep, tail = completion.partition(END_THINK)
    if not sep or THINK in tail or END_THINK in tail or "\\boxed{" not in tail:
        return False
    return THINK not in head or (head.count(THINK) == 1 and head.lstrip().startswith(THINK))


def format_reward(completions: list[str], **_) -> list[float]:
    return [float(is_well_formed(c)) for c in completions]


# -- settings ------------------------------------------------------------------------------------


def _decoding(name: str) -> Any:
    """GenerationSpec's declaration of its field `name` (bounds and default), for a rollout setting that is that
    decoding knob: one declaration of each (a change there changes rl's schema and fingerprints too, which
    tests/test_recipes_shipped.py catches). `temperature` keeps its own, narrower one (a GRPO group needs sampling:
    > 0, where eval allows greedy 0), and `rollout_batch_size` its own bound as recipes have always read it (> 0)."""
    return copy.copy(GenerationSpec.model_fields[name])


Backend = GenerationSpec.model_fields["backend"].annotation


class GRPOSettings(BaseModel):
    """GRPO knobs (the `rl` stage's Config inherits them); names follow TRL's GRPOConfig and the papers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Steps = 100
    """Optimizer steps; one rollout batch per step."""
    batch_size: BatchSize = 64
    """Completions per optimizer step over all processes and accumulation micro-steps;
    prompts per step = batch_size / num_generations."""
    num_generations: int = Field(8, ge=2)
    """G: completions per prompt, the group whose rewards are normalised into advantages."""
    grad_accum: GradAccum = 1
    """Micro-steps per optimizer step (memory against speed)."""
    lr: LearningRate = 1e-6
    """AdamW learning rate, constant after warmup (as DAPO / TRL); LoRA usually wants ~1e-5."""
    warmup_steps: WarmupSteps = 0
    """Steps of linear learning-rate warmup from 0."""
    weight_decay: WeightDecay = 0.0
    """AdamW weight decay."""
    grad_clip: GradClip = 1.0
    """Clip the global gradient norm to this."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """grpo: mean per sequence, then over the batch; dapo: mean over all tokens of the global batch;
    dr_grpo: sum over tokens / (batch x max_completion_length); bnpo: mean over the local batch's tokens."""
    beta: float = Field(0.0, ge=0)
    """KL coefficient to the reference policy (0: no reference model; DAPO drops the KL)."""
    epsilon: float = Field(0.2, gt=0)
    """Lower clip of the ratio (1 − ε)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip (1 + ε_high): DAPO's clip-higher uses 0.28; None = ε."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (GRPO), the batch's, or not at all (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit max_completion_length out of the loss (DAPO's overlong filtering)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts (and of the policy's log-probabilities in the loss)."""
    top_p: float = _decoding("top_p")
    """Nucleus sampling of the rollouts (1: off)."""
    top_k: int = _decoding("top_k")
    """Top-k sampling of the rollouts (0: off)."""
    max_completion_length: int = _decoding("max_new_tokens")
    """Most new tokens per rollout completion."""
    rollout_batch_size: int = Field(64, gt=0)
    """Sequences decoded together by pipeline.generate (its `batch_size`)."""
    backend: Backend = _decoding("backend")
    """pipeline.generate backend for rollouts."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (QuantLinear's forward is pure, so re-running it is safe)."""
    checkpoint_every: CheckpointEvery = 50
    """Save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGINT)."""
    policy: Literal["qat", "lora"] = "qat"
    """qat: latent weights train through fake quantization; lora: adapters on the frozen quantized base."""
    lora_rank: int = Field(16, gt=0)
    """lora: rank of the adapters."""
    lora_alpha: float = Field(32.0, gt=0)
    """lora: scaling numerator of the adapters (their output is scaled by lora_alpha / lora_rank)."""
    aqn: AQNSpec | None = None
    """Adaptive quantization noise on the rollout policy's RMSNorm weights (None: off)."""
    format_weight: float = Field(0.0, ge=0)
    """Weight of the format reward next to the accuracy reward (weight 1); 0 logs it without using it."""
    report_to: ReportTo = ()
    """Also log each step's row (reward, accuracy, entropy, kl, completion length, ...) to these trackers,
    through TRL's own reporting; tensorboard writes under `<stage>/tensorboard`."""

    @model_validator(mode="after")
    def _batches(self):
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size must be a multiple of num_generations ({self.num_generations})")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size must be a multiple of grad_accum ({self.grad_accum})")
        if self.warmup_steps > self.steps:
            raise ValueError("warmup_steps must be <= steps")
        return self


# -- the trainer ---------------------------------------------------------------------------------


def quant_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The integer weight codes of every QuantLinear (what export packs), on the CPU: the policy moves to
    the GPU between the codes before training and those after, and the first set waits in CPU memory."""
    from pipeline.quant import fake
    from pipeline.quant.apply import quant_linears

    with torch.no_grad():
        return {
            name: fake.quantize(
                m.weight.float(), m.weight_scale.float(), m.weight_zero_point, m.weights.num_bits, m.weights.group_size
            ).to("cpu", torch.int8)
            for name, m in quant_linears(model)
        }


def codes_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of integer weight codes that differ."""
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


RewardFunc = Callable[..., list[float]]


def grpo_train(
    model,
    tokenizer,
    problems: Sequence[Problem],
    settings: GRPOSettings,
    *,
    out_dir: str | Path,
    checkpointer: Checkpointer,
    seed: int,
    ref_model=None,
    reward_funcs: Sequence[RewardFunc] | None = None,
    reward_weights: Sequence[float] | None = None,
    log: logging.Logger | None = None,
    desc: str = "rl",
    instruction: str = BOXED_INSTRUCTION,
):
    """Train `model` (with QuantLinears) by GRPO on `problems`; returns (final policy, metrics).

    The final policy is the model itself in `qat` mode, the base with the adapters merged in `lora`
    mode. `reward_funcs` default to (accuracy_reward, format_reward) weighted (1, format_weight);
    each is called as f(prompts=..., completions=[str], completion_ids=..., answer=[gold], ...).
    `ref_model` is required when beta > 0 in `qat` mode. Writes `<out_dir>/metrics.jsonl` (a row per
    step: reward, accuracy, format, entropy, kl when beta > 0, completion_length, truncation_rate,
    loss, lr, grad_norm, sigma, ...). Raises StageInterrupted after checkpointing on SIGTERM/SIGINT.
    """
    from accelerate import PartialState
    from transformers import PrinterCallback

    from pipeline.engine.progress import progress
    from pipeline.train.grpo_trainer import EngineCallback, QuantGRPOTrainer, tensorboard_callback

    log = log or logging.getLogger(__name__)
    if settings.beta > 0 and settings.policy == "qat" and ref_model is None:
        raise ValueError("beta > 0 in qat mode needs a reference model")
    if reward_funcs is None:
        reward_funcs, reward_weights = [accuracy_reward, format_reward], [1.0, settings.format_weight]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if settings.policy == "qat":
        _train_all_but_scales(model)
    codes_before = quant_codes(model)

    scratch = tempfile.TemporaryDirectory(prefix="grpo-")  # TRL wants an output_dir; nothing is saved there
    processes = PartialState().num_processes
    args = _grpo_config(settings, processes, seed, reward_weights, scratch.name)
    signature = {
        "settings": result_config(type(settings), settings.model_dump(mode="json")),
        "seed": seed,
        "prompts": len(problems),
        "processes": processes,
    }
    found = checkpointer.resume(signature, log)
    rows, resume_dir = _resume(found, Path(scratch.name), log)
    trainer = QuantGRPOTrainer(
        model=model,
        reward_funcs=list(reward_funcs),
        args=args,
        train_dataset=_dataset(tokenizer, problems, instruction),
        processing_class=tokenizer,
        peft_config=_lora_config(settings, model),
        seed=seed,
        rollout_spec=rollout_spec(settings),
        aqn=settings.aqn,
        beta=settings.beta,
        ref_model=ref_model,
        resume=found[1] if found else None,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; metrics.jsonl and the bar say it
    if "tensorboard" in settings.report_to:  # transformers' own would write to ./runs: give it the stage's folder
        trainer.add_callback(tensorboard_callback(out_dir / "tensorboard"))
    if trainer.accelerator.is_main_process:
        with open(metrics_path, "w") as f:  # rows after the checkpoint belong to a lost future
            f.writelines(json.dumps(r) + "\n" for r in rows)

    checkpointer.every = settings.checkpoint_every
    started = time.perf_counter()
    try:
        # a first SIGINT/SIGTERM is seen after the step (the engine callback): checkpoint, then stop
        with signals.stop_at_safe_points(), progress(desc, total=settings.steps, unit="step", done=len(rows)) as bar:
            trainer.add_callback(EngineCallback(trainer, checkpointer, metrics_path, rows, signature, bar))
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        scratch.cleanup()
    if checkpointer.stop_requested:
        raise StageInterrupted(f"{desc}: stopped at step {trainer.state.global_step} on a signal; checkpoint saved")
    seconds = time.perf_counter() - started

    policy = trainer.accelerator.unwrap_model(trainer.model)
    if settings.policy == "lora":
        policy = policy.merge_and_unload()
    return policy, _summary(trainer, settings, rows, seconds, codes_changed(codes_before, quant_codes(policy)))


def _train_all_but_scales(model: torch.nn.Module) -> None:
    """`qat` policy: every parameter trains but the QuantLinears' weight scales."""
    from pipeline.quant.apply import quant_linears

    scales = {id(m.weight_scale) for _, m in quant_linears(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) not in scales)


def rollout_spec(settings: GRPOSettings):
    """The GenerationSpec of the rollouts (its seed is set per step and process by the trainer)."""
    from pipeline.generate import GenerationSpec

    return GenerationSpec(
        max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        batch_size=settings.rollout_batch_size,
        backend=settings.backend,
    )


def _grpo_config(settings: GRPOSettings, processes: int, seed: int, reward_weights: Sequence[float], output_dir: str):
    """TRL's GRPOConfig for `settings` on `processes` processes (batch_size being their global batch)."""
    from trl import GRPOConfig

    per_device = settings.batch_size // (processes * settings.grad_accum)
    if per_device * processes * settings.grad_accum != settings.batch_size:
        raise ValueError(
            f"batch_size {settings.batch_size} must be a multiple of processes ({processes}) "
            f"x grad_accum ({settings.grad_accum})"
        )
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=settings.grad_accum,
        num_generations=settings.num_generations,
        learning_rate=settings.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.grad_clip,
        loss_type=settings.loss_type,
        # qat: TRL must not build the reference itself from the model's path (the trainer takes ours)
        beta=settings.beta if settings.policy == "lora" else 0.0,
        epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high,
        scale_rewards=settings.scale_rewards,
        mask_truncated_completions=settings.mask_truncated_completions,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_completion_length=settings.max_completion_length,
        reward_weights=list(reward_weights),
        gradient_checkpointing=settings.gradient_checkpointing,
        disable_dropout=True,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[t for t in settings.report_to if t != "tensorboard"] or "none",  # tensorboard: a callback
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        log_completions=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _lora_config(settings: GRPOSettings, model: torch.nn.Module):
    """`lora` policy: peft's config of an adapter on every QuantLinear; None for `qat`."""
    if settings.policy != "lora":
        return None
    from peft import LoraConfig

    from pipeline.quant.apply import quant_linears

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=[name for name, _ in quant_linears(model)],
        bias="none",
        task_type="CAUSAL_LM",
    )


def _dataset(tokenizer, problems: Sequence[Problem], instruction: str):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [chat_prompt(tokenizer, p.question, instruction) for p in problems],
            "answer": [p.answer for p in problems],
        }
    )


def _resume(found: tuple[int, dict] | None, scratch: Path, log: logging.Logger) -> tuple[list[dict], Path | None]:
    """(the metrics rows so far, the directory to hand transformers' resume: only `trainer_state.json`, the
    trainer loads the rest from the checkpoint `found`) when there is one; ([], None) otherwise."""
    if found is None:
        return [], None
    step, state = found
    resume_dir = scratch / f"resume-{step}"
    resume_dir.mkdir()
    (resume_dir / "trainer_state.json").write_text(state["trainer_state"])
    log.info("resuming from the checkpoint at step %d", step)
    return state["metrics"], resume_dir


def _summary(trainer, settings: GRPOSettings, rows: list[dict], seconds: float, changed: float) -> dict[str, float]:
    """The stage's metrics: means over the last ten steps' rows, and the run's totals."""
    tail = rows[-10:]

    def mean(key):
        values = [r[key] for r in tail if key in r]
        return sum(values) / len(values) if values else float("nan")

    metrics = {
        "steps": trainer.state.global_step,
        "reward": mean("reward"),
        "accuracy": mean("accuracy"),
        "entropy": mean("entropy"),
        "completion_length": mean("completion_length"),
        "train_seconds": seconds,
        "codes_changed": changed,
        "rollout_tokens_per_s": (
            trainer.rollout_tokens / trainer.rollout_seconds if trainer.rollout_seconds > 0 else 0.0
        ),
    }
    if settings.beta > 0:
        metrics["kl"] = mean("kl")
    return metrics
