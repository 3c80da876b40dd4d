"""Generation: greedy equals step-by-step argmax, K samples, truncation, stop tokens, batch-order independence."""
import pytest
import torch
from pydantic import ValidationError

import tiny_lm
from pipeline.data import chat_prompt
from pipeline.generate import GenerationSpec, generate, stop_token_ids

QUESTIONS = ["Mia has 3 apples. She buys 4 more. How many apples does Mia have?",
             "Leo has 12 coins.",
             "Ava has 5 cards and gives 2 to Sam, then buys 9 more. How many cards does Ava have now?"]


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


@pytest.mark.parametrize("backend", ["generate", "static"])
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
    assert [s[0].token_ids for s in forward] == [s[0].token_ids for s in backward[::-1]] == \
        [s[0].token_ids for s in alone]


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
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    model.generation_config.use_cache = model.config.use_cache = False
    try:
        generate(model, tokenizer, ["What is 2 + 3?"], GenerationSpec(max_new_tokens=6, backend="generate"))
    finally:
        handle.remove()
        model.generation_config.use_cache = model.config.use_cache = True
    assert len(widths) > 2 and widths[0] > 1 and set(widths[1:]) == {1}
