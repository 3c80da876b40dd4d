"""reasoning-qat: PTQ init -> KD-QAT -> optional GRPO -> real low-bit export, for reasoning LLMs.

`import pipeline` stays cheap (no torch); the public functions (pipeline/api.py) import their dependencies on
first use:

    pipeline.run("recipes/demo.yaml")            # run what is missing or stale; also plan, status
    pipeline.export("artifacts/demo/kd_qat", "ckpt/")
    pipeline.evaluate("ckpt/", bench="gsm8k")    # also perplexity
    model = pipeline.load_quantized(PATH)        # a quantized stage dir, model dir or exported checkpoint

No module of the package is named like one of these functions (the measures are in pipeline/evaluation.py):
importing a submodule sets the package attribute of its name, which would replace the function.
"""

API = ("run", "plan", "status", "load_quantized", "export", "evaluate", "perplexity")


def __getattr__(name: str):
    if name in API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
