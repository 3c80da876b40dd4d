"""The chat format taken from each tokenizer's own template (Qwen, Llama-3, Mistral, none), the recipe's
instruction, the chat-template check at validation, text corpora."""

import json

import pytest
import yaml

import chat_tokenizers
import tiny_lm
from pipeline.data.chat import (
    BOXED_INSTRUCTION,
    chat_example,
    chat_prompt,
    check_tokenizer,
    end_of_turn,
    end_of_turn_id,
)
from pipeline.data.rows import read_texts
from pipeline.engine.errors import InputError
from pipeline.generate import stop_token_ids
from pipeline.model_spec import ModelSpec
from pipeline.models import save_model


@pytest.mark.parametrize(
    "family, eot",
    [
        ("qwen", "<|im_end|>"),
        ("llama3", "<|eot_id|>"),
        ("mistral", "</s>"),
        ("plain", "</s>"),
    ],
)
def test_end_of_turn_is_what_the_template_writes(family, eot):
    tokenizer = tiny_lm.tokenizer() if family == "qwen" else getattr(chat_tokenizers, family)()
    assert end_of_turn(tokenizer) == eot
    ids, start = chat_example(tokenizer, "What is 2 + 3?", "The answer is \\boxed{5}.")
    # the completion is trained to end as the template ends an assistant turn: one special token
    assert ids[-1] == end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(eot)
    assert tokenizer.decode(ids[start:]) == "The answer is \\boxed{5}." + eot
    assert tokenizer.decode(ids[:start]) == chat_prompt(tokenizer, "What is 2 + 3?")


def test_llama3_chat_has_no_chatml():
    tokenizer = chat_tokenizers.llama3()
    ids, start = chat_example(tokenizer, "Q?", "A.")
    text = tokenizer.decode(ids)
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ?\n"
        + BOXED_INSTRUCTION
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA.<|eot_id|>"
    )


def test_generation_stops_at_the_templates_end_of_turn():
    """A Llama-3 model whose generation config names only <|end_of_text|> still stops at <|eot_id|>."""
    from transformers import GenerationConfig

    tokenizer = chat_tokenizers.llama3()

    class Model:
        generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    stops = stop_token_ids(Model(), tokenizer)
    assert set(stops) == {tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id}


def test_instruction_from_the_recipe():
    tokenizer = tiny_lm.tokenizer()
    assert chat_prompt(tokenizer, "Q?", "Answer in one word.") == (
        "<|im_start|>user\nQ?\nAnswer in one word.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt(tokenizer, "Q?", "") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    ids, start = chat_example(tokenizer, "Q?", "A", "Answer in one word.")
    assert tokenizer.decode(ids[:start]) == chat_prompt(tokenizer, "Q?", "Answer in one word.")


def test_no_chat_template_is_bad_input():
    tokenizer = chat_tokenizers.plain(None)
    with pytest.raises(InputError, match="has no chat template.*chat / instruct version.*tokenizer.chat_template"):
        chat_prompt(tokenizer, "Q?")
    with pytest.raises(InputError, match="has no chat template"):
        end_of_turn(tokenizer)


@pytest.fixture
def base_model_dir(tmp_path):
    """A tiny model saved with a tokenizer that has no chat template (a base model)."""
    out = tmp_path / "base"
    save_model(tiny_lm.model(), chat_tokenizers.plain(None), out)
    return out


def test_recipe_with_a_base_model_fails_validation(base_model_dir, tmp_path, run_cli):
    assert check_tokenizer(ModelSpec(path=str(base_model_dir))) == [
        (
            "model.path",
            f"{base_model_dir} has no chat template, which every prompt and trace is rendered with; use "
            "the model's chat / instruct version, or give its tokenizer one (tokenizer.chat_template = "
            "...; tokenizer.save_pretrained(DIR))",
        )
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "model": {"path": str(base_model_dir)},
                "stages": {"eval": {"type": "eval", "model": "model"}},
            }
        )
    )
    code, out, err = run_cli("validate", recipe)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"model.path: {base_model_dir} has no chat template, which every prompt and "
        "trace is rendered with; use the model's chat / instruct version, or give "
        "its tokenizer one (tokenizer.chat_template = ...; "
        "tokenizer.save_pretrained(DIR))"
    ]


def test_recipe_with_a_model_without_a_tokenizer_fails_validation(tmp_path, run_cli):
    """Weights and config but no tokenizer files: refused when the recipe is validated, not by the first stage
    that tokenizes (which failed naming the calibration text's length), and nothing written."""
    folder = tmp_path / "untokenized"
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), folder)
    for name in folder.glob("*"):
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            name.unlink()
    recipe = tmp_path / "r.yaml"
    stages = {"eval": {"type": "eval", "model": "model"}}
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"path": str(folder)}, "stages": stages}))
    for command in (("validate", recipe), ("run", recipe, "--artifacts", tmp_path / "art")):
        code, _, err = run_cli(*command)
        assert code == 2
        assert err.strip() == f"model.path: {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)"
    assert not (tmp_path / "art").exists()


def test_chat_template_check_accepts_saved_templates(tmp_path):
    save_model(tiny_lm.model(), tiny_lm.tokenizer(), tmp_path / "stage" / "model")  # a stage directory
    assert check_tokenizer(ModelSpec(path=str(tmp_path / "stage"))) == []
    assert check_tokenizer(ModelSpec(path="org/hub-model")) == []  # checked when a stage loads it


def test_read_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    assert read_texts(path, "text") == ["one\u2028two", "three"]
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "t.parquet")
    assert read_texts(tmp_path / "t.parquet", "text") == ["a", "b"]
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match="row 1 has no `text` string"):
        read_texts(path, "text")
    with pytest.raises(InputError, match="no such file"):
        read_texts(tmp_path / "nope.jsonl", "text")
