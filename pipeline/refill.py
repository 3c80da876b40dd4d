"""Refilling batches: the decode loop behind pipeline.generate's opt-in backend, `refill`.

    from pipeline.refill import decode
    rows = decode(model, prompts, max_new_tokens, stops={eos}, warpers=None, seed=0, max_slots=256, bar=bar)

Reasoning traces, eval and GRPO rollouts decode thousands to tens of thousands of tokens per sequence,
with lengths an order of magnitude apart. A batch that runs until its longest sequence stops
(`model.generate`) spends most of its steps on rows that already finished, and a static cache holds
batch x (prompt + max_new_tokens) for the whole call. Here a sequence that stops leaves the batch and
a waiting prompt takes its slot, and the number of slots comes from the memory free on the device.

- Slots. `SlotCache` (transformers' Cache API, so the model's own attention modules write and read it)
  holds per layer keys and values of shape (slots, kv_heads, capacity, head_dim), capacity = longest
  prompt + largest budget. A slot keeps its sequence left-aligned; a decode step writes each slot's new
  token at that slot's own length and position, and the padding mask hides the columns past it.
- Admission. A new prompt is prefilled right-padded, all but its last token, so its keys land in columns
  0..P-2 of its slot (pads after them are never attended); the next decode step feeds the last token
  like any other, so prefill and decode need no alignment.
- Memory. slots = (free memory - working set) / (capacity x KV bytes per token), at most `max_slots`.
  On an out-of-memory error the sequences in flight start again with half the slots: their tokens are a
  function of the request alone (below), so only time is lost.
- Attention reads what is live. On CUDA, for a model whose attention is plain softmax attention
  (PLAIN_ATTENTION), every slot decodes every step through a FlexAttention block mask built from each
  row's length (`live_blocks`: a row reads only the LIVE_BLOCK-wide blocks it has filled), with shapes
  and addresses fixed for the batch's life, so the whole forward is captured once as a CUDA graph and
  replayed: an eager step of a small model is tens of ms of host time (Qwen3-0.6B: ~40 ms for ~8 ms of
  GPU work on an H100), a replay one launch. Elsewhere (CPU, a KV-quantized attention) the eager path:
  the rows are split into a few contiguous chunks, each attending over its own longest row
  (`row_windows`, passed to the attention wrapper `rows_<impl>`); rows are kept ordered by length
  (re-sorted when the reads saved outweigh the copy), so a short sequence does not read the padding of a
  long one. At reasoning lengths these reads (KV bytes x context, per token) bound a GPU's decoding.
- Sampling per request. Request i draws from its own stream of uniforms (numpy, seeded by (seed, i)):
  inverse-CDF sampling of the distribution after transformers' temperature / top-k / top-p warpers.
  So a sequence's tokens do not depend on which others share its batch, on the slot count or on a
  retry. Greedy decoding is argmax, as in `model.generate`.
- One host sync per `SYNC_EVERY` steps on CUDA (every step on CPU): stop tokens are seen then, and a
  stopped sequence runs at most SYNC_EVERY - 1 extra steps (discarded) while the host queues work ahead.

Why hand-written: transformers' `generate` cannot refill a batch. Its continuous batching
(`generate_batch`) can, but (5.17) without flash-attn (not in our GPU image) its paged attention packs
every sequence of a step into one masked attention whose cost grows with batch x total context, it
refuses our KV-quantized attention (`paged|kvq_sdpa` is no implementation it knows), it sizes its
cache from all free memory also on CPU, and it seeds one sampler per manager, not per request. The
model forward, attention functions, masks and logits warpers used here are transformers' own.
"""

from __future__ import annotations

import functools
import gc
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface, LogitsProcessorList
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pipeline.engine.progress import Bar
from pipeline.stops import first_stop_end

log = logging.getLogger(__name__)

SYNC_EVERY = 16
"""Decode steps between host syncs on CUDA (stop detection, admission, re-sorting)."""
PREFILL_TOKENS = 8192
"""Prompt tokens prefilled in one forward (longer single prompts go alone)."""
CHUNK_COST_TOKENS = 65536
"""A further attention chunk must save reading this many tokens' keys and values: it costs one more
attention call per layer (~1.5 ms of host time for a 28-layer model, what reading ~40k tokens' KV of
Qwen3-0.6B takes on an H100), and an eager decode step of a small model is often bound by host time
anyway. An estimate to tune on the GPU; it only sets how finely rows split."""
RESORT_HORIZON = 64
"""Steps over which the reads saved by re-sorting the rows must repay the copy."""
MEMORY_FRACTION = 0.9
"""Share of the free device memory the slots and the working set may take."""
ROWS_PREFIX = "rows_"
LIVE_BLOCK = 128
"""Columns per block of the live-block attention: a row reads ceil((length + 1) / LIVE_BLOCK) blocks a step."""
PLAIN_ATTENTION = frozenset({"sdpa", "sdpa_grouped"})
"""Attention implementations that are softmax(q k^T) v and nothing else (pipeline.generate's grouped SDPA among
them), so the live-block path computes what they compute. A KV-quantized attention keeps its own function."""
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Every SDPA backend but cuDNN's. A decode step attends over a width that grows by one token a step, and cuDNN
builds (and caches) an execution plan per shape: on an H100 (torch 2.11) every step paid ~2.4 ms of host time per
attention call planning, 67 ms a step for Qwen3-0.6B's 28 layers, against 8 ms of GPU work. The memory-efficient
kernel takes the padding mask with no per-shape planning."""


# -- memory ---------------------------------------------------------------------------------------
def kv_bytes_per_token(model) -> int:
    """Key + value bytes one token takes in the cache, all layers (Qwen3-0.6B in bf16: 112 KiB)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * kv_heads * head_dim * 2 * model.dtype.itemsize


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can take: free on the GPU plus what PyTorch's allocator holds unused; on CPU, RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def slot_count(model, capacity: int, max_slots: int, free_bytes: int) -> int:
    """Slots whose caches (capacity tokens each) and decode working set fit in MEMORY_FRACTION of free_bytes."""
    config = model.config.get_text_config()
    kv = kv_bytes_per_token(model)
    # per slot: its cache, a copy of one layer's share when rows are re-sorted, and the float32 logits,
    # float64 probabilities and CDF of one row (sampling)
    per_slot = capacity * kv * (1 + 1 / config.num_hidden_layers) + config.vocab_size * 24
    prefill = PREFILL_TOKENS * (4 * config.hidden_size + 3 * config.intermediate_size) * 4
    return max(1, min(max_slots, int((free_bytes * MEMORY_FRACTION - prefill) // per_slot)))


# -- sampling -------------------------------------------------------------------------------------
def uniforms(seed: int, index: int, count: int) -> np.ndarray:
    """Request `index`'s stream of uniforms in [0, 1): one per decoding step."""
    return np.random.default_rng([seed, index]).random(count)


def next_tokens(logits: torch.Tensor, u: torch.Tensor | None, warpers: LogitsProcessorList | None) -> torch.Tensor:
    """(rows, vocab) float32 logits -> (rows,) token ids: argmax when `u` is None, else the token whose
    CDF interval (after the warpers) holds u, one uniform per row."""
    if u is None:
        return logits.argmax(-1)
    probs = torch.softmax(warpers(None, logits).double(), dim=-1)
    cdf = probs.cumsum(-1)
    # right=True: the first token whose CDF exceeds u * total, so a token of probability 0 is never drawn
    # (u * total rounding up to total, a 2^-53 event, is clamped to the last token)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


# -- cache ----------------------------------------------------------------------------------------
class _Cursor:
    """What the next forward writes: prefill (slots `rows`, from column 0) or a decode step (slots
    `rows` = 0..n-1, one token each at column `cols[slot]`, attention over the first `width` columns)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    width: int = 0


class _SlotLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, cursor: _Cursor, slots: int, capacity: int):
        super().__init__()
        self.cursor, self.slots, self.capacity = cursor, slots, capacity

    def lazy_initialization(self, key_states, value_states) -> None:
        # keys and values each keep their own dtype: under autocast they can differ (fp32 keys, bf16 values);
        # zeros, not empty: a NaN in a masked column would still poison sdpa's weighted sum
        self.keys = key_states.new_zeros(self.slots, key_states.shape[1], self.capacity, key_states.shape[3])
        self.values = value_states.new_zeros(self.slots, value_states.shape[1], self.capacity, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cursor
        key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        if c.cols is None:  # prefill: (rows, kv_heads, q, head_dim) into columns 0..q-1; attention sees just these
            q = key_states.shape[2]
            self.keys[c.rows, :, :q] = key_states
            self.values[c.rows, :, :q] = value_states
            return key_states, value_states
        n = key_states.shape[0]
        self.keys[c.rows, :, c.cols] = key_states[:, :, 0]
        self.values[c.rows, :, c.cols] = value_states[:, :, 0]
        return self.keys[:n, :, : c.width], self.values[:n, :, : c.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length if self.cursor.cols is None else self.cursor.width), 0

    def get_seq_length(self) -> int:
        # transformers takes the query offset from here: the causal mask lets query q see columns <= offset + q
        return 0 if self.cursor.cols is None else self.cursor.width - 1

    def get_max_length(self) -> int:
        return self.capacity


class SlotCache(Cache):
    """Per-slot KV caches for the refilling decode loop (see the module docstring)."""

    def __init__(self, num_layers: int, slots: int, capacity: int):
        self.cursor = _Cursor()
        super().__init__(layers=[_SlotLayer(self.cursor, slots, capacity) for _ in range(num_layers)])

    @property
    def is_compileable(self) -> bool:
        # read by transformers' mask builder alone: True makes it build each decode step's mask instead of
        # first testing the padding mask for all-ones, a host sync per step that would stop the host from
        # queueing steps ahead of the GPU
        return True

    def prefill(self, rows: torch.Tensor) -> None:
        self.cursor.rows, self.cursor.cols = rows, None

    def decode(self, rows: torch.Tensor, cols: torch.Tensor, width: int) -> None:
        self.cursor.rows, self.cursor.cols, self.cursor.width = rows, cols, width

    def permute(self, order: torch.Tensor) -> None:
        """Slot j takes what slot order[j] held."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[order], layer.values[order]


# -- attention over row chunks --------------------------------------------------------------------
def _row_chunked(base):
    def attention(module, query, key, value, attention_mask, row_windows=None, live_blocks=None, **kwargs):
        if live_blocks is not None:
            return live_attention(query, key, value, live_blocks, kwargs.get("scaling")), None
        if row_windows is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        outputs = []
        for start, end, width in row_windows:  # rows start..end-1 attend over their first `width` columns
            mask = None if attention_mask is None else attention_mask[start:end, ..., :width]
            out, _ = base(
                module, query[start:end], key[start:end, :, :width], value[start:end, :, :width], mask, **kwargs
            )
            outputs.append(out)
        return torch.cat(outputs), None

    return attention


def row_chunked_implementation(name: str) -> str:
    """The name of `name` wrapped to take `row_windows` (registered on first use); `name` itself when it is
    not a registered function (transformers' `eager` is each model's own): then rows are not chunked."""
    if name not in ALL_ATTENTION_FUNCTIONS or name not in ALL_MASK_ATTENTION_FUNCTIONS:
        return name
    wrapped = ROWS_PREFIX + name
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(wrapped, _row_chunked(ALL_ATTENTION_FUNCTIONS[name]))
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return wrapped


def plan_chunks(lens: list[int], chunk_cost: int | None) -> list[tuple[int, int, int]]:
    """Split rows 0..len(lens)-1 (cached tokens per row) into 1, 2, 4 or 8 equal contiguous chunks, each
    (start, end, width = longest row + 1), whichever reads least: sum of rows x width + chunk_cost per chunk
    (None: one chunk, the attention cannot split rows)."""
    best, best_cost = None, None
    for k in (1,) if chunk_cost is None else (1, 2, 4, 8):
        if k > len(lens):
            break
        bounds = [round(i * len(lens) / k) for i in range(k + 1)]
        chunks = [(a, b, max(lens[a:b]) + 1) for a, b in zip(bounds, bounds[1:])]
        cost = reads(chunks) + (chunk_cost or 0) * k
        if best_cost is None or cost < best_cost:
            best, best_cost = chunks, cost
    return best


def reads(chunks: list[tuple[int, int, int]]) -> int:
    return sum((b - a) * width for a, b, width in chunks)


# -- attention over each row's live blocks (CUDA graphs) ------------------------------------------
def live_block_mask(lens: torch.Tensor, capacity: int) -> BlockMask:
    """A FlexAttention block mask for one decode step: row b attends to columns 0..lens[b] (its cached tokens
    and the one written this step) and the kernel reads only the LIVE_BLOCK-wide blocks that hold them. Its
    tensors are views of `lens`: updating `lens` in place (and `refresh_live_blocks`) moves the mask with it,
    which a captured CUDA graph needs (same addresses every replay)."""
    rows, blocks = lens.shape[0], -(-capacity // LIVE_BLOCK)
    count = torch.zeros(rows, 1, 1, dtype=torch.int32, device=lens.device)
    order = torch.arange(blocks, dtype=torch.int32, device=lens.device).expand(rows, 1, 1, blocks).contiguous()

    def before_end(b, h, q, kv):
        return kv <= lens[b]

    mask = BlockMask.from_kv_blocks(count, order, BLOCK_SIZE=LIVE_BLOCK, mask_mod=before_end, seq_lengths=(1, capacity))
    refresh_live_blocks(mask, lens)
    return mask


def refresh_live_blocks(mask: BlockMask, lens: torch.Tensor) -> None:
    """The block count of each row after `lens` changed: the blocks holding columns 0..lens[b]."""
    mask.kv_num_blocks.copy_((lens // LIVE_BLOCK + 1).view(-1, 1, 1))


def live_attention(query, key, value, mask: BlockMask, scale: float | None) -> torch.Tensor:
    """(rows, heads, 1, d) queries over (rows, kv_heads, capacity, d) caches, reading only live blocks; the
    (rows, 1, heads, d) layout transformers' attention functions return. Compiled on CUDA (FlexAttention's
    fused kernel; eager it materialises every score, fine for the CPU tests)."""
    attend = _compiled_flex() if query.is_cuda else flex_attention
    out = attend(query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


# -- the decode loop ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    stops: frozenset[int]
    pad_id: int
    warpers: LogitsProcessorList | None
    seed: int
    sync_every: int
    chunk_cost: int | None
    live_blocks: bool


class _Batch:
    """`slots` sequences in flight over one SlotCache; host copies of each slot's state beside device tensors."""

    def __init__(self, model, slots: int, capacity: int, max_budget: int, settings: _Settings):
        self.model, self.settings, self.device = model, settings, model.device
        self.cache = SlotCache(model.config.get_text_config().num_hidden_layers, slots, capacity)
        self.request: list[int | None] = [None] * slots  # request index per slot, None = free
        self.budget = [0] * slots
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # generated tokens the host has seen
        self.lens = [0] * slots  # cached tokens per slot as of the last sync
        zeros = dict(dtype=torch.long, device=self.device)
        self.lens_dev, self.gen_dev = torch.zeros(slots, **zeros), torch.zeros(slots, **zeros)
        self.next_dev, self.live_dev = torch.zeros(slots, **zeros), torch.zeros(slots, **zeros)
        self.out_dev = torch.zeros(slots, max_budget, **zeros)  # generated ids, column = step of that sequence
        self.u_dev = (
            None
            if settings.warpers is None
            else torch.zeros(slots, max_budget, dtype=torch.float64, device=self.device)
        )
        self.columns = torch.arange(max(capacity, slots), device=self.device)
        self.capacity = capacity
        # live-block decoding: every slot decodes every step, reading its own live blocks (no chunks, no sorting)
        self.live_mask = live_block_mask(self.lens_dev, capacity) if settings.live_blocks else None
        self.graph, self.graph_logits = None, None

    def live(self) -> list[int]:
        return [s for s, r in enumerate(self.request) if r is not None]

    def free_slots(self) -> list[int]:
        """Free slots, those past the last live one first (filling them keeps the rows sorted)."""
        live = self.live()
        end = live[-1] + 1 if live else 0
        free = [s for s, r in enumerate(self.request) if r is None]
        return [s for s in free if s >= end] + [s for s in free if s < end]

    # -- admission --
    def admit(self, new: list[tuple[int, int, list[int], int]]) -> None:
        """Make (slot, request index, prompt, budget) entries live, prefilling at most PREFILL_TOKENS at a time."""
        for slot, index, prompt, budget in new:  # first, so that a failed prefill still knows them in flight
            self.request[slot], self.budget[slot] = index, budget
            self.tokens[slot], self.lens[slot] = [], len(prompt) - 1
        group: list[tuple[int, int, list[int], int]] = []
        for entry in new:
            width = max(len(p) - 1 for _, _, p, _ in group + [entry])
            if group and width * (len(group) + 1) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(entry)
        if group:
            self._prefill(group)

    def _prefill(self, group: list[tuple[int, int, list[int], int]]) -> None:
        rows = torch.tensor([s for s, _, _, _ in group], device=self.device)
        width = max(len(p) - 1 for _, _, p, _ in group)
        if width > 0:
            ids = [p[:-1] + [self.settings.pad_id] * (width - len(p) + 1) for _, _, p, _ in group]
            self.cache.prefill(rows)
            self.model(
                input_ids=torch.tensor(ids, device=self.device),
                use_cache=True,
                past_key_values=self.cache,
                position_ids=self.columns[:width].expand(len(group), -1),
                logits_to_keep=1,
            )
        self.lens_dev[rows] = torch.tensor([len(p) - 1 for _, _, p, _ in group], device=self.device)
        self.next_dev[rows] = torch.tensor([p[-1] for _, _, p, _ in group], device=self.device)
        self.gen_dev[rows] = 0
        self.live_dev[rows] = 1
        if self.u_dev is not None:
            for slot, index, _, budget in group:
                stream = uniforms(self.settings.seed, index, budget)
                self.u_dev[slot, :budget] = torch.from_numpy(stream).to(self.device)

    # -- decoding --
    def plan(self) -> tuple[int, list[tuple[int, int, int]]]:
        """(rows to decode, their chunks); first re-sorts the rows by length when that saves enough reads."""
        if self.live_mask is not None:
            return len(self.request), []
        live = self.live()
        n = live[-1] + 1
        chunks = plan_chunks(self.lens[:n], self.settings.chunk_cost)
        order = sorted(live, key=lambda s: -self.lens[s])
        if order == list(range(len(order))):
            return n, chunks
        ordered = plan_chunks([self.lens[s] for s in order], self.settings.chunk_cost)
        # a re-sort copies every live key and value once (read + write); it pays over the next steps
        if (reads(chunks) - reads(ordered)) * RESORT_HORIZON <= 2 * sum(self.lens[s] for s in live):
            return n, chunks
        self._permute(order + [s for s in range(len(self.request)) if self.request[s] is None])
        return len(order), ordered

    def _permute(self, order: list[int]) -> None:
        index = torch.tensor(order, device=self.device)
        self.cache.permute(index)
        for name in ("lens_dev", "gen_dev", "next_dev", "live_dev", "out_dev", "u_dev"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[index])
        for name in ("request", "budget", "tokens", "lens"):
            values = getattr(self, name)
            setattr(self, name, [values[s] for s in order])

    def step(self, n: int, chunks: list[tuple[int, int, int]], offset: int) -> None:
        """One token for rows 0..n-1, `offset` steps after `chunks` were planned (every live row grew by that)."""
        rows, lens, gen = self.columns[:n], self.lens_dev[:n], self.gen_dev[:n]
        logits = self._live_logits() if self.live_mask is not None else self._chunked_logits(n, chunks, offset)
        token = next_tokens(logits, None if self.u_dev is None else self.u_dev[rows, gen], self.settings.warpers)
        self.out_dev[rows, gen] = token
        self.next_dev[:n] = token
        live = self.live_dev[:n]
        lens += live  # in place: these are views of lens_dev / gen_dev
        gen += live

    def _chunked_logits(self, n: int, chunks: list[tuple[int, int, int]], offset: int) -> torch.Tensor:
        windows = [(a, b, width + offset) for a, b, width in chunks]
        width = max(w for _, _, w in windows)
        lens = self.lens_dev[:n]
        self.cache.decode(self.columns[:n], lens, width)
        extra = {"row_windows": windows} if len(windows) > 1 else {}
        return self._forward(self.next_dev[:n], lens, self.columns[:width] <= lens[:, None], extra)

    def _forward(self, tokens, lens, attention_mask, extra: dict) -> torch.Tensor:
        out = self.model(
            input_ids=tokens[:, None],
            position_ids=lens[:, None],
            use_cache=True,
            attention_mask=attention_mask,
            past_key_values=self.cache,
            logits_to_keep=1,
            **extra,
        )
        return out.logits[:, -1].float()

    def _live_forward(self) -> torch.Tensor:
        """Every slot's next-token logits, each reading its own live blocks; shapes and addresses fixed for the
        batch's life, so on CUDA the whole forward is captured once as a graph and replayed."""
        refresh_live_blocks(self.live_mask, self.lens_dev)
        self.cache.decode(self.columns[: len(self.request)], self.lens_dev, self.capacity)
        return self._forward(self.next_dev, self.lens_dev, None, {"live_blocks": self.live_mask})

    def _live_logits(self) -> torch.Tensor:
        if self.device.type != "cuda":
            return self._live_forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_logits

    def _capture(self) -> None:
        """Capture `_live_forward` as a CUDA graph: an eager step of a small model is tens of ms of host time
        (some 2,500 kernel launches for Qwen3-0.6B), a replay one launch. The warm-up runs (they compile the
        attention kernel) write each slot's next key and value where the step itself will write the same ones."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._live_forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._live_forward()

    def sync(self, steps: int) -> list[tuple[int, list[int]]]:
        """Read the last `steps` tokens of every live row; retire the rows that stopped or reached their budget."""
        live = self.live()
        if not steps or not live:
            return []
        n = live[-1] + 1
        seen = torch.tensor([len(self.tokens[s]) for s in range(n)])
        cols = (seen[:, None] + torch.arange(steps)).clamp_(max=self.out_dev.shape[1] - 1).to(self.device)
        block = self.out_dev[:n].gather(1, cols).tolist()
        finished = []
        for s in live:
            start = len(self.tokens[s])
            self.tokens[s].extend(block[s])
            self.lens[s] += steps
            end_in_block = first_stop_end(block[s], self.settings.stops)
            stop = None if end_in_block is None else start + end_in_block
            end = min(stop or self.budget[s], self.budget[s])
            if len(self.tokens[s]) >= end:
                finished.append((self.request[s], self.tokens[s][:end]))
                self.request[s], self.tokens[s], self.lens[s] = None, [], 0
                # a free slot still decodes (live-block steps run every slot): from column 0, into column 0
                self.live_dev[s] = 0
                self.lens_dev[s] = 0
                self.gen_dev[s] = 0
        return finished

    def steps_to_sync(self) -> int:
        """sync_every, or fewer when a live row reaches its budget sooner (no row decodes past it)."""
        return min([self.settings.sync_every] + [self.budget[s] - len(self.tokens[s]) for s in self.live()])


def _report(bar: Bar, finished: list[tuple[int, list[int]]], batch: _Batch, decoded: int) -> int:
    """Advance `bar` by the sequences that finished and the tokens decoded since the last report (in flight
    ones too, so the rate does not wait for long sequences to end); returns the tokens decoded so far."""
    now = sum(len(tokens) for _, tokens in finished) + sum(map(len, batch.tokens))
    bar.advance(len(finished), tokens=now - decoded, in_flight=len(batch.live()))
    return now - sum(len(tokens) for _, tokens in finished)


def _run(
    batch: _Batch,
    pending: deque,
    results: dict[int, list[int]],
    prompts: list[list[int]],
    max_new_tokens: list[int],
    bar: Bar,
) -> None:
    """Decode until `pending` is empty and no sequence is in flight."""
    steps, decoded = 0, 0  # decoded: tokens of the sequences in flight, as last reported
    while True:
        finished = batch.sync(steps)
        results.update(finished)
        free = batch.free_slots()
        new = []
        while pending and len(new) < len(free):
            index = pending.popleft()
            new.append((free[len(new)], index, prompts[index], max_new_tokens[index]))
        batch.admit(new)
        decoded = _report(bar, finished, batch, decoded)
        if not batch.live():
            return
        n, chunks = batch.plan()
        steps = batch.steps_to_sync()
        for offset in range(steps):
            batch.step(n, chunks, offset)


def full_attention(model) -> bool:
    """Whether every layer is full attention (SlotCache has no sliding-window or recurrent layers)."""
    return set(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"]) == {"full_attention"}


def decode(
    model,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    *,
    stops: set[int],
    pad_id: int,
    warpers: LogitsProcessorList | None,
    seed: int,
    max_slots: int,
    bar: Bar,
    live_blocks: bool | None = None,
) -> list[list[int]]:
    """Generated ids for each prompt (in order), cut after the first stop token or at its budget.

    `max_new_tokens[i]` is prompt i's budget. `warpers` None = greedy; else the logits warpers of
    sampling, with per-request streams seeded by `seed`. At most `max_slots` sequences decode
    together, fewer when memory is short. `bar` (pipeline.engine.progress) counts sequences done and tokens.
    `live_blocks`: decode through live-block attention and (on CUDA) one captured graph per batch; None =
    wherever that computes what the model's attention computes (CUDA, plain softmax attention).
    """
    if not prompts:
        return []
    if min(map(len, prompts)) == 0 or min(max_new_tokens) < 1:
        raise ValueError("every prompt needs a token and every budget (max_new_tokens) must be >= 1")
    if not full_attention(model):
        raise ValueError(
            "the refill backend decodes full-attention models only (sliding-window or linear "
            "attention layers need backend: generate)"
        )
    capacity = max(map(len, prompts)) + max(max_new_tokens)
    attention = model.config._attn_implementation
    chunked = attention.startswith(ROWS_PREFIX)  # see row_chunked_implementation
    if live_blocks is None:
        live_blocks = chunked and model.device.type == "cuda" and attention[len(ROWS_PREFIX) :] in PLAIN_ATTENTION
    if live_blocks and not chunked:
        raise ValueError(f"live-block decoding needs a row_chunked_implementation attention, not {attention!r}")
    settings = _Settings(
        stops=frozenset(stops),
        pad_id=pad_id,
        warpers=warpers,
        seed=seed,
        sync_every=SYNC_EVERY if model.device.type == "cuda" else 1,
        chunk_cost=CHUNK_COST_TOKENS if chunked else None,
        live_blocks=live_blocks,
    )
    slots = slot_count(model, capacity, min(max_slots, len(prompts)), free_memory_bytes(model.device))
    pending, results = deque(range(len(prompts))), {}
    while pending:
        batch = _Batch(model, slots, capacity, max(max_new_tokens), settings)
        try:
            with sdpa_kernel(DECODE_SDPA_BACKENDS):
                _run(batch, pending, results, prompts, max_new_tokens, bar)
        except torch.OutOfMemoryError:
            if slots == 1:
                kv_mib = capacity * kv_bytes_per_token(model) / 2**20
                raise RuntimeError(
                    f"out of device memory decoding one sequence of up to {capacity} tokens "
                    f"({kv_mib:,.0f} MiB of KV cache)"
                ) from None
            pending.extendleft(sorted((batch.request[s] for s in batch.live()), reverse=True))
            log.warning(
                "out of device memory with %d slots: the %d sequences in flight start again with %d",
                slots,
                len(batch.live()),
                slots // 2,
            )
            slots //= 2
        del batch
        if pending:  # after an out-of-memory error: free the failed batch's cache before the next one
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
    return [results[i] for i in range(len(prompts))]
