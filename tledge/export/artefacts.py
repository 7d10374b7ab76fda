"""The export's artefact files, in one registry: the pipeline writes them, bench and bundle read them.

Names are relative to the run directory. Each is written atomically (fsutil / onnx.save_model).
"""
from __future__ import annotations

from pathlib import Path

FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8-tensorrt": "model.int8.trt.onnx",
         "int8-cpu": "model.int8.cpu.onnx"}
MANIFEST = "export_manifest.json"
CALIB_DIR = "calib"                                  # statistics cache (stats-<key>.npz) and the ranges
CALIBRATION = f"{CALIB_DIR}/calibration.json"        # the chosen scales and zero-points of every form
TIMING_CACHE = "timing.cache"


def int8_file(form: str) -> str:
    """The INT8 graph of a form ('tensorrt' or 'cpu')."""
    return FILES[f"int8-{form}"]


def engine_file(precision: str) -> str:
    return f"model.{precision}.engine"


def path(run: str | Path, name: str) -> Path:
    """``run``/the file of artefact ``name`` (a FILES key)."""
    return Path(run) / FILES[name]
