"""TensorRT engine building from tledge's ONNX graphs (the only module besides runtimes/tensorrt.py that
touches tensorrt).

Precision comes from the graph: the FP16 graph and the Q/DQ INT8 graph. Capabilities are probed, not
version strings parsed:
- ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` present (TensorRT 10.x; 11.x keeps it as an ignored
  flag, strongly typed always): the network is strongly typed and no precision flags are set;
- otherwise (8.5/8.6): ``BuilderFlag.FP16`` or ``BuilderFlag.INT8`` is set so the builder may use the
  graph's precision (INT8 is required for Q/DQ graphs there), and ``EXPLICIT_BATCH`` is set.
The .engine file is exactly what TensorRT serialised; facts about it go to ``<engine>.json``.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tledge.deps import has_module, optional_import
from tledge.errors import MissingDependency, TledgeError, UsageError
from tledge.fsutil import atomic_path, sha256_file, write_json

TRT_HINT = ("on a Jetson, TensorRT comes with JetPack (sudo apt install nvidia-jetpack; in a venv use "
            "--system-site-packages); on an x86 machine with an NVIDIA GPU: pip install 'tledge[tensorrt]'")


@dataclass
class EngineConfig:
    precision: str                         # fp16 | int8
    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 1024
    dla_core: int | None = None
    timing_cache: str | None = None


class EngineBuildError(TledgeError):
    pass


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when tensorrt imports and a CUDA GPU answers; else (False, why)."""
    if not has_module("tensorrt"):
        return False, "the tensorrt Python package is not installed"
    from tledge import cuda
    ok, why = cuda.available()
    return (True, "") if ok else (False, f"no CUDA GPU: {why}")


def require_tensorrt() -> Any:
    ok, why = tensorrt_available()
    if not ok:
        raise MissingDependency(f"building a TensorRT engine needs TensorRT and an NVIDIA GPU: {why}. The ONNX "
                                "graphs were written (or can be, without --engine).", TRT_HINT)
    return optional_import("tensorrt", TRT_HINT)


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
        raise EngineBuildError(f"this TensorRT has neither strongly typed networks nor BuilderFlag.{name}.",
                               "use TensorRT 8.5 or newer.")
    return [flag]


def set_workspace(trt: Any, config: Any, mib: int) -> None:
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, mib << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = mib << 20


def fingerprint(trt: Any | None = None) -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU, compute capability, L4T release."""
    from tledge import cuda
    info: dict[str, Any] = {"tensorrt": getattr(trt, "__version__", None), "machine": platform.machine(),
                            "l4t": cuda.l4t_release()}
    try:
        info.update(cuda.device_info())
    except cuda.CudaError as exc:
        info["gpu_error"] = str(exc)
    return info


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, cfg: EngineConfig) -> dict[str, Any]:
    """Parse the ONNX graph, build and serialise the engine atomically; write the sidecar JSON."""
    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errs}",
                               "export again with --opset 13 or report the error with the manifest.")
    config = builder.create_builder_config()
    set_workspace(trt, config, cfg.workspace_mib)
    for flag in precision_flags(trt, cfg.precision, strongly):
        config.set_flag(flag)
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    profile = builder.create_optimization_profile()
    bmin, bopt, bmax = cfg.batch
    profile.set_shape(inp.name, (bmin, c, h, w), (bopt, c, h, w), (bmax, c, h, w))
    config.add_optimization_profile(profile)
    if cfg.dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise EngineBuildError(f"--dla-core {cfg.dla_core} asked for, but this device has no DLA.",
                                   "drop --dla-core (DLA exists on Jetson Xavier/Orin AGX and NX).")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = cfg.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU, said in the sidecar
    cache_bytes = b""
    if cfg.timing_cache and Path(cfg.timing_cache).is_file():
        cache_bytes = Path(cfg.timing_cache).read_bytes()
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build a {cfg.precision} engine from {onnx_path} "
                               "(see the TensorRT messages above).",
                               "raise --workspace, check --batch, or drop --dla-core.")
    seconds = time.perf_counter() - t0
    with atomic_path(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(memoryview(serialized))
    if cfg.timing_cache:
        with atomic_path(cfg.timing_cache) as tmp:
            with open(tmp, "wb") as f:
                f.write(memoryview(config.get_timing_cache().serialize()))
    sidecar = {"engine": engine_path.name, "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
               "engine_sha256": sha256_file(engine_path), "precision": cfg.precision,
               "strongly_typed": strongly, "profile": {"input": inp.name, "min": bmin, "opt": bopt, "max": bmax},
               "workspace_mib": cfg.workspace_mib, "dla_core": cfg.dla_core, "build_seconds": round(seconds, 2),
               "fingerprint": fingerprint(trt), "config": asdict(cfg)}
    write_json(str(engine_path) + ".json", sidecar)
    return sidecar
