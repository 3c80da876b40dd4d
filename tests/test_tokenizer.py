"""The testbed tokenizer loads and behaves like a Qwen3 tokenizer: chat format, special tokens, digits."""

import pytest
from transformers import AutoTokenizer

from pipeline.data.chat import chat_example, chat_prompt, end_of_turn_id
from pipeline.data.testbed import TestbedSpec, make_problems
from pipeline.data.tokenizer import QWEN3_LEARNED, build_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    built = build_tokenizer()
    built.save_pretrained(str(path))
    return built, AutoTokenizer.from_pretrained(path), path


def test_saved_in_hugging_face_format_and_loads_as_qwen(saved):
    built, tok, path = saved
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == len(built) <= 768 + 5
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    # <think> is an ordinary added token, as in Qwen3: decoding with skip_special_tokens keeps it
    ids = tok("<think>\nx\n</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx\n</think>"


def test_chat_template_is_qwen3s(saved):
    _, tok, _ = saved
    assert chat_prompt(tok, "Q?") == (
        "<|im_start|>user\nQ?\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    no_think = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert (
        tok.apply_chat_template(turns, tokenize=False)
        == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    )


def test_round_trip_and_completion_boundary(saved):
    _, tok, _ = saved
    for p in make_problems(TestbedSpec(min_steps=3, max_steps=6, max_number=999, max_factor=9), "test", n=30):
        ids, start = chat_example(tok, p.question, p.solution)
        assert tok.decode(ids[:start]) == chat_prompt(tok, p.question)
        assert tok.decode(ids[start:]) == p.solution + "<|im_end|>"
        assert ids[-1] == tok.eos_token_id


def test_digits_are_single_tokens_and_words_are_merged(saved):
    _, tok, _ = saved
    pieces = tok.convert_ids_to_tokens(
        tok("Mia has 4096 stickers: 12 * 3 = 36.", add_special_tokens=False)["input_ids"]
    )
    assert ["4", "0", "9", "6"] == pieces[3:7] and "Ġstickers" in pieces and "Mia" in pieces
    assert build_tokenizer().backend_tokenizer.to_str() == saved[0].backend_tokenizer.to_str()


def test_padded_to_qwen3s_layout_the_special_tokens_sit_at_qwen3s_ids(tmp_path):
    """For a random-weight model of a real Qwen3 shape (bench/recipe_stages.py): Qwen3's 151,669 tokens, its special
    ids, and a chat prompt that round-trips (no merge produces a filler)."""
    tokenizer = build_tokenizer(pad_to=QWEN3_LEARNED)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 151_669 and type(loaded).__name__ == "Qwen2Tokenizer"
    ids = loaded.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]
    assert (loaded.eos_token_id, loaded.pad_token_id, end_of_turn_id(loaded)) == (151645, 151643, 151645)
    prompt = chat_prompt(loaded, "What is 12 + 30?")
    assert loaded.decode(loaded(prompt)["input_ids"]) == prompt == chat_prompt(build_tokenizer(), "What is 12 + 30?")
