"""onnxruntime runner for the ONNX graphs (FP32, FP16, INT8 Q/DQ) on CPU, CUDA or TensorRT providers."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from tledge.deps import has_module, optional_import
from tledge.errors import UsageError
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
        providers: Sequence[str] = [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]
        self.sess = ort.InferenceSession(self.path, session_options(self.threads, self.spinning), providers=list(providers))
        self.input_name = self.sess.get_inputs()[0].name
        self.output_name = self.sess.get_outputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output_name], {self.input_name: x})[0]

    def deactivate(self) -> None:
        self.sess = None

    def describe(self) -> dict[str, Any]:
        ort = optional_import("onnxruntime")
        return {"runner": self.name, "provider": self.provider, "device": self.device, "threads": self.threads,
                "onnxruntime": ort.__version__, "model": os.path.basename(self.path)}


def _available() -> tuple[bool, str]:
    return (True, "") if has_module("onnxruntime") else (False, "onnxruntime is not installed (pip install 'tledge[cpu]')")


register_runner("onnxruntime", OrtRunner, _available)
