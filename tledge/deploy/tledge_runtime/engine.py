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


# min, opt, max batch of the engine's optimisation profile: TensorRT tunes its kernels for opt, and batch 1 is
# the usual Jetson case (a camera frame at a time); up to 32 still runs, with kernels chosen for 1.
DEFAULT_PROFILE = (1, 1, 32)


class EngineError(RuntimeError):
    """Building or loading an engine failed; the message says why and what to do."""


class EngineMismatch(EngineError):
    """An engine built for another TensorRT version or GPU."""


def trt_version(trt: Any) -> tuple[int, ...]:
    """TensorRT's version as numbers ('10.3.0.26' -> (10, 3, 0, 26)); (0,) when unknown."""
    parts = []
    for p in str(getattr(trt, "__version__", "0")).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


def recipe(trt: Any, precision: str, strongly_typed: bool, batch: tuple[int, int, int], workspace_mib: int,
           dla_core: int | None) -> dict[str, Any]:
    """Everything about a build besides the graph and the device: an engine is reused only for the same."""
    return {"tensorrt": getattr(trt, "__version__", None), "precision": precision, "strongly_typed": strongly_typed,
            "profile": list(batch), "workspace_mib": workspace_mib, "dla_core": dla_core,
            "flags": sorted(str(f) for f in precision_flags_for_dla(trt, precision, strongly_typed, dla_core))}


def recipe_sha256(r: dict[str, Any]) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()


def check_dla(trt: Any, batch: tuple[int, int, int], dla_core: int | None, num_dla_cores: int) -> None:
    """EngineError for a DLA request that cannot work: DLA needs static shapes (min = opt = max), exists on
    Jetson Xavier and Orin AGX/NX only, and TensorRT 11 has no DLA before 11.4.1 (JetPack 7.2.2)."""
    if dla_core is None:
        return
    v = trt_version(trt)
    if v[:1] == (11,) and v < (11, 4, 1):
        raise EngineError(f"TensorRT {trt.__version__} has no DLA support (TensorRT 11 brings it back in 11.4.1, "
                          "JetPack 7.2.2): drop --dla-core, or use JetPack 6 (TensorRT 8.6/10.x).")
    if num_dla_cores == 0:
        raise EngineError(f"--dla-core {dla_core} asked for, but this device has no DLA "
                          "(DLA exists on Jetson Xavier and Orin AGX/NX); drop --dla-core.")
    if not 0 <= dla_core < num_dla_cores:
        raise EngineError(f"--dla-core {dla_core} does not exist: this device has DLA cores 0..{num_dla_cores - 1}.")
    if not batch[0] == batch[1] == batch[2]:
        raise EngineError(f"DLA needs a static batch, but the profile is {','.join(map(str, batch))}: pass e.g. "
                          f"--batch {batch[1]} (min = opt = max).")


def precision_flags_for_dla(trt: Any, precision: str, strongly_typed: bool, dla_core: int | None) -> list[Any]:
    """precision_flags, plus FP16 for INT8 on DLA with TensorRT 8.x: the layers the Q/DQ graph leaves in
    float can then run on DLA instead of falling back to the GPU."""
    flags = precision_flags(trt, precision, strongly_typed)
    if dla_core is not None and precision == "int8" and not strongly_typed:
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is not None and fp16 not in flags:
            flags.append(fp16)
    return flags


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


def fingerprint_key(fp: dict[str, Any]) -> str:
    """A short key of what an engine or a timing cache is tied to (TensorRT version, GPU, compute capability,
    SM count: Orin Nano and AGX Orin share compute capability 8.7, L4T release)."""
    import hashlib
    return hashlib.sha256(json.dumps({k: fp.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True).encode()).hexdigest()[:12]


FINGERPRINT_KEYS = ("tensorrt", "gpu", "compute_capability", "sm_count", "l4t")


def compatibility_problems(sidecar: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Why an engine described by ``sidecar`` cannot run where ``here`` (a fingerprint) was taken."""
    built = sidecar.get("fingerprint", {})
    problems = []
    for key, label in (("tensorrt", "TensorRT"), ("gpu", "GPU"), ("compute_capability", "compute capability"),
                       ("sm_count", "SM count"), ("l4t", "L4T release")):
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
          batch: tuple[int, int, int] = DEFAULT_PROFILE, workspace_mib: int = 1024, dla_core: int | None = None,
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
    check_dla(trt, batch, dla_core, int(getattr(builder, "num_DLA_cores", 0)))
    config = builder.create_builder_config()
    set_workspace(trt, config, workspace_mib)
    for flag in precision_flags_for_dla(trt, precision, strongly, dla_core):
        config.set_flag(flag)
    if hasattr(trt, "ProfilingVerbosity"):  # layer names and devices for the engine inspector (DLA report)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    bmin, bopt, bmax = batch
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (bmin, c, h, w), (bopt, c, h, w), (bmax, c, h, w))
    config.add_optimization_profile(profile)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
    cache_path = Path(timing_cache) if timing_cache else None
    timing_note = attach_timing_cache(config, cache_path)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build a {precision} engine from {onnx_path} "
                          "(see its messages above): raise the workspace, check the batch profile, or drop the DLA core.")
    seconds = time.perf_counter() - t0
    _write_atomic(engine_path, memoryview(serialized))
    if cache_path:
        timing = config.get_timing_cache()
        if timing is not None:  # Polygraphy guards this too: some builds return no cache
            _write_atomic(cache_path, memoryview(timing.serialize()))
    rec = recipe(trt, precision, strongly, batch, workspace_mib, dla_core)
    sidecar = {"engine": engine_path.name, "onnx": onnx_path.name, "onnx_sha256": sha256(onnx_path),
               "engine_sha256": sha256(engine_path), "precision": precision, "strongly_typed": strongly,
               "profile": {"input": inp.name, "min": bmin, "opt": bopt, "max": bmax}, "workspace_mib": workspace_mib,
               "dla_core": dla_core, "build_seconds": round(seconds, 2), "fingerprint": fingerprint(trt),
               "recipe": rec, "recipe_sha256": recipe_sha256(rec), "timing_cache": timing_note,
               "layers": layer_devices(trt, serialized) if dla_core is not None else None}
    _write_atomic(Path(str(engine_path) + ".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def attach_timing_cache(config: Any, cache_path: Path | None) -> str:
    """Give the builder the timing cache at ``cache_path`` (the caller keys the file by device fingerprint);
    a cache TensorRT refuses (``set_timing_cache`` returns False: another TensorRT or GPU) is replaced by an
    empty one and said so, never silently used."""
    data = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return "reused" if data else "new"
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineError("TensorRT refused even an empty timing cache; rebuild without --timing-cache.")
    print(f"warning: TensorRT refused the timing cache {cache_path} (made by another TensorRT or GPU); "
          "building with a new one", flush=True)
    return "refused-replaced"


def layer_devices(trt: Any, serialized: Any) -> dict[str, Any] | None:
    """Which layers of a built engine run on DLA, from TensorRT's engine inspector (8.2+): DLA subgraphs show
    as ``ForeignNode`` layers. None when the inspector is not there."""
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        eng = runtime.deserialize_cuda_engine(serialized)
        info = json.loads(eng.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except (AttributeError, ValueError, TypeError):
        return None
    layers = [ly if isinstance(ly, dict) else {"Name": str(ly)} for ly in info.get("Layers", [])]
    dla = [ly.get("Name", "") for ly in layers if "ForeignNode" in json.dumps(ly)]
    return {"layers": len(layers), "dla_subgraphs": dla}


def chunks(x: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
    """``x`` split into batches of at most ``hi`` rows (the engine profile's maximum); the last may be below
    ``lo`` and is padded by the caller."""
    if not 1 <= lo <= hi:
        raise EngineError(f"the engine's batch profile {lo}..{hi} is not valid")
    return [x[i:i + hi] for i in range(0, len(x), hi)]


class TrtEngine:
    """A deserialised engine with device buffers for its largest profile; ``infer`` is synchronous.

    ``cuda_graph=True`` replays each input shape's inference as a CUDA graph (captured after the first
    ordinary run of that shape, as TensorRT's guide advises; one graph per context and shape; a shape whose
    capture fails runs ordinary launches). Host staging buffers are pinned; ``device_ms`` collects the device
    time of each enqueue from CUDA events, beside the host-observed time the bench measures."""

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
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?): "
                              "close other GPU programs, or rebuild with a smaller --batch maximum.")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        # float32 in and out around FP16/INT8 compute; a graph exported with --input raw --input-dtype uint8
        # takes uint8 pixels (TensorRT 8.5+ allows UINT8 network inputs)
        self.in_dtype = np.float32
        for n in (self.input_name, self.output_name):
            dt = self.engine.get_tensor_dtype(n)
            if n == self.input_name and dt == getattr(trt, "uint8", None):
                self.in_dtype = np.uint8
            elif dt != trt.float32:
                raise EngineError(f"{self.path}: tensor {n!r} is {dt}, tledge engines take and give float32 "
                                  "(FP32 input and output around FP16/INT8 compute): rebuild it with tledge.")
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_shape, self.max_shape = tuple(lo), tuple(hi)
        self.num_classes = int(self.engine.get_tensor_shape(self.output_name)[-1])
        self.stream = cuda.Stream()
        self.d_in = cuda.DeviceBuffer(int(np.prod(self.max_shape)) * np.dtype(self.in_dtype).itemsize)
        self.d_out = cuda.DeviceBuffer(self.max_shape[0] * self.num_classes * 4)
        # pinned host staging: truly asynchronous copies (pageable ones are staged by the driver)
        self.h_in = cuda.HostBuffer(self.max_shape, self.in_dtype)
        self.h_out = cuda.HostBuffer((self.max_shape[0], self.num_classes), np.float32)
        self.ev_start, self.ev_end = cuda.Event(), cuda.Event()
        self.device_ms: list[float] = []  # device time of each enqueue (CUDA events), trtexec's "GPU Compute"
        self.context.set_tensor_address(self.input_name, self.d_in.ptr.value)
        self.context.set_tensor_address(self.output_name, self.d_out.ptr.value)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for any batch size: split into chunks of at most the profile's maximum, and a chunk below its
        minimum padded with zeros (the padding's rows are dropped)."""
        x = np.ascontiguousarray(x, self.in_dtype)
        if tuple(x.shape[1:]) != tuple(self.max_shape[1:]):
            raise EngineError(f"input of shape {tuple(x.shape)} does not fit {self.path.name}, which takes "
                              f"(N, {', '.join(map(str, self.max_shape[1:]))}): check the preprocessing size.")
        if not len(x):
            return np.zeros((0, self.num_classes), np.float32)
        parts = [self._infer_chunk(c) for c in chunks(x, self.min_shape[0], self.max_shape[0])]
        self.device_ms.append(sum(ms for _, ms in parts))
        return np.concatenate([out for out, _ in parts])

    def _infer_chunk(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        n = len(x)
        if n < self.min_shape[0]:
            x = np.concatenate([x, np.zeros((self.min_shape[0] - n, *x.shape[1:]), x.dtype)])
        b = x.shape[0]
        self.h_in.array[:b] = x
        self.stream.copy_in(self.d_in, self.h_in.array[:b])
        if not self.context.set_input_shape(self.input_name, x.shape):
            raise EngineError(f"TensorRT refused input shape {tuple(x.shape)} (profile {self.min_shape[0]}.."
                              f"{self.max_shape[0]})")
        graph = self.graphs.get(x.shape) if self.cuda_graph else None
        self.ev_start.record(self.stream)
        if graph is not None:
            graph.launch()
        elif not self.context.execute_async_v3(self.stream.handle.value):
            raise EngineError("TensorRT execute_async_v3 failed")
        self.ev_end.record(self.stream)
        self.stream.copy_out(self.h_out.array[:b], self.d_out)
        self.stream.synchronize()
        ms = self._elapsed_ms()
        out = np.array(self.h_out.array[:n])
        if self.cuda_graph and graph is None and x.shape not in self.graphs:
            self.graphs[x.shape] = self._capture()  # after one ordinary run, as TensorRT's guide advises
        return out, ms

    def _capture(self) -> Any:
        """A CUDA graph of one inference at the current shape, or None (then this shape runs ordinary launches,
        as trtexec falls back): capture can fail where a layer does not support it (e.g. DLA, some plugins)."""
        self.stream.synchronize()
        graph = self._new_graph()
        try:
            graph.begin()
            ok = self.context.execute_async_v3(self.stream.handle.value)
            graph.end()
            if not ok:
                raise cuda.CudaError("execute_async_v3 returned False during capture")
            return graph
        except cuda.CudaError as exc:
            graph.abort()
            print(f"warning: CUDA graph capture failed ({exc}); this shape runs without a graph", flush=True)
            return None

    def _elapsed_ms(self) -> float:
        return cuda.Event.elapsed_ms(self.ev_start, self.ev_end)

    def _new_graph(self) -> Any:
        return cuda.Graph(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        for g in self.graphs.values():
            if g is not None:
                g.close()
        self.graphs = {}
        for obj in ("d_in", "d_out", "h_in", "h_out", "ev_start", "ev_end", "stream"):
            if hasattr(self, obj):
                getattr(self, obj).close()
        self.context = self.engine = None
