"""onnxruntime runner for the ONNX graphs (FP32, FP16, INT8 Q/DQ) on CPU, CUDA or TensorRT providers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tledge.deps import has_module, optional_import
from tledge.errors import TledgeError, UsageError
from tledge.runtimes.base import Runner, register_runner

# Exact INT8 arithmetic on every x86 CPU. Without VNNI (AVX2, AVX-512 without VNNI), onnxruntime's fast u8s8
# kernels add pairs of u8*s8 products in saturating 16-bit registers (vpmaddubsw), so a QLinearConv's result
# depends on the CPU: on this project's AMD EPYC (AVX2) the INT8 CPU form's logits correlated 0.90 with FP32
# instead of 0.95, and every accuracy figure and pass decision changed with the machine. This option makes
# onnxruntime use its u8u8 kernels there (no saturation); on VNNI/AMX CPUs it changes nothing.
# tests/unit/test_ort_exact_int8.py holds a minimal graph that saturates without it.
EXACT_INT8 = ("session.x64quantprecision", "1")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_options(threads: int | None = None, spinning: bool = False) -> Any:
    ort = optional_import("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning threads steal time from whatever is timed next in the same process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry(EXACT_INT8[0], EXACT_INT8[1])
    return so


class ProviderFallback(TledgeError):
    """onnxruntime ran the graph on another execution provider than the one asked for (it falls back to
    the CPU when the TensorRT or CUDA provider fails): the figures would be labelled with the wrong device."""


def engine_cache_dir(onnx_path: str | os.PathLike) -> Path:
    """onnxruntime's TensorRT provider caches its engines beside the graph (``.ort-trt-cache/``), so a second
    session does not rebuild them (minutes on a Jetson)."""
    return Path(onnx_path).resolve().parent / ".ort-trt-cache"


def provider_list(provider: str, onnx_path: str | os.PathLike, quantized: bool) -> list[Any]:
    """What to ask onnxruntime for: the provider, then the ones it may fall back to (TensorRT -> CUDA -> CPU),
    with the TensorRT provider's engine cache and, for Q/DQ graphs, ``trt_int8_enable`` (needed by
    onnxruntime builds on TensorRT < 10 to honour the Q/DQ nodes, microsoft/onnxruntime#13381)."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cache = engine_cache_dir(onnx_path)
    opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}
    if quantized:
        opts["trt_int8_enable"] = "True"
    return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]


def require_active(sess: Any, provider: str) -> None:
    """ProviderFallback unless ``provider`` is the session's first active provider."""
    want = PROVIDERS[provider]
    active = list(sess.get_providers())
    if not active or active[0] != want:
        raise ProviderFallback(f"onnxruntime did not run the graph on {want} (active: {', '.join(active) or 'none'}): "
                               "it fell back, so its figures would be labelled with the wrong device.",
                               "see onnxruntime's log above for why the provider failed (CUDA/cuDNN/TensorRT "
                               "libraries, versions); the row is skipped.")


def is_quantized(onnx_path: str | os.PathLike) -> bool:
    """Whether the graph holds Q/DQ nodes (read without loading the weights)."""
    import onnx
    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 spinning: bool = False) -> None:
        if provider not in PROVIDERS:
            raise UsageError(f"unknown onnxruntime provider '{provider}'; choices: {', '.join(PROVIDERS)}.",
                             "pass cpu, cuda or tensorrt.")
        self.path, self.provider, self.threads, self.spinning = str(onnx_path), provider, threads, spinning
        self.device = "cpu" if provider == "cpu" else "cuda"

    def activate(self) -> None:
        ort = optional_import("onnxruntime")
        want = PROVIDERS[self.provider]
        if want not in ort.get_available_providers():
            raise UsageError(f"onnxruntime has no {want} here (available: {ort.get_available_providers()}).",
                             "install onnxruntime-gpu ('tledge[gpu]') on a CUDA machine, or use the cpu provider.")
        providers = provider_list(self.provider, self.path, self.provider == "tensorrt" and is_quantized(self.path))
        if self.provider == "tensorrt":
            engine_cache_dir(self.path).mkdir(exist_ok=True)
        self.sess = ort.InferenceSession(self.path, session_options(self.threads, self.spinning), providers=providers)
        require_active(self.sess, self.provider)
        self.input_name = self.sess.get_inputs()[0].name
        self.output_name = self.sess.get_outputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output_name], {self.input_name: x})[0]

    def deactivate(self) -> None:
        self.sess = None

    def describe(self) -> dict[str, Any]:
        ort = optional_import("onnxruntime")
        return {"runner": self.name, "provider": self.provider, "device": self.device, "threads": self.threads,
                "onnxruntime": ort.__version__, "model": os.path.basename(self.path),
                "active_providers": list(self.sess.get_providers()) if getattr(self, "sess", None) else None}


def _available() -> tuple[bool, str]:
    return (True, "") if has_module("onnxruntime") else (False, "onnxruntime is not installed (pip install 'tledge[cpu]')")


register_runner("onnxruntime", OrtRunner, _available)
