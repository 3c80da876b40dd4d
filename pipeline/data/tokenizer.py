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
from pathlib import Path

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


def build_tokenizer(vocab_size: int = 768) -> PreTrainedTokenizerBase:
    """Learn BPE merges on testbed text and return a Qwen2Tokenizer (what Qwen3 checkpoints load)."""
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
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)], special_tokens=True
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
