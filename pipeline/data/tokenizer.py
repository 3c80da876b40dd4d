"""The testbed's tokenizer: a small byte-level BPE with Qwen3's pre-tokenizer, special tokens and chat format.

Built locally (no hub) with the `tokenizers` library and saved in Hugging Face format
(`tokenizer.json`, `tokenizer_config.json`, the chat template), so that everything downstream takes
the code path of a real Qwen3 model: `AutoTokenizer.from_pretrained(dir)` returns a `Qwen2Tokenizer`
(the class Qwen3 checkpoints name), `apply_chat_template` renders `<|im_start|>user ... <|im_end|>`,
`<|im_end|>` is eos, `<|endoftext|>` pads, and `<think>` / `</think>` are added (non-special) tokens.

Why BPE rather than characters: the same pre-tokenizer regex as Qwen (imported from transformers)
splits every digit into its own token, as Qwen does, while the testbed's closed vocabulary of words
(names, items, verbs) becomes one token each. So a solution's token count is set by its arithmetic,
not by spelling out names, which keeps sequences short for the CPU demo and makes "long chain" mean
"many digits that must all be right".

The merges are learned on a fixed sample of testbed text (every step kind, numbers up to 999), not
on the recipe's data, so the tokenizer is a function of `vocab_size` and this code alone.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AddedToken, PreTrainedTokenizerBase, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"

# Qwen3's chat format, reduced to what a single-turn math prompt needs. `enable_thinking=False`
# pre-fills an empty think section, as Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _corpus() -> list[str]:
    from pipeline.data.chat import user_message
    from pipeline.data.testbed import TestbedSpec, make_problems

    spec = TestbedSpec(min_steps=1, max_steps=8, max_number=999, max_factor=9)
    return [
        f"{IM_START}user\n{user_message(p.question)}{IM_END}\n{IM_START}assistant\n{p.solution}{IM_END}\n"
        for p in make_problems(spec, "train", n=3000, seed=0)
    ]


# Qwen3's id layout: 151,643 learned tokens, then <|endoftext|>, <|im_start|>, <|im_end|>, 21 more special tokens
# (tool calls, vision), then <think> (151,667) and </think> (151,668)
QWEN3_LEARNED = 151_643
QWEN3_RESERVED = 21


def build_tokenizer(vocab_size: int = 768, pad_to: int | None = None) -> PreTrainedTokenizerBase:
    """Learn BPE merges on testbed text and return a Qwen2Tokenizer (what Qwen3 checkpoints load).

    `pad_to`: lay the ids out as Qwen3's own tokenizer does (`QWEN3_LEARNED`: a tokenizer the size of
    Qwen3's, for a model of its shapes): the learned tokens padded with filler tokens that no merge
    produces up to `pad_to` ids, then the special tokens, `QWEN3_RESERVED` more fillers, `<think>`,
    `</think>`."""
    vocab, merges = _learn_bpe(vocab_size)
    reserved = []
    if pad_to is not None:
        learned = [t for t in sorted(vocab, key=vocab.get) if t != ENDOFTEXT]  # <|endoftext|> follows them
        if len(learned) > pad_to:
            raise ValueError(f"pad_to {pad_to} is below the {len(learned)} learned tokens")
        learned += [f"<|filler_{i}|>" for i in range(pad_to - len(learned))]
        vocab = {t: i for i, t in enumerate(learned)}
        reserved = [f"<|reserved_{i}|>" for i in range(QWEN3_RESERVED)]
    # the testbed's own ids (<|im_end|> first: its models and artifacts depend on them); Qwen3's order where padded
    specials = (ENDOFTEXT, IM_START, IM_END, *reserved) if pad_to is not None else (IM_END, IM_START)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token = IM_END, ENDOFTEXT
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def _learn_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE with Qwen's pre-tokenizer, learned on testbed text;
    <|endoftext|> is id 0."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]
