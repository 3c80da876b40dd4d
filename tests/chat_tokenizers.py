"""Tiny tokenizers of other model families' chat formats, built locally (no hub): a byte-level BPE with
the family's special tokens and its published chat template, verbatim. The testbed tokenizer
(pipeline.data.tokenizer) is the Qwen / ChatML one."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.2's
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# a template that writes no special token after a reply: the end of turn is the eos token
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

_CORPUS = ["What is 2 + 3? Please reason step by step. The answer is \\boxed{5}."] * 20


def _tokenizer(specials: list[str], bos: str, eos: str, template: str | None) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    tokenizer.chat_template = template
    return tokenizer


@lru_cache(maxsize=None)
def llama3() -> PreTrainedTokenizerFast:
    """eos `<|end_of_text|>` (as the first Llama-3 releases), turns end with `<|eot_id|>`; no pad token."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return _tokenizer(specials, "<|begin_of_text|>", "<|end_of_text|>", LLAMA3_TEMPLATE)


@lru_cache(maxsize=None)
def mistral() -> PreTrainedTokenizerFast:
    return _tokenizer(["<s>", "</s>"], "<s>", "</s>", MISTRAL_TEMPLATE)


@lru_cache(maxsize=None)
def plain(template: str | None = PLAIN_TEMPLATE) -> PreTrainedTokenizerFast:
    """A base model's tokenizer: eos `</s>`, and `template` (None: no chat template at all)."""
    return _tokenizer(["<s>", "</s>"], "<s>", "</s>", template)
