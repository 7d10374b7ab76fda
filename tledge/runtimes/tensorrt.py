"""TensorRT runner: an engine built by tledge, run through tledge_runtime.engine.TrtEngine (name-based
tensor API of TensorRT 8.5+, ctypes CUDA memory). An engine built for another TensorRT version or GPU is
refused with a clear message that says to rebuild it on the device."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tledge.deploy.tledge_runtime import engine as rt
from tledge.errors import EngineMismatch, GpuError
from tledge.runtimes.base import Runner, register_runner


class TrtRunner(Runner):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | os.PathLike, cuda_graph: bool = False) -> None:
        self.path = Path(engine_path)
        self.cuda_graph = cuda_graph
        self.engine: rt.TrtEngine | None = None

    def activate(self) -> None:
        from tledge.export.tensorrt import require_tensorrt
        require_tensorrt()
        try:
            self.engine = rt.TrtEngine(self.path, cuda_graph=self.cuda_graph)
        except rt.EngineMismatch as exc:
            raise EngineMismatch(str(exc), "rebuild it here: `tledge export RUN --engine ...`, or "
                                 "`python3 -m tledge_runtime build` in the bundle.") from exc
        except (rt.EngineError, rt.cuda.CudaError) as exc:
            raise GpuError(f"{self.path.name}: {exc}", "see the message; `tledge bench` skips this row.") from exc

    def infer(self, x: np.ndarray) -> np.ndarray:
        assert self.engine is not None
        try:
            return self.engine.infer(x)
        except (rt.EngineError, rt.cuda.CudaError) as exc:
            raise GpuError(f"{self.path.name}: {exc}", "see the message; `tledge bench` skips this row.") from exc

    def device_times_ms(self) -> list[float]:
        return list(self.engine.device_ms) if self.engine is not None else []

    def synchronize(self) -> None:
        if self.engine is not None:
            self.engine.synchronize()

    def deactivate(self) -> None:
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"runner": self.name, "device": "cuda", "engine": self.path.name, "cuda_graph": self.cuda_graph,
                             "tensorrt": getattr(getattr(self.engine, "trt", None), "__version__", None)}
        eng = getattr(self.engine, "engine", None)
        if eng is not None:  # activation memory TensorRT needs on the device (weights not included)
            size = getattr(eng, "device_memory_size_v2", None) or getattr(eng, "device_memory_size", None)
            if size is not None:
                d["gpu_activation_memory_mib"] = size / 2**20
        return d


def _available() -> tuple[bool, str]:
    return rt.tensorrt_available()


register_runner("tensorrt", TrtRunner, _available)
