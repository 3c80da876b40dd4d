"""Put on the PYTHONPATH of a run under test (with ENGINE_INPUTS=<file>): each DeepSpeed engine a rank builds appends
to <file> a line "<rank> <parameters not yet partitioned> of <parameters>" about the model it was given. Under ZeRO-3
the engine moves a model given with parameters not yet partitioned to the device whole before it partitions it
(`DeepSpeedEngine._configure_distributed_model`): on a GPU that whole copy is what must never happen."""

import os

if os.environ.get("ENGINE_INPUTS") and "RANK" in os.environ:
    from deepspeed.runtime.engine import DeepSpeedEngine

    _configure = DeepSpeedEngine._configure_distributed_model

    def _configure_and_record(self, model):
        params = list(model.parameters())
        whole = sum(not hasattr(p, "ds_id") for p in params)
        with open(os.environ["ENGINE_INPUTS"], "a") as f:
            f.write(f"{os.environ['RANK']} {whole} of {len(params)}\n")
        return _configure(self, model)

    DeepSpeedEngine._configure_distributed_model = _configure_and_record
