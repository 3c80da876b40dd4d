"""Generation: greedy equals step-by-step argmax, K samples, truncation, stop tokens, batch-order independence;
the refill backend (pipeline.refill): same greedy tokens as one-at-a-time generation, samples independent of
batching, memory-sized slots, out-of-memory retries, progress lines."""

import copy
import functools
import logging
from contextlib import contextmanager

import pytest
import torch
from pydantic import ValidationError
from real_shapes import QWEN3_SIZES
from transformers import LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM, TopKLogitsWarper

import tiny_lm
from pipeline import refill
from pipeline.data.chat import chat_prompt
from pipeline.generate import GenerationSpec, generate, generate_ids, stop_token_ids
from pipeline.refill import live_attention
from pipeline.stops import first_stop_end

QUESTIONS = [
    "Mia has 3 apples. She buys 4 more. How many apples does Mia have?",
    "Leo has 12 coins.",
    "Ava has 5 cards and gives 2 to Sam, then buys 9 more. How many cards does Ava have now?",
]


def argmax_decode(model, tokenizer, question: str, max_new_tokens: int, stops: set[int]) -> list[int]:
    """The reference: one full forward pass per token, no cache, no batching."""
    ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token in stops:
                break
    return out


@pytest.fixture(scope="module")
def lm():
    return tiny_lm.model(), tiny_lm.tokenizer()


@pytest.mark.parametrize("backend", ["generate", "static", "refill"])
def test_greedy_equals_stepwise_argmax(lm, backend):
    model, tok = lm
    stops = set(stop_token_ids(model, tok))
    outs = generate(model, tok, QUESTIONS, GenerationSpec(max_new_tokens=10, batch_size=2, backend=backend))
    for question, samples in zip(QUESTIONS, outs):
        assert len(samples) == 1
        assert samples[0].token_ids == argmax_decode(model, tok, question, 10, stops)


def test_batch_order_independence(lm):
    model, tok = lm
    spec = GenerationSpec(max_new_tokens=8, batch_size=2)
    forward = generate(model, tok, QUESTIONS, spec)
    backward = generate(model, tok, QUESTIONS[::-1], spec)
    alone = [generate(model, tok, [q], spec)[0] for q in QUESTIONS]
    assert (
        [s[0].token_ids for s in forward] == [s[0].token_ids for s in backward[::-1]] == [s[0].token_ids for s in alone]
    )


def test_stop_token_ends_completion_untruncated(lm):
    model, tok = lm
    free = generate(model, tok, QUESTIONS[:1], GenerationSpec(max_new_tokens=6))[0][0]
    assert free.truncated and free.num_tokens == 6  # a random model does not stop by itself
    # make the third greedy token a stop token: the completion must end there, untruncated
    third = free.token_ids[2]
    assert third not in free.token_ids[:2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [third]
    try:
        stopped = generate(model, tok, QUESTIONS[:1], GenerationSpec(max_new_tokens=6))[0][0]
    finally:
        model.generation_config.eos_token_id = saved
    assert stopped.token_ids == free.token_ids[:3]
    assert (stopped.num_tokens, stopped.truncated) == (3, False)
    assert stopped.text == tok.decode(free.token_ids[:3], skip_special_tokens=True)


def test_k_samples_seeded(lm):
    model, tok = lm
    spec = GenerationSpec(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.95, num_samples=3, batch_size=4, seed=1)
    rng_before = torch.random.get_rng_state()
    first = generate(model, tok, QUESTIONS, spec)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    again = generate(model, tok, QUESTIONS, spec)
    other = generate(model, tok, QUESTIONS, spec.model_copy(update={"seed": 2}))
    assert [len(s) for s in first] == [3, 3, 3]
    ids = [[c.token_ids for c in s] for s in first]
    assert ids == [[c.token_ids for c in s] for s in again]
    assert ids != [[c.token_ids for c in s] for s in other]
    assert all(len({tuple(t) for t in samples}) > 1 for samples in ids)  # K distinct samples per prompt
    assert all(c.num_tokens == len(c.token_ids) <= 6 for s in first for c in s)


def test_spec_validation():
    with pytest.raises(ValidationError, match="num_samples > 1 needs temperature > 0"):
        GenerationSpec(num_samples=4)
    with pytest.raises(ValidationError):
        GenerationSpec(max_new_tokens=0)
    with pytest.raises(ValidationError):
        GenerationSpec(beams=2)


@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_sdpa_equals_sdpa(q_len):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.generate import grouped_sdpa_attention

    class Module:
        num_key_value_groups = 4
        is_causal = True

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, q_len, 16, generator=gen)
    key, value = torch.randn(2, 3, 2, 11, 16, generator=gen)
    mask = torch.rand(3, 1, q_len, 11, generator=gen) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    ours, _ = grouped_sdpa_attention(Module(), query, key, value, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(Module(), query, key, value, mask, scaling=0.25)
    assert ours.shape == ref.shape == (3, q_len, 8, 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_decoding_uses_the_kv_cache_even_when_the_saved_model_turned_it_off(lm):
    """A model trained with gradient checkpointing is saved with use_cache=False (TRL sets it);
    decoding must still feed one new token per step, not the whole sequence again."""
    model, tokenizer = lm
    widths = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    model.generation_config.use_cache = model.config.use_cache = False
    try:
        generate(model, tokenizer, ["What is 2 + 3?"], GenerationSpec(max_new_tokens=6, backend="generate"))
    finally:
        handle.remove()
        model.generation_config.use_cache = model.config.use_cache = True
    assert len(widths) > 2 and widths[0] > 1 and set(widths[1:]) == {1}


# -- the refill backend ----------------------------------------------------------------------------
def prompt_ids(tok) -> list[list[int]]:
    """Five prompts of different lengths, one of a single token (nothing to prefill)."""
    chat = [tok(chat_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    return [chat[0], [5], chat[2], [7, 8, 9], chat[1]]


def one_at_a_time(model, prompts, budgets, stops, pad_id) -> list[list[int]]:
    """The reference: `model.generate` on each prompt alone with its own budget."""
    out = []
    for ids, budget in zip(prompts, budgets):
        row = generate_ids(
            model, [ids], GenerationSpec(max_new_tokens=budget, backend="generate", batch_size=1), stops, pad_id
        )[0][0]
        end = first_stop_end(row, set(stops))
        out.append(row if end is None else row[:end])
    return out


@pytest.fixture
def finest_refill(monkeypatch):
    """Split rows into chunks whenever it saves a read and re-sort whenever it saves one, and record that both ran."""
    monkeypatch.setattr(refill, "CHUNK_COST_TOKENS", 0)
    monkeypatch.setattr(refill, "RESORT_HORIZON", 10**9)
    seen = {"chunked": 0, "permuted": 0}
    plan, permute = refill.plan_chunks, refill._Batch._permute

    def spy_plan(lens, cost):
        chunks = plan(lens, cost)
        seen["chunked"] += any(b - a > 1 for a, b, _ in chunks) and len(chunks) > 1
        return chunks

    def spy_permute(self, order):
        seen["permuted"] += 1
        return permute(self, order)

    monkeypatch.setattr(refill, "plan_chunks", spy_plan)
    monkeypatch.setattr(refill._Batch, "_permute", spy_permute)
    return seen


def test_refill_greedy_equals_one_at_a_time(lm, finest_refill):
    """Prompts of different lengths, budgets and stop positions, 3 slots for 5 sequences: slots refill,
    rows are chunked and re-sorted, and every sequence gets the tokens it gets decoded alone."""
    model, tok = lm
    prompts, budgets, pad = prompt_ids(tok), [9, 4, 12, 7, 10], tok.pad_token_id
    free = one_at_a_time(model, prompts, budgets, [tok.pad_token_id], pad)
    stops = [free[0][2]]  # the third token of the first sequence becomes a stop: some sequences end early
    reference = one_at_a_time(model, prompts, budgets, stops, pad)
    assert sorted({len(r) for r in reference}) != sorted(set(budgets))  # a stop token ended some
    rows = generate_ids(
        model,
        prompts,
        GenerationSpec(max_new_tokens=12, batch_size=3, backend="refill"),
        stops,
        pad,
        max_new_tokens=budgets,
    )
    assert [samples[0] for samples in rows] == reference
    assert finest_refill["chunked"] and finest_refill["permuted"]


def test_live_block_attention_reads_each_rows_columns_and_follows_lens_in_place():
    """Row b attends to columns 0..lens[b] of its cache (grouped-query heads included), and the same mask
    object follows `lens` updated in place, as a replayed CUDA graph needs."""
    torch.manual_seed(0)
    rows, heads, kv_heads, capacity, d = 3, 4, 2, 300, 8
    query = torch.randn(rows, heads, 1, d)
    key, value = torch.randn(2, rows, kv_heads, capacity, d)
    lens = torch.tensor([0, 127, 200])
    mask = refill.live_block_mask(lens, capacity)
    for state in ([0, 127, 200], [1, 128, 201], [255, 128, 299]):  # 127 -> 128 crosses into a second block
        lens.copy_(torch.tensor(state))
        refill.refresh_live_blocks(mask, lens)
        out = refill.live_attention(query, key, value, mask, scale=None)
        for b in range(rows):
            n = int(lens[b]) + 1
            expected = torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1], key[b : b + 1, :, :n], value[b : b + 1, :, :n], enable_gqa=True
            )
            torch.testing.assert_close(out[b : b + 1], expected.transpose(1, 2))


def test_refill_through_live_blocks_equals_one_at_a_time(lm, monkeypatch):
    """The CUDA path's decoding (every slot each step over its own live blocks; the graph capture aside) gives
    every sequence the tokens it gets decoded alone."""
    model, tok = lm
    prompts, budgets, pad = prompt_ids(tok), [9, 4, 12, 7, 10], tok.pad_token_id
    stops = [one_at_a_time(model, prompts[:1], [3], [pad], pad)[0][2]]
    calls = []
    monkeypatch.setattr(refill, "decode", functools.partial(refill.decode, live_blocks=True))
    monkeypatch.setattr(refill, "live_attention", lambda *a: calls.append(1) or live_attention(*a))
    rows = generate_ids(
        model, prompts, GenerationSpec(max_new_tokens=12, batch_size=3, backend="refill"), stops, pad, budgets
    )
    assert [samples[0] for samples in rows] == one_at_a_time(model, prompts, budgets, stops, pad)
    assert calls  # the live-block attention decoded


def test_refill_equals_generate_on_a_w4a4kv4_student(lm):
    """Our quantized students decode through their own attention (KV4 fake quant) in the slot cache too."""
    from pipeline.quant.apply import quantize_rtn
    from pipeline.quant.scheme import QuantSpec

    model, tok = lm
    student = copy.deepcopy(model)
    spec = QuantSpec.model_validate("w4a4kv4")
    quantize_rtn(student, spec)
    assert student.config._attn_implementation.startswith("kvq_")
    prompts, pad = prompt_ids(tok), tok.pad_token_id
    refilled = generate_ids(
        student, prompts, GenerationSpec(max_new_tokens=8, batch_size=2, backend="refill"), [pad], pad
    )
    assert [s[0] for s in refilled] == one_at_a_time(student, prompts, [8] * len(prompts), [pad], pad)
    assert student.config._attn_implementation.startswith("kvq_")  # restored after the call


@contextmanager
def out_of_memory_above(model, rows: int):
    """Every forward over more than `rows` sequences raises CUDA's out-of-memory error."""

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_refill_samples_do_not_depend_on_batching(lm, finest_refill, monkeypatch):
    """Per-request streams: the same seed gives the same samples with 1 slot, 8 slots, chunked and
    re-sorted rows, or after an out-of-memory retry; another seed gives others."""
    model, tok = lm
    spec = GenerationSpec(
        max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, num_samples=2, seed=3, backend="refill"
    )
    prompts, pad = prompt_ids(tok), tok.pad_token_id
    wide = generate_ids(model, prompts, spec.model_copy(update={"batch_size": 8}), [pad], pad)
    assert finest_refill["chunked"]
    monkeypatch.setattr(refill, "CHUNK_COST_TOKENS", 10**9)  # one chunk
    single = generate_ids(model, prompts, spec.model_copy(update={"batch_size": 1}), [pad], pad)
    assert wide == single
    assert all(a != b for a, b in wide)  # the two samples of a prompt differ
    with out_of_memory_above(model, 2):
        assert generate_ids(model, prompts, spec.model_copy(update={"batch_size": 8}), [pad], pad) == wide
    other = generate_ids(model, prompts, spec.model_copy(update={"seed": 4, "batch_size": 8}), [pad], pad)
    assert other != wide


def test_inverse_cdf_sampling_matches_the_warped_distribution():
    """Uniforms spread evenly over [0, 1) land on each token in proportion to its probability after the
    warpers; a token the warpers remove is never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    warpers = LogitsProcessorList([TopKLogitsWarper(4)])  # drops token 3
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = refill.next_tokens(logits.expand(n, -1), u, warpers)
    counts = torch.bincount(drawn, minlength=5)
    expected = torch.softmax(warpers(None, logits.clone()), -1)[0] * n
    assert counts[3] == 0
    assert (counts - expected).abs().max() <= 1
    assert torch.equal(refill.next_tokens(logits, None, None), torch.tensor([4]))  # greedy: argmax


def test_out_of_memory_halves_the_slots_and_keeps_the_tokens(lm, caplog):
    model, tok = lm
    prompts, pad = prompt_ids(tok), tok.pad_token_id
    spec = GenerationSpec(max_new_tokens=6, batch_size=4, backend="refill")
    expected = generate_ids(model, prompts, spec, [pad], pad)

    with out_of_memory_above(model, 2), caplog.at_level(logging.WARNING, logger="pipeline.refill"):
        assert generate_ids(model, prompts, spec, [pad], pad) == expected
    assert "out of device memory with 4 slots: the 4 sequences in flight start again with 2" in caplog.text
    longest = max(map(len, prompts)) + 6
    with (
        out_of_memory_above(model, 0),
        pytest.raises(RuntimeError, match=f"out of device memory decoding one sequence of up to {longest} tokens"),
    ):
        generate_ids(model, prompts, spec, [pad], pad)


@pytest.mark.parametrize("backend", ["generate", "static"])
def test_padded_batches_shrink_to_the_caches_the_free_memory_holds(lm, monkeypatch, caplog, backend):
    """`generate` / `static` hold batch x (prompt + max new tokens) of cache at the end (the static one from the
    start): with free memory for two such caches, batches of 2 rows, the same tokens, and a warning that says why."""
    model, tok = lm
    prompts, pad = prompt_ids(tok), tok.pad_token_id
    spec = GenerationSpec(max_new_tokens=6, batch_size=8, backend=backend)
    expected = generate_ids(model, prompts, spec, [pad], pad)
    capacity = max(map(len, prompts)) + 6
    if backend == "static":
        capacity = -(-max(map(len, prompts)) // 64) * 64 + 6
    free = next(b for b in range(2**16, 2**34, 1024) if refill.slot_count(model, capacity, 8, b) == 2)
    monkeypatch.setattr(refill, "free_memory_bytes", lambda device: free)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.generate"):
            assert generate_ids(model, prompts, spec, [pad], pad) == expected
    finally:
        handle.remove()
    assert max(rows) == 2 and len(prompts) > 2
    assert (
        f"2 sequences at a time, not batch_size 8: the free memory holds 2 caches of {capacity} tokens" in caplog.text
    )


def test_slots_fit_the_free_memory():
    """Qwen3-0.6B: 112 KiB of KV cache per token in bf16; the slots' caches fit 90% of the free memory."""
    config = Qwen3Config(**QWEN3_SIZES["0.6b"])
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    kv = refill.kv_bytes_per_token(model)
    assert kv == 28 * 8 * 128 * 2 * 2 == 112 * 1024
    capacity, free = 256 + 8192, 80 * 2**30
    slots = refill.slot_count(model, capacity, 1024, free)
    # the working set (prefill activations, the copy of one layer when rows are re-sorted) takes a few slots
    assert slots * capacity * kv <= 0.9 * free < (slots + 5) * capacity * kv
    assert refill.slot_count(model, capacity, 16, free) == 16  # batch_size caps it
    assert refill.slot_count(model, capacity, 1024, 2**20) == 1  # too little memory: one, and an OOM would say so


@pytest.mark.parametrize("backend", ["refill", "generate"])
def test_generation_logs_progress_when_not_a_terminal(lm, monkeypatch, caplog, backend):
    model, tok = lm
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="pipeline.engine.progress"):
        generate(model, tok, QUESTIONS, GenerationSpec(max_new_tokens=4, batch_size=2, backend=backend))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.engine.progress"]
    assert lines[-1].startswith("generate: sequences 3/3, ") and "tokens/s" in lines[-1]
    assert any(line.startswith("generate: sequences 2/3, ") and "ETA" in line for line in lines)


def test_per_prompt_budgets_need_the_refill_backend(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="per-prompt max_new_tokens needs the refill backend, not 'generate'"):
        generate_ids(model, [[5, 6]], GenerationSpec(backend="generate"), [0], 0, max_new_tokens=[3])


def test_bench_tiny_gives_every_method_the_same_workload(tmp_path, monkeypatch):
    """bench/generate.py --tiny: ours, plain generate and continuous batching each generate exactly the planted
    stop lengths (the same tokens), and the JSON holds each one's throughput."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gen.json"
    monkeypatch.setattr(
        "sys.argv", ["generate.py", "--tiny", "--prompts", "6", "--stop-range", "3", "12", "--out", str(out)]
    )
    assert bench.main() == 0
    report = json.loads(out.read_text())
    planted = round(report["mean_new_tokens"] * report["prompts"])
    assert {name: r["tokens"] for name, r in report["results"].items()} == {
        "ours": planted,
        "plain": planted,
        "continuous": planted,
    }
    assert all(r["tokens_per_s"] > 0 and r["prompts"] == 6 for r in report["results"].values())
