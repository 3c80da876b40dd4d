"""QuantGRPOTrainer: TRL's GRPOTrainer with our rollouts, reference, AQN and checkpoints, and the callback that
writes the engine's metrics rows and checkpoints. pipeline.train.rl says what each departure from stock TRL is
for; this module holds the code that needs TRL, so that importing pipeline.train.rl does not (importing TRL costs
seconds, and the engine and `--help` need none of it): `grpo_train` imports this module when it runs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

from pipeline.engine.checkpoint import Checkpointer
from pipeline.generate import GenerationSpec, first_stop_end, generate_ids, resolve_backend
from pipeline.quant.apply import decoding_weights, weight_only
from pipeline.train.loop import rng_state, set_rng_state
from pipeline.train.aqn import AQNSpec, aqn_sigma, norm_noise

RENAME = {
    "rewards/accuracy_reward/mean": "accuracy",
    "rewards/format_reward/mean": "format",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "truncation_rate",
    "learning_rate": "lr",
}
"""TRL log keys -> metrics.jsonl names (the rest keep TRL's names)."""


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """ids up to and including the first stop token (what GRPO scores and trains on)."""
    return list(ids[: first_stop_end(ids, set(stops))])


class QuantGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with our rollouts, reference, AQN and checkpoints (see the module docstring)."""

    def __init__(
        self,
        *args,
        seed: int,
        rollout_spec: GenerationSpec,
        aqn: AQNSpec | None,
        beta: float,
        ref_model=None,
        resume: dict | None = None,
        **kwargs,
    ):
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
            add_fused_lm_head(
                ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
            )
            self.ref_model = (
                prepare_deepspeed(ref_model, self.accelerator)
                if self.is_deepspeed_enabled
                else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            )
        self.beta = beta

    def _tokenize_prompts(self, prompts):
        return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        step, acc = self.state.global_step, self.accelerator
        spec = self.rollout_spec.model_copy(
            update={"seed": (self.seed * 1_000_003 + step) * acc.num_processes + acc.process_index}
        )
        self.sigma = aqn_sigma(step, self.args.max_steps, self.aqn) if self.aqn else 0.0
        noise = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        start = time.perf_counter()
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                acc,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as policy,
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
            norm_noise(policy, self.sigma, noise),
        ):
            rows = self._decode(policy, prompt_ids, spec)
        completions = [cut_at_stop(samples[0], self.eos_token_ids) for samples in rows]
        self.rollout_seconds += time.perf_counter() - start
        self.rollout_tokens += sum(len(c) for c in completions)
        return completions, None

    def _decode(self, policy, prompt_ids, spec: GenerationSpec):
        """`generate_ids` on the rollout policy: a weight-only one with its q(w) computed once (bf16 on GPU)."""
        if weight_only(policy):
            with decoding_weights(policy, torch.bfloat16 if self.args.bf16 else None):
                return generate_ids(policy, prompt_ids, spec, self.eos_token_ids, self._tokenizer.pad_token_id)
        # activation quantizers must see the fp32 path the loss sees: autocast, and a cache that
        # keeps keys and values in their own dtypes (refill's or the dynamic one; the static one
        # takes its dtype from the fp32 keys and refuses the bf16 values)
        if spec.backend == "auto" and resolve_backend(spec, policy) == "static":
            spec = spec.model_copy(update={"backend": "generate"})
        with self.accelerator.autocast():
            return generate_ids(policy, prompt_ids, spec, self.eos_token_ids, self._tokenizer.pad_token_id)

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
        return {
            "model": {n: p for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "rng": rng_state(),
            "trainer_state": self.state_json(),
            "metrics": rows,
            "step": self.state.global_step,
            "signature": signature,
        }

    def state_json(self) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            self.state.save_to_json(f"{tmp}/s.json")
            return Path(f"{tmp}/s.json").read_text()


class EngineCallback(TrainerCallback):
    """Per step: one metrics row (in `rows` and metrics.jsonl), the progress bar, and a checkpoint when due (on_log
    runs after the step's update and with its metrics, so the checkpoint holds that row); a stop when a signal asked
    for one (pipeline.engine.signals, through `checkpointer.stop_requested`)."""

    def __init__(
        self,
        trainer: QuantGRPOTrainer,
        checkpointer: Checkpointer,
        metrics_path: Path,
        rows: list[dict],
        signature: dict,
        bar,
    ):
        self.trainer, self.checkpointer, self.metrics_path = trainer, checkpointer, metrics_path
        self.rows, self.signature, self.bar = rows, signature, bar
        self.summary: dict = {}
        self.tokens_seen = 0  # rollout tokens already counted on the bar

    def on_log(self, args, state, control, logs=None, **kwargs):
        trainer, checkpointer = self.trainer, self.checkpointer
        logs = logs or {}
        if "train_runtime" in logs:  # the end-of-training summary, not a step
            self.summary = logs
            return
        row = {"step": state.global_step, "sigma": trainer.sigma}
        row.update(
            {RENAME.get(k, k): float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
        )
        self.rows.append(row)
        if trainer.accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        tokens, self.tokens_seen = trainer.rollout_tokens - self.tokens_seen, trainer.rollout_tokens
        self.bar.advance(
            1, tokens=tokens, reward=f"{row.get('reward', 0.0):.3f}", entropy=f"{row.get('entropy', float('nan')):.3f}"
        )
        if checkpointer.due(state.global_step):
            if trainer.accelerator.is_main_process:
                checkpointer.save(state.global_step, trainer.checkpoint_state(self.rows, self.signature))
            trainer.accelerator.wait_for_everyone()
        if checkpointer.stop_requested:
            control.should_training_stop = True


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoardCallback writing to `log_dir` (its own default is ./runs)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))
