"""The one generation path: eval, traces, the RL gate and rollouts all sample through `generate`.

    from pipeline.generate import GenerationSpec, generate
    spec = GenerationSpec(max_new_tokens=512, temperature=0.6, top_p=0.95, top_k=20, num_samples=4)
    outs = generate(model, tokenizer, [p.question for p in problems], spec)
    outs[i][k].text, outs[i][k].num_tokens, outs[i][k].truncated     # prompt i, sample k

Each question is wrapped in the model's chat template (`pipeline.data.chat.chat_prompt`); decoding stops
at the model's end-of-turn / end-of-text tokens or after `max_new_tokens`. All decoding runs the model's
own forward (transformers), through one of these backends (`GenerationSpec.backend`):

- `refill` (opt-in until measured against `static` on the GPU at reasoning lengths): `pipeline.refill`, batches that
  refill: a sequence that stops leaves at once and a waiting prompt takes its slot; the number of
  sequences in flight comes from the free device memory (at most `batch_size`), and an out-of-memory
  error halves it and retries instead of failing. Each request samples from its own seeded stream, so
  completions do not depend on batch size or memory. Made for reasoning lengths (thousands of tokens
  of very different lengths); bench/generate.py measures it.
- `generate`: `model.generate` with the dynamic KV cache, left-padded batches of `batch_size` sequences
  of prompts of similar length (sorted, so padding is small; results come back in the caller's order), fewer
  when the free memory cannot hold that many caches of prompt + max_new_tokens.
- `static`: the same with `cache_implementation="static"`, which transformers compiles on CUDA.
- `continuous`: transformers' continuous batching (`model.generate_batch`, a paged KV cache). K samples
  are K requests of the same prompt: `generate_batch` returns only the first of `num_return_sequences`
  (transformers 5.17). It refuses KV-quantized models and, without flash-attn, is slow (see pipeline.refill).
Greedy decoding gives the same tokens with `refill`, `generate` and `static` (tests compare them, in
float32 on CPU; in bf16 near-ties can differ); sampled completions are reproducible per seed on each,
but differ between `refill` and the others (a per-request stream there, one torch generator per call
elsewhere).
With every backend but `continuous`, a model on transformers' `sdpa` attention decodes through
`grouped_sdpa_attention` (below) for the call: K/V read once per KV head instead of copied per query head.

Measured on one H200 (Qwen3-0.6B shape, random bf16 weights, 256-token prompts, 512 new tokens,
bench/generate.py before `refill` existed, tokens/s): 64 prompts: plain generate 2,282, static + compile
5,375, static + grouped attention 9,294, continuous batching 602; 256 prompts: plain 8,867, static 7,744,
static + grouped 13,832, continuous batching with CUDA graphs 1,387 (its paged attention has no fast
kernel without flash-attn, which the GPU image lacks); 512 prompts: plain 11,749, static + grouped 15,996.
On CPU continuous batching sizes its cache from free RAM (a tiny model's call was killed for memory
here) and needs an explicit ContinuousBatchingConfig to run.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AttentionInterface,
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from pipeline import refill
from pipeline.data.chat import BOXED_INSTRUCTION, chat_prompt, end_of_turn_id
from pipeline.engine.progress import Bar, progress
from pipeline.engine.stage_api import SEED_MAX
from pipeline.stops import first_stop_end

log = logging.getLogger(__name__)

_CUTS_SAID: set[tuple[int, int, int]] = set()
"""(sequences at a time, batch_size, cache length) of the batch cuts already logged by this process."""
_STATIC_WIDTH_STEP = 64
"""Prompt widths of the static backend are rounded up to a multiple of this."""


class GenerationSpec(BaseModel):
    """How to sample completions; the `generation` block of eval / traces / gate / rl configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(512, gt=0)
    """Longest completion; one that reaches it without an end token is `truncated`."""
    temperature: float = Field(0.0, ge=0, allow_inf_nan=False)
    """0 = greedy decoding; > 0 = sampling (Qwen3 cards: 0.6 for thinking mode)."""
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    """Nucleus sampling mass (sampling only; 1 = off)."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens (sampling only; 0 = off)."""
    num_samples: int = Field(1, ge=1)
    """Completions per prompt (K of avg@K / pass@K); > 1 needs temperature > 0."""
    batch_size: int = Field(64, ge=1)
    """Sequences decoded together (prompts x samples); fewer when the free device memory cannot hold that many KV
    caches at full length (prompt + max_new_tokens; a warning says so); `continuous` sizes its batches itself."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seeds the sampler, so the same model, prompts and spec give the same completions."""
    backend: Literal["auto", "refill", "generate", "static", "continuous"] = "auto"
    """Decoding path (see pipeline.generate): auto = static on CUDA, generate on CPU; refill for reasoning
    lengths (batches that refill, sized from free memory)."""

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs temperature > 0 (greedy decoding gives K equal samples)")
        return self

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Completion:
    """One sampled completion of one prompt."""

    text: str
    """The assistant text, special tokens removed."""
    token_ids: list[int]
    """Generated ids, the stop token included when there is one (what RL rollouts score)."""
    num_tokens: int
    """len(token_ids): the decoding steps this completion took."""
    truncated: bool
    """Hit max_new_tokens without a stop token."""


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's own eos ids and the chat template's end of turn (Qwen3 stops at `<|im_end|>` and
    `<|endoftext|>`, Llama-3 at `<|eot_id|>`)."""
    ids = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    for token in [configured] if isinstance(configured, int) else list(configured or []):
        ids.append(int(token))
    for token in (end_of_turn_id(tokenizer), tokenizer.eos_token_id):
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    if not ids:
        raise ValueError(
            "the tokenizer has no end-of-turn token and the model no eos_token_id: decoding would never stop"
        )
    return ids


def _generation_config(
    spec: GenerationSpec,
    stops: list[int],
    pad_id: int,
    num_return_sequences: int,
    cache_implementation: str | None = None,
) -> GenerationConfig:
    sampling = (
        dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
        if spec.do_sample
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    # use_cache explicitly: a model saved after training with gradient checkpointing (TRL turns the
    # cache off) carries use_cache=False, which generate would otherwise take: O(n^2) decoding
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad_id,
        num_return_sequences=num_return_sequences,
        use_cache=True,
        cache_implementation=cache_implementation,
        **sampling,
    )


def _completion(ids: list[int], stops: set[int], tokenizer) -> Completion:
    end = first_stop_end(ids, stops)
    ids = ids if end is None else ids[:end]
    return Completion(
        text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids, num_tokens=len(ids), truncated=end is None
    )


def _generate_padded(
    model,
    prompt_ids: list[list[int]],
    spec: GenerationSpec,
    stops: list[int],
    pad_id: int,
    cache_implementation: str | None,
    bar: Bar,
) -> list[list[list[int]]]:
    k = spec.num_samples
    # a batch's cache grows to batch x (prompt + max new tokens) (the static cache holds that from its first step):
    # batches are cut to what the free memory holds, as refill sizes its slots, rather than running out of memory
    # minutes in on a max_new_tokens the user set for the longest answer
    capacity = _padded_width(max(map(len, prompt_ids)), cache_implementation) + spec.max_new_tokens
    fitting = refill.slot_count(model, capacity, spec.batch_size, refill.free_memory_bytes(model.device))
    per_batch = max(1, min(spec.batch_size, fitting) // k)
    cut = (per_batch, spec.batch_size, capacity)
    if per_batch < min(max(1, spec.batch_size // k), len(prompt_ids)) and cut not in _CUTS_SAID:
        _CUTS_SAID.add(cut)  # once: RL rollouts and held-out evals generate again every few steps
        log.warning(
            "generate: %d sequences at a time, not batch_size %d: the free memory holds %d caches of %d tokens",
            per_batch * k,
            spec.batch_size,
            fitting,
            capacity,
        )
    config = _generation_config(spec, stops, pad_id, k, cache_implementation)
    # Sorting by length keeps each batch's left padding small; `order` maps back to the caller's order.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[list[list[int]]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), per_batch):
        batch = order[start : start + per_batch]
        width = _padded_width(max(len(prompt_ids[i]) for i in batch), cache_implementation)
        input_ids = torch.tensor([[pad_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in batch])
        attention_mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in batch])
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            generation_config=config,
        )
        rows = generated[:, width:].tolist()  # (len(batch) * k, new tokens), samples of one prompt adjacent
        for j, i in enumerate(batch):
            out[i] = rows[j * k : (j + 1) * k]
        bar.advance(len(rows), tokens=_decoded_tokens(rows, set(stops)))
    return out


def _padded_width(width: int, cache_implementation: str | None) -> int:
    """The static backend's compiled step is specialised to the cache length: its prompt widths are rounded up, so
    that few distinct widths mean few recompiles."""
    if cache_implementation == "static":
        return -(-width // _STATIC_WIDTH_STEP) * _STATIC_WIDTH_STEP
    return width


def _decoded_tokens(rows: list[list[int]], stops: set[int]) -> int:
    """Tokens up to each row's first stop (what was generated; the rest is padding)."""
    return sum(first_stop_end(ids, stops) or len(ids) for ids in rows)


def _generate_continuous(
    model, prompt_ids: list[list[int]], spec: GenerationSpec, stops: list[int], pad_id: int, bar: Bar
) -> list[list[list[int]]]:
    from transformers import ContinuousBatchingConfig

    k = spec.num_samples
    config = _generation_config(spec, stops, pad_id, 1)
    requests = [ids for ids in prompt_ids for _ in range(k)]
    results = model.generate_batch(
        inputs=requests, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(seed=spec.seed)
    )
    # generate_batch logs failures and returns what finished: a missing or failed request is an error here
    outputs = list(results.values())
    failed = [o.request_id for o in outputs if o.error is not None]
    if len(outputs) != len(requests) or failed:
        raise RuntimeError(
            f"continuous batching returned {len(outputs)} of {len(requests)} requests"
            + (f"; failed: {failed[:5]}" if failed else "")
        )
    rows = [list(o.generated_tokens) for o in outputs]
    bar.advance(len(rows), tokens=_decoded_tokens(rows, set(stops)))  # generate_batch reports nothing on the way
    return [rows[i * k : (i + 1) * k] for i in range(len(prompt_ids))]


GROUPED_SDPA = "sdpa_grouped"


def grouped_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """SDPA for grouped-query attention with a mask, without copying K/V once per query head.

    transformers' sdpa path repeats K and V `num_key_value_groups` times whenever there is a mask
    (torch's GQA support needs mask=None), and a static cache always has one: in decoding that copy
    is most of the memory traffic. Here the query heads that share a KV head are folded into the
    query-length axis instead, (b, kv_heads * groups, q, d) -> (b, kv_heads, groups * q, d), and the
    mask rows repeated to match, so each KV head is read once. Same result as sdpa (a test checks).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or attention_mask is None or dropout > 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    b, heads, q_len, d = query.shape
    query = query.reshape(b, heads // groups, groups * q_len, d)  # row g * q_len + t: head g of the group, token t
    mask = attention_mask.repeat(1, 1, groups, 1) if attention_mask.shape[2] > 1 else attention_mask
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q_len, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _generate_refill(
    model,
    prompt_ids: list[list[int]],
    spec: GenerationSpec,
    stops: list[int],
    pad_id: int,
    max_new_tokens: list[int],
    bar: Bar,
) -> list[list[list[int]]]:
    k = spec.num_samples
    warpers = None
    if spec.do_sample:  # generate's warpers, in generate's order
        warpers = LogitsProcessorList(
            [TemperatureLogitsWarper(spec.temperature)]
            + ([TopKLogitsWarper(spec.top_k)] if spec.top_k else [])
            + ([TopPLogitsWarper(spec.top_p)] if spec.top_p < 1 else [])
        )
    # request i * k + j is sample j of prompt i: its index seeds its sampling stream
    rows = refill.decode(
        model,
        [ids for ids in prompt_ids for _ in range(k)],
        [limit for limit in max_new_tokens for _ in range(k)],
        stops=set(stops),
        pad_id=pad_id,
        warpers=warpers,
        seed=spec.seed,
        max_slots=spec.batch_size,
        bar=bar,
    )
    return [rows[i * k : (i + 1) * k] for i in range(len(prompt_ids))]


def resolve_backend(spec: GenerationSpec, model) -> str:
    if spec.backend != "auto":
        return spec.backend
    return "static" if model.device.type == "cuda" else "generate"


@torch.no_grad()  # not inference_mode: continuous batching updates its cache in place from another thread
def generate_ids(
    model,
    prompt_ids: list[list[int]],
    spec: GenerationSpec,
    stops: list[int],
    pad_id: int,
    max_new_tokens: list[int] | None = None,
) -> list[list[list[int]]]:
    """Token level: for each prompt (ids, chat template already applied) K lists of generated ids,
    each cut after its first stop token when it has one; sequences past a stop may hold pad ids.

    `max_new_tokens`: a budget per prompt instead of spec.max_new_tokens (refill backend only; the
    benchmark plants reasoning lengths with it)."""
    if not prompt_ids:
        return []
    backend = resolve_backend(spec, model)
    if max_new_tokens is not None and backend != "refill":
        raise ValueError(f"per-prompt max_new_tokens needs the refill backend, not {backend!r}")
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    attn = model.config._attn_implementation
    decoding_attn = GROUPED_SDPA if attn == "sdpa" else attn  # a quantized model's own attention (KV quant) stays
    if backend == "refill":
        decoding_attn = refill.row_chunked_implementation(decoding_attn)
    if decoding_attn != attn and backend != "continuous":
        model.set_attn_implementation(decoding_attn)
    from pipeline.quant.apply import decoding_weights, weight_only

    # a weight-only quantized model decodes on q(w) computed once, not re-quantized at every token
    frozen = decoding_weights(model) if weight_only(model) else nullcontext()
    sequences = len(prompt_ids) * spec.num_samples
    try:
        # fork_rng: seed sampling without moving the caller's RNG
        with (
            frozen,
            torch.random.fork_rng(devices=devices),
            progress("generate", total=sequences, unit="sequences") as bar,
        ):
            torch.manual_seed(spec.seed)
            if backend == "refill":
                return _generate_refill(
                    model,
                    prompt_ids,
                    spec,
                    stops,
                    pad_id,
                    max_new_tokens or [spec.max_new_tokens] * len(prompt_ids),
                    bar,
                )
            if backend == "continuous":
                return _generate_continuous(model, prompt_ids, spec, stops, pad_id, bar)
            return _generate_padded(
                model, prompt_ids, spec, stops, pad_id, "static" if backend == "static" else None, bar
            )
    finally:
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
        model.train(was_training)


def generate(
    model, tokenizer, questions: list[str], spec: GenerationSpec, instruction: str = BOXED_INSTRUCTION
) -> list[list[Completion]]:
    """K = spec.num_samples completions for each question (asked with `instruction`), in the order of `questions`."""
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompt_ids = [
        tokenizer(chat_prompt(tokenizer, q, instruction), add_special_tokens=False)["input_ids"] for q in questions
    ]
    rows = generate_ids(model, prompt_ids, spec, stops, pad_id)
    stop_set = set(stops)
    return [[_completion(ids, stop_set, tokenizer) for ids in samples] for samples in rows]
