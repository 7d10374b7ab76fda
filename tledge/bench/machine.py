"""Facts about the machine a bench ran on, including a Jetson's power mode (numbers are meaningless if
the device is not in its maximum mode)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def jetson_power() -> dict[str, Any] | None:
    """nvpmodel's mode and whether it is the maximum (MAXN) one; None off a Jetson."""
    if not Path("/etc/nv_tegra_release").exists():
        return None
    q = _run(["nvpmodel", "-q"]) or ""
    mode = next((line.split(":", 1)[1].strip() for line in q.splitlines() if "Power Mode" in line), None)
    return {"nvpmodel": mode, "max_mode": bool(mode and "MAXN" in mode.upper()),
            "jetson_clocks": _run(["jetson_clocks", "--show"]) is not None}


def describe() -> dict[str, Any]:
    from tledge import cuda
    from tledge.perf import tune_allocator

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                            "os": platform.platform(), "python": platform.python_version(),
                            "allocator": tune_allocator()}
    try:
        info["gpu"] = cuda.device_info()
    except cuda.CudaError as exc:
        info["gpu"] = None
        info["gpu_reason"] = str(exc)
    l4t = cuda.l4t_release()
    if l4t:
        info["l4t"] = l4t
        info["power"] = jetson_power()
    versions = {}
    for mod in ("tledge", "torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    info["versions"] = versions
    return info
