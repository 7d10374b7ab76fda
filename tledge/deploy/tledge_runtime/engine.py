"""TensorRT engines for tledge graphs: build (with the device's fingerprint in a sidecar) and run.

Precision comes from the graph (the FP16 graph, the Q/DQ INT8 graph). Capabilities are probed, not
version strings parsed:
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` present (TensorRT 10.x; 11.x keeps it as an ignored
  flag and is always strongly typed): the network is strongly typed, no precision flags are set;
- otherwise (8.5/8.6): ``EXPLICIT_BATCH`` and ``BuilderFlag.FP16`` or ``INT8`` (required for Q/DQ graphs
  there) are set.
Inference uses the name-based tensor API of TensorRT 8.5+ (set_input_shape, set_tensor_address,
execute_async_v3) with device memory from the ctypes CUDA binding: no torch, pycuda or cuda-python.
The .engine file is exactly what TensorRT serialised; facts about it go to ``<engine>.json``.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import cuda
from .bundle_io import sha256

TRT_HINT = ("on a Jetson, TensorRT comes with JetPack (sudo apt install nvidia-jetpack; in a venv use "
            "--system-site-packages); on an x86 machine with an NVIDIA GPU: pip install tensorrt")


class EngineError(RuntimeError):
    """Building or loading an engine failed; the message says why and what to do."""


class EngineMismatch(EngineError):
    """An engine built for another TensorRT version or GPU."""


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not importable ({exc}): {TRT_HINT}") from exc
    return trt


def tensorrt_available() -> tuple[bool, str]:
    import importlib.util
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    ok, why = cuda.available()
    return (True, "") if ok else (False, f"no CUDA GPU: {why}")


def network_flags(trt: Any) -> tuple[int, bool]:
    """Creation flags for ``create_network`` and whether the network is strongly typed."""
    flags = 0
    ndcf = trt.NetworkDefinitionCreationFlag
    strongly = hasattr(ndcf, "STRONGLY_TYPED")
    if strongly:
        flags |= 1 << int(ndcf.STRONGLY_TYPED)
    elif hasattr(ndcf, "EXPLICIT_BATCH"):
        flags |= 1 << int(ndcf.EXPLICIT_BATCH)
    return flags, strongly


def precision_flags(trt: Any, precision: str, strongly_typed: bool) -> list[Any]:
    """Builder flags to set: none for strongly typed networks; FP16 or INT8 otherwise."""
    if strongly_typed:
        return []
    name = {"fp16": "FP16", "int8": "INT8"}[precision]
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise EngineError(f"this TensorRT has neither strongly typed networks nor BuilderFlag.{name}: "
                          "use TensorRT 8.5 or newer.")
    return [flag]


def set_workspace(trt: Any, config: Any, mib: int) -> None:
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, mib << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = mib << 20


def fingerprint(trt: Any | None = None) -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU, compute capability, L4T (JetPack) release."""
    info: dict[str, Any] = {"tensorrt": getattr(trt, "__version__", None), "machine": platform.machine(),
                            "l4t": cuda.l4t_release()}
    try:
        info.update(cuda.device_info())
    except cuda.CudaError as exc:
        info["gpu_error"] = str(exc)
    return info


def compatibility_problems(sidecar: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Why an engine described by ``sidecar`` cannot run where ``here`` (a fingerprint) was taken."""
    built = sidecar.get("fingerprint", {})
    problems = []
    for key, label in (("tensorrt", "TensorRT"), ("gpu", "GPU"), ("compute_capability", "compute capability"),
                       ("l4t", "L4T release")):
        if built.get(key) and here.get(key) and built[key] != here[key]:
            problems.append(f"built with {label} {built[key]}, this machine has {here[key]}"
                            if key == "tensorrt" else f"built for {label} {built[key]}, this machine has {here[key]}")
    return problems


def _write_atomic(dest: Path, data: bytes | memoryview) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str,
          batch: tuple[int, int, int] = (1, 8, 32), workspace_mib: int = 1024, dla_core: int | None = None,
          timing_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Parse the ONNX graph, build and serialise the engine atomically, write the sidecar JSON."""
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    set_workspace(trt, config, workspace_mib)
    for flag in precision_flags(trt, precision, strongly):
        config.set_flag(flag)
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    bmin, bopt, bmax = batch
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (bmin, c, h, w), (bopt, c, h, w), (bmax, c, h, w))
    config.add_optimization_profile(profile)
    if dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise EngineError(f"--dla-core {dla_core} asked for, but this device has no DLA "
                              "(DLA exists on Jetson Xavier and Orin AGX/NX); drop --dla-core.")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build a {precision} engine from {onnx_path} "
                          "(see its messages above): raise the workspace, check the batch profile, or drop the DLA core.")
    seconds = time.perf_counter() - t0
    _write_atomic(engine_path, memoryview(serialized))
    if cache_path:
        _write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    sidecar = {"engine": engine_path.name, "onnx": onnx_path.name, "onnx_sha256": sha256(onnx_path),
               "engine_sha256": sha256(engine_path), "precision": precision, "strongly_typed": strongly,
               "profile": {"input": inp.name, "min": bmin, "opt": bopt, "max": bmax}, "workspace_mib": workspace_mib,
               "dla_core": dla_core, "build_seconds": round(seconds, 2), "fingerprint": fingerprint(trt)}
    _write_atomic(Path(str(engine_path) + ".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


class TrtEngine:
    """A deserialised engine with device buffers for its largest profile; ``infer`` is synchronous.

    ``cuda_graph=True`` replays each input shape's inference as a CUDA graph (captured on first use, after
    one ordinary run, as TensorRT's guide advises); the host<->device copies stay outside the graph because
    copies from pageable host memory cannot be captured."""

    def __init__(self, engine_path: str | os.PathLike, cuda_graph: bool = False) -> None:
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple[int, ...], Any] = {}
        trt = import_tensorrt()
        self.path = Path(engine_path)
        side = Path(str(self.path) + ".json")
        sidecar = json.loads(side.read_text()) if side.is_file() else {}
        problems = compatibility_problems(sidecar, fingerprint(trt))
        if problems:
            raise EngineMismatch(f"{self.path} cannot run here: {'; '.join(problems)}. TensorRT engines are tied to "
                                 "the TensorRT version and GPU they were built with: rebuild it on this device.")
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT {trt.__version__} could not load {self.path} (built by another TensorRT "
                                 "version or for another GPU, or damaged): rebuild it on this device.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.max_shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])
        self.num_classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.stream = cuda.Stream()
        self.d_in = cuda.DeviceBuffer(int(np.prod(self.max_shape)) * 4)
        self.d_out = cuda.DeviceBuffer(self.max_shape[0] * self.num_classes * 4)
        self.context.set_tensor_address(self.input_name, self.d_in.ptr.value)
        self.context.set_tensor_address(self.output_name, self.d_out.ptr.value)

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] > self.max_shape[0] or tuple(x.shape[1:]) != tuple(self.max_shape[1:]):
            raise ValueError(f"batch {x.shape} outside the engine's profile (max {self.max_shape})")
        out = np.empty((x.shape[0], self.num_classes), np.float32)
        self.stream.copy_in(self.d_in, x)
        graph = self.graphs.get(x.shape) if self.cuda_graph else None
        if graph is not None:
            self.context.set_input_shape(self.input_name, x.shape)
            graph.launch()
        else:
            self.context.set_input_shape(self.input_name, x.shape)
            if not self.context.execute_async_v3(self.stream.handle.value):
                raise EngineError("TensorRT execute_async_v3 failed")
            if self.cuda_graph:
                self.stream.synchronize()
                graph = cuda.Graph(self.stream)
                graph.begin()
                ok = self.context.execute_async_v3(self.stream.handle.value)
                graph.end()
                if not ok:
                    raise EngineError("TensorRT execute_async_v3 failed during CUDA graph capture")
                self.graphs[x.shape] = graph
        self.stream.copy_out(out, self.d_out)
        self.stream.synchronize()
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for g in self.graphs.values():
            g.close()
        self.graphs = {}
        for obj in ("d_in", "d_out", "stream"):
            if hasattr(self, obj):
                getattr(self, obj).close()
        self.context = self.engine = None
