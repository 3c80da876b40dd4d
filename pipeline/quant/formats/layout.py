"""What a model folder holds, and the on-disk names of our formats: torch-free, read from files only.

    folder = locate("artifacts/demo/kd_qat")   # ModelFolder(path=.../kd_qat/model, kind="quantized")
    is_quantized("ckpt/")                      # what pipeline.quant.formats.io.load_quantized reads

Kinds (`ModelFolder.kind`):
- `plain`: a Hugging Face model (no quantization we read), or a path that is not a local folder (a hub id);
- `quantized`: ours, QuantLinears saved by pipeline.quant.formats.io (`QUANT_CONFIG` beside config.json);
- `exported`: a compressed-tensors checkpoint: our `pack-quantized` export, our W4A4KV4 export (config.json
  `EXPORT_KEY` block, `TRANSFORMS_FILE`), or any integer weight-only one.

This module owns the names both sides use: io writes and reads `QUANT_CONFIG`; export writes `EXPORT_KEY`,
`MODEL_TYPE` and `TRANSFORMS_FILE`, which io reads back, so neither imports the other for a constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

QUANT_CONFIG = "reasoning_qat_quant.json"
"""Our quantized model folder's record (JSON: format, version, spec, modules, online transforms)."""
FORMAT = "reasoning-qat/fake-quant"
FORMAT_VERSION = 1
EXPORT_KEY = "reasoning_qat"
"""The config.json block of our W4A4KV4 export (base model type, spec, online transforms, loader)."""
MODEL_TYPE = "reasoning_qat"
"""config.json `model_type` of checkpoints that only our loader runs correctly."""
TRANSFORMS_FILE = "transforms.safetensors"
"""Online transforms and activation clips of a W4A4KV4 export."""

Kind = Literal["plain", "quantized", "exported"]


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    """The model folder itself: a stage directory's `model/`, or the path as given."""
    kind: Kind

    @property
    def quantized(self) -> bool:
        return self.kind != "plain"


def model_dir(path: str | Path) -> Path:
    """The model folder behind `path`: a stage directory's `model/` (a folder without a config.json of its own
    whose `model/` has one), else `path` itself (a model folder, or a hub id)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def compressed_tensors_config(path: Path) -> dict | None:
    """The `quantization_config` of a compressed-tensors checkpoint in the model folder `path`, else None."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if EXPORT_KEY in config:  # our W4A4KV4 export (pipeline.quant.formats.export): compressed-tensors weights
        return config["quantization_config"]
    qconfig = config.get("quantization_config")
    return qconfig if qconfig and qconfig.get("quant_method") == "compressed-tensors" else None


def locate(path: str | Path) -> ModelFolder:
    """The model folder behind `path` (stage directory, model directory or hub id) and what it holds."""
    folder = model_dir(path)
    if (folder / QUANT_CONFIG).exists():
        return ModelFolder(folder, "quantized")
    if compressed_tensors_config(folder) is not None:
        return ModelFolder(folder, "exported")
    return ModelFolder(folder, "plain")


def is_quantized(path: str | Path) -> bool:
    """True when `path` holds a model `load_quantized` reads: ours, or a compressed-tensors checkpoint."""
    return locate(path).quantized
