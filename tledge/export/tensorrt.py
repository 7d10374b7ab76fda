"""TensorRT engine building for `tledge export` (the only module besides runtimes/tensorrt.py that touches
tensorrt). The building itself lives in the deploy runtime (tledge_runtime.engine), so a Jetson builds
its engine with exactly this code; this module adds tledge's errors and options.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tledge.deploy.tledge_runtime import engine as rt
from tledge.deps import optional_import
from tledge.errors import EngineBuildError, MissingDependency, UsageError
from tledge.fsutil import read_json, write_json

TRT_HINT = rt.TRT_HINT
network_flags = rt.network_flags
set_workspace = rt.set_workspace
fingerprint = rt.fingerprint
tensorrt_available = rt.tensorrt_available


def fingerprint_key() -> str:
    """This machine's device fingerprint key (TensorRT version, GPU, compute capability, SM count, L4T)."""
    return rt.fingerprint_key(rt.fingerprint(optional_import("tensorrt", TRT_HINT)))


@dataclass
class EngineConfig:
    precision: str                         # fp16 | int8
    batch: tuple[int, int, int] = rt.DEFAULT_PROFILE
    workspace_mib: int = 1024
    dla_core: int | None = None
    timing_cache: str | None = None


def require_tensorrt() -> Any:
    ok, why = tensorrt_available()
    if not ok:
        raise MissingDependency(f"building a TensorRT engine needs TensorRT and an NVIDIA GPU: {why}. The ONNX "
                                "graphs were written (or can be, without --engine).", TRT_HINT)
    return optional_import("tensorrt", TRT_HINT)


def precision_flags(trt: Any, precision: str, strongly_typed: bool) -> list[Any]:
    try:
        return rt.precision_flags(trt, precision, strongly_typed)
    except rt.EngineError as exc:
        raise EngineBuildError(str(exc), "use TensorRT 8.5 or newer.") from exc


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32); one number means min = opt = max."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise UsageError(f"--batch {text!r} is not min,opt,max with 1 <= min <= opt <= max.",
                         "pass e.g. --batch 1,8,32 (or one number for a fixed batch).")
    return parts[0], parts[1], parts[2]


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, cfg: EngineConfig) -> dict[str, Any]:
    """Build, serialise atomically, and write the sidecar (with tledge's options added)."""
    require_tensorrt()
    try:
        sidecar = rt.build(onnx_path, engine_path, cfg.precision, cfg.batch, cfg.workspace_mib, cfg.dla_core,
                           cfg.timing_cache)
    except (rt.EngineError, rt.cuda.CudaError) as exc:
        raise EngineBuildError(str(exc), "see the TensorRT messages above; `tledge export --help` lists the options.") from exc
    side_path = Path(str(engine_path) + ".json")
    sidecar = {**read_json(side_path), "config": asdict(cfg)}
    write_json(side_path, sidecar)
    return sidecar
