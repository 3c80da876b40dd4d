"""reasoning-qat: PTQ init -> KD-QAT -> optional GRPO -> real low-bit export, for reasoning LLMs.

`import pipeline` stays cheap (no torch); the public functions (pipeline/api.py) import their dependencies on
first use:

    pipeline.run("recipes/demo.yaml")            # run what is missing or stale; also plan, status
    pipeline.export("artifacts/demo/kd_qat", "ckpt/")
    model = pipeline.load_quantized(PATH)        # a quantized stage dir, model dir or exported checkpoint

`pipeline.api.evaluate` is the evaluation function: `pipeline.evaluate` names the module pipeline/evaluate.py.
"""

API = ("run", "plan", "status", "load_quantized", "export")


def __getattr__(name: str):
    if name in API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
