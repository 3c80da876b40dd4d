"""The published shapes of the shipped recipes' base models, without their weights: the validation tests stand
in for them with a config of these shapes (tests/test_recipes_shipped.py), bench/recipe_stages.py with a random-weight
model of them. Plain data: no test framework, no ML library."""

# The real base models of the shipped recipes, by `model.path`: (model_type, the config.json values that
# set layer shapes, as each model's card publishes them).
REAL_SHAPES = {
    "Qwen/Qwen3-0.6B": (
        "qwen3",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    "Qwen/Qwen3-8B": (
        "qwen3",
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
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
