"""The chat format: every prompt is the model's own chat template applied to one user turn.

A user turn is `question + "\\n" + data.instruction`; every training example is that prompt, the completion,
and the end of turn the template writes after an assistant message (`end_of_turn`): `<|im_end|>` for Qwen /
ChatML, `<|eot_id|>` for Llama-3, `</s>` for Mistral. Nothing here knows a model family; a tokenizer without
a chat template is refused (`check_tokenizer` at validation, `InputError` at run time).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.engine.errors import InputError

# The instruction the Qwen3 model cards append to math prompts (DeepSeek-R1's cards use the same).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def user_message(question: str, instruction: str = BOXED_INSTRUCTION) -> str:
    """The user turn for a problem, as the Qwen3 cards prompt math."""
    return f"{question}\n{instruction}" if instruction else question


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A tokenizer's own files (fast; sentencepiece; BPE's vocabulary): a folder with none has no tokenizer."""
NO_TOKENIZER = "has no tokenizer (tokenizer.json / tokenizer_config.json)"
NO_CHAT_TEMPLATE = (
    "has no chat template, which every prompt and trace is rendered with; use the model's "
    "chat / instruct version, or give its tokenizer one (tokenizer.chat_template = ...; "
    "tokenizer.save_pretrained(DIR))"
)


def _require_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise InputError("model", f"{tokenizer.name_or_path or 'the tokenizer'}: {NO_CHAT_TEMPLATE}")


def chat_prompt(tokenizer, question: str, instruction: str = BOXED_INSTRUCTION) -> str:
    """The text a model continues from: chat template applied, generation prompt added."""
    _require_chat_template(tokenizer)
    messages = [{"role": "user", "content": user_message(question, instruction)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_example(
    tokenizer, question: str, completion: str, instruction: str = BOXED_INSTRUCTION
) -> tuple[list[int], int]:
    """Token ids of prompt + completion + end of turn, and where the completion starts.

    Training stages (sft, kd_qat) put the loss on ids[start:] only; PTQ calibrates on all of them.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, question, instruction), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, len(prompt_ids)


_REPLY = "reasoning-qat assistant reply"


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message's content, up to and including its
    first special token (the eos token when it writes none): what a completion is trained to end
    with, and (its last token) what generation stops at. Found by rendering a chat, because neither
    tokenizers nor transformers name this token: a template knows it only as text (and eos is often
    another token: Llama-3's `<|end_of_text|>`, or `<|im_start|>` in SmolLM2's GGUF tokenizer)."""
    _require_chat_template(tokenizer)
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _REPLY}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    after = text[text.rindex(_REPLY) + len(_REPLY) :]
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    found = [(after.index(s), -len(s), s) for s in specials if s and s in after]
    if found:
        position, _, token = min(found)
        return after[: position + len(token)]
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise InputError(
        "model",
        f"{tokenizer.name_or_path}: its chat template ends an assistant turn with no "
        "special token and it has no eos token, so a completion could never end",
    )


def end_of_turn_id(tokenizer) -> int:
    """The token id generation stops at: the last token of `end_of_turn`."""
    return tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"][-1]


def check_tokenizer(model) -> list[tuple[str, str]]:
    """At validation: a local `model.path` (the recipe's ModelSpec) with no tokenizer, or one without a chat
    template. Reads only the tokenizer's files; a hub id is checked when a stage loads it."""
    from pipeline.quant.formats.layout import model_dir

    if model.path is None or not Path(model.path).expanduser().is_dir():
        return []
    where = Path(model_dir(Path(model.path).expanduser()))
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        # else the first stage to tokenize would fail with its own, less clear, message
        return [("model.path", f"{where} {NO_TOKENIZER}")]
    config = where / "tokenizer_config.json"
    if not config.is_file():
        return []  # tokenizer.json alone: loading it fails with its own message
    try:
        if json.loads(config.read_text(encoding="utf-8")).get("chat_template"):
            return []
    except (ValueError, AttributeError):
        return []  # not a JSON object: loading the tokenizer fails with its own message
    if any(
        (where / name).exists() for name in ("chat_template.jinja", "chat_template.json", "additional_chat_templates")
    ):
        return []
    return [("model.path", f"{model.path} {NO_CHAT_TEMPLATE}")]
