"""The published shapes of the shipped recipes' base models, without their weights: the validation tests stand
in for them with a config of these shapes (tests/test_recipes_shipped.py), bench/recipe_stages.py with a random-weight
model of them. Plain data: no test framework, no ML library; the benchmarks' Qwen3 sizes live here too."""


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict:
    """A Qwen3 model card's shape: 128-wide heads, 8 KV heads, a 151,936-token vocabulary."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=tied,
    )


# Qwen3's sizes, for the benchmarks' random-weight models (bench/) and the tests that stand in for them
QWEN3_SIZES = {
    "0.6b": _qwen3(1024, 3072, 28, 16, tied=True),
    "1.7b": _qwen3(2048, 6144, 28, 16, tied=True),
    "4b": _qwen3(2560, 9728, 36, 32, tied=True),
    "8b": _qwen3(4096, 12288, 36, 32, tied=False),
    "14b": _qwen3(5120, 17408, 40, 40, tied=False),
}

# the benchmarks' CPU smoke shape (each sets its own vocabulary) and the testbed Qwen3 of tests/test_models.py
TINY_QWEN3 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# The real base models of the shipped recipes, by `model.path`: (model_type, the config.json values that
# set layer shapes, as each model's card publishes them).
REAL_SHAPES = {
    "Qwen/Qwen3-0.6B": ("qwen3", QWEN3_SIZES["0.6b"]),
    "Qwen/Qwen3-8B": ("qwen3", QWEN3_SIZES["8b"]),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (
        "qwen2",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
    # `reasoning-qat import-gguf --smollm2` writes it (tests/test_gguf.py imports the real file)
    "artifacts/smollm2-135m-instruct": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),
}
