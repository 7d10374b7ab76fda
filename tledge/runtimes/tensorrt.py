"""TensorRT runner: loads an engine built by tledge (refusing, with a clear message, one built for another
TensorRT version or GPU) and runs it with the name-based tensor API of TensorRT 8.5+ (set_input_shape,
set_tensor_address, execute_async_v3). Device memory, copies and the stream come from tledge.cuda, so
no PyTorch or pycuda is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tledge.errors import TledgeError
from tledge.runtimes.base import Runner, register_runner


class EngineMismatch(TledgeError):
    """An engine built for another TensorRT version or GPU."""


def compatibility_problems(sidecar: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Why an engine described by ``sidecar`` cannot run where ``here`` (a fingerprint) was taken."""
    built = sidecar.get("fingerprint", {})
    problems = []
    if built.get("tensorrt") and here.get("tensorrt") and built["tensorrt"] != here["tensorrt"]:
        problems.append(f"built with TensorRT {built['tensorrt']}, this machine has {here['tensorrt']}")
    for key, label in (("gpu", "GPU"), ("compute_capability", "compute capability")):
        if built.get(key) and here.get(key) and built[key] != here[key]:
            problems.append(f"built for {label} {built[key]}, this machine has {here[key]}")
    return problems


class TrtRunner(Runner):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | os.PathLike) -> None:
        self.path = Path(engine_path)

    def activate(self) -> None:
        from tledge import cuda
        from tledge.export.tensorrt import fingerprint, require_tensorrt

        trt = require_tensorrt()
        sidecar_path = Path(str(self.path) + ".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
        problems = compatibility_problems(sidecar, fingerprint(trt))
        if problems:
            raise EngineMismatch(f"{self.path} cannot run here: {'; '.join(problems)}. TensorRT engines are tied to "
                                 "the TensorRT version and GPU they were built with.",
                                 "rebuild it on this device: `tledge export RUN --engine ...` here, or "
                                 "`python3 -m tledge_runtime build` in the bundle.")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not load {self.path} (built by another "
                                 "TensorRT version or for another GPU, or the file is damaged).",
                                 "rebuild the engine on this device.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        prof = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_shape = tuple(prof[2])
        self.num_classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.stream = cuda.Stream()
        self.d_in = cuda.DeviceBuffer(int(np.prod(self.max_shape)) * 4)
        self.d_out = cuda.DeviceBuffer(self.max_shape[0] * self.num_classes * 4)
        self.context.set_tensor_address(self.input_name, self.d_in.ptr.value)
        self.context.set_tensor_address(self.output_name, self.d_out.ptr.value)
        self.trt = trt

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] > self.max_shape[0] or x.shape[1:] != tuple(self.max_shape[1:]):
            raise ValueError(f"batch {x.shape} outside the engine's profile (max {self.max_shape})")
        self.context.set_input_shape(self.input_name, x.shape)
        out = np.empty((x.shape[0], self.num_classes), np.float32)
        self.stream.copy_in(self.d_in, x)
        if not self.context.execute_async_v3(self.stream.handle.value):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.copy_out(out, self.d_out)
        self.stream.synchronize()
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()

    def deactivate(self) -> None:
        for obj in ("d_in", "d_out", "stream"):
            if hasattr(self, obj):
                getattr(self, obj).close()
        self.context = self.engine = None

    def describe(self) -> dict[str, Any]:
        return {"runner": self.name, "device": "cuda", "engine": self.path.name,
                "tensorrt": getattr(getattr(self, "trt", None), "__version__", None)}


def _available() -> tuple[bool, str]:
    from tledge.export.tensorrt import tensorrt_available
    return tensorrt_available()


register_runner("tensorrt", TrtRunner, _available)
