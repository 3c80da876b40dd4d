"""GRPO on the quantized student: TRL's GRPOTrainer, subclassed where our representation needs it.

    from pipeline.train.rl import GRPOSettings, grpo_train
    policy, metrics = grpo_train(model, tokenizer, problems, GRPOSettings(...), out_dir=ctx.out_dir,
                                 checkpointer=ctx.checkpointer, seed=recipe.seed)

The math is TRL's (GRPO / DAPO / Dr. GRPO / BNPO losses, group-normalised advantages, the clipped
ratio with ε / ε_high, the optional k3 KL to a reference); what `QuantGRPOTrainer` changes is
plumbing, each for a stated reason:

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

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.engine import signals
from pipeline.engine.checkpoint import Checkpointer, StageInterrupted
from pipeline.data.chat import BOXED_INSTRUCTION, chat_prompt
from pipeline.data.problem import Problem
from pipeline.generate import first_stop_end, generate_ids, resolve_backend
from pipeline.quant.apply import decoding_weights, weight_only
from pipeline.engine.stage_api import ADDED_KEY, OPERATIONAL, result_config
from pipeline.train.loop import Tracker

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


# -- AQN ------------------------------------------------------------------------------------------

class AQNSpec(BaseModel):
    """QeRL's adaptive quantization noise: σ decays geometrically over K noisy stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_start: float = Field(1e-2, gt=0)
    """σ of the first noisy stage."""
    sigma_end: float = Field(5e-4, gt=0)
    """σ of the last stage."""
    num_stages: int = Field(10, ge=1)
    """K: noisy stages; training is split into K + 1 equal intervals, the first noise-free."""


def aqn_sigma(step: int, total_steps: int, spec: AQNSpec) -> float:
    """σ for the 0-based optimizer step `step` of `total_steps`.

    Interval i = ⌊step·(K+1)/total⌋: 0 is noise-free, i = k ≥ 1 uses
    σ_k = σ_start·(σ_end/σ_start)^((k−1)/(K−1)) (QeRL's schedule; σ_start when K = 1).
    """
    k_max = spec.num_stages
    k = min(step * (k_max + 1) // total_steps, k_max)
    if k == 0:
        return 0.0
    if k_max == 1:
        return spec.sigma_start
    return spec.sigma_start * (spec.sigma_end / spec.sigma_start) ** ((k - 1) / (k_max - 1))


def rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every RMSNorm with a weight (input/post-attention norms, Qwen3's q/k norms, the final norm)."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None]


@contextmanager
def norm_noise(model: torch.nn.Module, sigma: float, generator: torch.Generator):
    """Within the block, each RMSNorm weight w is w + N(0, σ²); afterwards it is w again, to the bit
    (restored from a copy, since (w + n) − n need not round back to w)."""
    if sigma == 0:
        yield
        return
    saved = []
    with torch.no_grad():
        for norm in rms_norms(model):
            w = norm.weight
            saved.append((w, w.detach().clone()))
            # drawn on the CPU generator: the same noise on every device and process
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32) * sigma
            w.add_(noise.to(device=w.device, dtype=w.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


# -- settings ------------------------------------------------------------------------------------

class GRPOSettings(BaseModel):
    """GRPO knobs (the `rl` stage's Config inherits them); names follow TRL's GRPOConfig and the papers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(100, gt=0)
    """Optimizer steps; one rollout batch per step."""
    batch_size: int = Field(64, gt=0)
    """Completions per optimizer step over all processes and accumulation micro-steps;
    prompts per step = batch_size / num_generations."""
    num_generations: int = Field(8, ge=2)
    """G: completions per prompt, the group whose rewards are normalised into advantages."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step (memory against speed)."""
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate, constant after warmup (as DAPO / TRL); LoRA usually wants ~1e-5."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear learning-rate warmup from 0."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
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
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts (1: off)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling of the rollouts (0: off)."""
    max_completion_length: int = Field(512, gt=0)
    """Most new tokens per rollout completion."""
    rollout_batch_size: int = Field(64, gt=0)
    """Sequences decoded together by pipeline.generate (its `batch_size`)."""
    backend: Literal["auto", "refill", "generate", "static", "continuous"] = "auto"
    """pipeline.generate backend for rollouts."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (QuantLinear's forward is pure, so re-running it is safe)."""
    checkpoint_every: int = Field(50, ge=0, json_schema_extra=OPERATIONAL)
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
    report_to: tuple[Tracker, ...] = Field((), json_schema_extra={**OPERATIONAL, **ADDED_KEY})
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

_RENAME = {"rewards/accuracy_reward/mean": "accuracy", "rewards/format_reward/mean": "format",
           "completions/mean_length": "completion_length", "completions/clipped_ratio": "truncation_rate",
           "learning_rate": "lr"}
"""TRL log keys -> metrics.jsonl names (the rest keep TRL's names)."""


def _trainer_class():
    """QuantGRPOTrainer, built on first use: importing TRL costs seconds, the engine and `--help` need none of it."""
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.models import prepare_deepspeed, unwrap_model_for_generation
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    from pipeline.train.loop import rng_state, set_rng_state

    class QuantGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with our rollouts, reference, AQN and checkpoints (see the module docstring)."""

        def __init__(self, *args, seed: int, rollout_spec, aqn: AQNSpec | None, beta: float,
                     ref_model=None, resume: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.seed = seed
            self.rollout_spec = rollout_spec
            self.aqn = aqn
            self.resume = resume
            self.sigma = 0.0
            self.rollout_tokens = 0
            self.rollout_seconds = 0.0
            if beta > 0 and not is_peft_model(self.model):
                # TRL was given beta = 0 so that it would not rebuild a reference from the model's path
                ref_model.requires_grad_(False)
                if self.args.disable_dropout:
                    disable_dropout_in_model(ref_model)
                add_fused_lm_head(ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
                self.ref_model = (prepare_deepspeed(ref_model, self.accelerator) if self.is_deepspeed_enabled
                                  else self.accelerator.prepare_model(ref_model, evaluation_mode=True))
            self.beta = beta

        def _tokenize_prompts(self, prompts):
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            step, acc = self.state.global_step, self.accelerator
            spec = self.rollout_spec.model_copy(
                update={"seed": (self.seed * 1_000_003 + step) * acc.num_processes + acc.process_index})
            self.sigma = aqn_sigma(step, self.args.max_steps, self.aqn) if self.aqn else 0.0
            noise = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            start = time.perf_counter()
            with unwrap_model_for_generation(self.model_wrapped, acc,
                                             gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                             ) as policy, \
                    self._dist.summon_full_params(self.model_wrapped, recurse=False), \
                    norm_noise(policy, self.sigma, noise):
                if weight_only(policy):
                    with decoding_weights(policy, torch.bfloat16 if self.args.bf16 else None):
                        rows = generate_ids(policy, prompt_ids, spec, self.eos_token_ids, self._tokenizer.pad_token_id)
                else:
                    # activation quantizers must see the fp32 path the loss sees: autocast, and a cache that
                    # keeps keys and values in their own dtypes (refill's or the dynamic one; the static one
                    # takes its dtype from the fp32 keys and refuses the bf16 values)
                    if spec.backend == "auto" and resolve_backend(spec, policy) == "static":
                        spec = spec.model_copy(update={"backend": "generate"})
                    with acc.autocast():
                        rows = generate_ids(policy, prompt_ids, spec, self.eos_token_ids,
                                            self._tokenizer.pad_token_id)
            completions = [cut_at_stop(samples[0], self.eos_token_ids) for samples in rows]
            self.rollout_seconds += time.perf_counter() - start
            self.rollout_tokens += sum(len(c) for c in completions)
            return completions, None

        # -- resume from the engine's checkpoint (transformers reads only trainer_state.json) ----------
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            trainable = dict(model.named_parameters())
            missing = [n for n, p in trainable.items() if p.requires_grad and n not in self.resume["model"]]
            if missing:
                raise RuntimeError(f"the checkpoint lacks trainable parameters {missing[:3]}")
            with torch.no_grad():
                for name, tensor in self.resume["model"].items():
                    trainable[name].copy_(tensor)
            # TRL counts micro-steps to decide when to generate; a checkpoint sits on a step boundary
            self._step = self.resume["step"] * self.args.gradient_accumulation_steps

        def _load_optimizer_and_scheduler(self, checkpoint):
            if self.is_deepspeed_enabled:
                raise RuntimeError("resuming GRPO under DeepSpeed is not supported (its optimizer state is sharded)")
            self.optimizer.load_state_dict(self.resume["optimizer"])
            self.lr_scheduler.load_state_dict(self.resume["scheduler"])

        def _load_rng_state(self, checkpoint):
            set_rng_state(self.resume["rng"])

        def _load_scaler(self, checkpoint):
            pass  # bf16 autocast has no grad scaler

        def checkpoint_state(self, rows: list[dict], signature: dict) -> dict:
            model = self.accelerator.unwrap_model(self.model)
            return {"model": {n: p for n, p in model.named_parameters() if p.requires_grad},
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                    "rng": rng_state(), "trainer_state": self.state_json(), "metrics": rows,
                    "step": self.state.global_step, "signature": signature}

        def state_json(self) -> str:
            with tempfile.TemporaryDirectory() as tmp:
                self.state.save_to_json(f"{tmp}/s.json")
                return Path(f"{tmp}/s.json").read_text()

    return QuantGRPOTrainer


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """ids up to and including the first stop token (what GRPO scores and trains on)."""
    return list(ids[:first_stop_end(ids, set(stops))])


def _engine_callback(trainer, checkpointer: Checkpointer, metrics_path: Path, rows: list[dict], signature: dict,
                     bar):
    """Per step: one metrics row, the progress bar, and a checkpoint when due (on_log runs after the
    step's update and with its metrics, so the checkpoint holds that row)."""
    from transformers import TrainerCallback

    class EngineCallback(TrainerCallback):
        summary: dict = {}
        tokens_seen = 0  # rollout tokens already counted on the bar

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_runtime" in logs:  # the end-of-training summary, not a step
                self.summary = logs
                return
            row = {"step": state.global_step, "sigma": trainer.sigma}
            row.update({_RENAME.get(k, k): float(v) for k, v in logs.items()
                        if isinstance(v, (int, float)) and k != "epoch"})
            rows.append(row)
            if trainer.accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            tokens, self.tokens_seen = trainer.rollout_tokens - self.tokens_seen, trainer.rollout_tokens
            bar.advance(1, tokens=tokens, reward=f"{row.get('reward', 0.0):.3f}",
                        entropy=f"{row.get('entropy', float('nan')):.3f}")
            if checkpointer.due(state.global_step):
                if trainer.accelerator.is_main_process:
                    checkpointer.save(state.global_step, trainer.checkpoint_state(rows, signature))
                trainer.accelerator.wait_for_everyone()
            if checkpointer.stop_requested:
                control.should_training_stop = True

    return EngineCallback()


def quant_codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The integer weight codes of every QuantLinear (what export packs), on the CPU: the policy moves to
    the GPU between the codes before training and those after, and the first set waits in CPU memory."""
    from pipeline.quant import fake
    from pipeline.quant.apply import quant_linears

    with torch.no_grad():
        return {name: fake.quantize(m.weight.float(), m.weight_scale.float(), m.weight_zero_point,
                                    m.weights.num_bits, m.weights.group_size).to("cpu", torch.int8)
                for name, m in quant_linears(model)}


def codes_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of integer weight codes that differ."""
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


RewardFunc = Callable[..., list[float]]


def _tensorboard_callback(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def grpo_train(model, tokenizer, problems: Sequence[Problem], settings: GRPOSettings, *, out_dir: str | Path,
               checkpointer: Checkpointer, seed: int, ref_model=None,
               reward_funcs: Sequence[RewardFunc] | None = None, reward_weights: Sequence[float] | None = None,
               log: logging.Logger | None = None, desc: str = "rl", instruction: str = BOXED_INSTRUCTION):
    """Train `model` (with QuantLinears) by GRPO on `problems`; returns (final policy, metrics).

    The final policy is the model itself in `qat` mode, the base with the adapters merged in `lora`
    mode. `reward_funcs` default to (accuracy_reward, format_reward) weighted (1, format_weight);
    each is called as f(prompts=..., completions=[str], completion_ids=..., answer=[gold], ...).
    `ref_model` is required when beta > 0 in `qat` mode. Writes `<out_dir>/metrics.jsonl` (a row per
    step: reward, accuracy, format, entropy, kl when beta > 0, completion_length, truncation_rate,
    loss, lr, grad_norm, sigma, ...). Raises StageInterrupted after checkpointing on SIGTERM/SIGINT.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from pipeline.generate import GenerationSpec
    from pipeline.engine.progress import progress
    from pipeline.quant.apply import quant_linears

    log = log or logging.getLogger(__name__)
    if settings.beta > 0 and settings.policy == "qat" and ref_model is None:
        raise ValueError("beta > 0 in qat mode needs a reference model")
    if reward_funcs is None:
        reward_funcs, reward_weights = [accuracy_reward, format_reward], [1.0, settings.format_weight]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    lora = settings.policy == "lora"
    if not lora:
        scales = {id(m.weight_scale) for _, m in quant_linears(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) not in scales)
    codes_before = quant_codes(model)

    scratch = tempfile.TemporaryDirectory(prefix="grpo-")  # TRL wants an output_dir; nothing is saved there
    from accelerate import PartialState

    processes = PartialState().num_processes
    per_device = settings.batch_size // (processes * settings.grad_accum)
    if per_device * processes * settings.grad_accum != settings.batch_size:
        raise ValueError(f"batch_size {settings.batch_size} must be a multiple of processes ({processes}) "
                         f"x grad_accum ({settings.grad_accum})")
    args = GRPOConfig(
        output_dir=scratch.name, max_steps=settings.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=settings.grad_accum, num_generations=settings.num_generations,
        learning_rate=settings.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, max_grad_norm=settings.grad_clip, loss_type=settings.loss_type,
        beta=settings.beta if lora else 0.0, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high,
        scale_rewards=settings.scale_rewards, mask_truncated_completions=settings.mask_truncated_completions,
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        max_completion_length=settings.max_completion_length, reward_weights=list(reward_weights),
        gradient_checkpointing=settings.gradient_checkpointing, disable_dropout=True, bf16=bf16,
        seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[t for t in settings.report_to if t != "tensorboard"] or "none",  # tensorboard: below
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    rollout = GenerationSpec(max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                             top_p=settings.top_p, top_k=settings.top_k, batch_size=settings.rollout_batch_size,
                             backend=settings.backend)
    peft_config = None
    if lora:
        peft_config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                                 target_modules=[name for name, _ in quant_linears(model)], bias="none",
                                 task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"prompt": [chat_prompt(tokenizer, p.question, instruction) for p in problems],
                                 "answer": [p.answer for p in problems]})

    signature = {"settings": result_config(type(settings), settings.model_dump(mode="json")), "seed": seed, "prompts": len(problems),
                 "processes": processes}
    rows: list[dict] = []
    found = checkpointer.resume(signature, log)
    resume_dir = None
    if found is not None:
        step, state = found
        rows = state["metrics"]
        resume_dir = Path(scratch.name) / f"resume-{step}"
        resume_dir.mkdir()
        (resume_dir / "trainer_state.json").write_text(state["trainer_state"])
        log.info("resuming from the checkpoint at step %d", step)
    trainer = _trainer_class()(
        model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, seed=seed, rollout_spec=rollout, aqn=settings.aqn, beta=settings.beta,
        ref_model=ref_model, resume=found[1] if found else None)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; metrics.jsonl and the bar say it
    if "tensorboard" in settings.report_to:  # transformers' own would write to ./runs: give it the stage's folder
        trainer.add_callback(_tensorboard_callback(Path(out_dir) / "tensorboard"))
    if trainer.accelerator.is_main_process:
        with open(metrics_path, "w") as f:  # rows after the checkpoint belong to a lost future
            f.writelines(json.dumps(r) + "\n" for r in rows)

    checkpointer.every = settings.checkpoint_every
    started = time.perf_counter()
    try:
        # a first SIGINT/SIGTERM is seen after the step (the engine callback): checkpoint, then stop
        with signals.stop_at_safe_points(), progress(desc, total=settings.steps, unit="step", done=len(rows)) as bar:
            trainer.add_callback(_engine_callback(trainer, checkpointer, metrics_path, rows, signature, bar))
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        scratch.cleanup()
    if checkpointer.stop_requested:
        raise StageInterrupted(f"{desc}: stopped at step {trainer.state.global_step} on a signal; checkpoint saved")
    seconds = time.perf_counter() - started

    policy = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        policy = policy.merge_and_unload()
    tail = rows[-10:]

    def mean(key):
        values = [r[key] for r in tail if key in r]
        return sum(values) / len(values) if values else float("nan")

    metrics = {"steps": trainer.state.global_step, "reward": mean("reward"), "accuracy": mean("accuracy"),
               "entropy": mean("entropy"), "completion_length": mean("completion_length"),
               "train_seconds": seconds, "codes_changed": codes_changed(codes_before, quant_codes(policy)),
               "rollout_tokens_per_s": (trainer.rollout_tokens / trainer.rollout_seconds
                                        if trainer.rollout_seconds > 0 else 0.0)}
    if settings.beta > 0:
        metrics["kl"] = mean("kl")
    return policy, metrics
