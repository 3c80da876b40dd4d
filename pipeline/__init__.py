"""reasoning-qat: PTQ init -> KD-QAT -> optional GRPO -> real low-bit export, for reasoning LLMs.

`import pipeline` stays cheap (no torch); the public loaders import their dependencies on first use:

    model = pipeline.load_quantized(PATH)   # a quantized stage dir, model dir or exported checkpoint
"""


def __getattr__(name: str):
    if name == "load_quantized":
        from pipeline.quant.io import load_quantized

        return load_quantized
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
