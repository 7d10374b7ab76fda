"""A minimal CUDA binding over ctypes (libcudart for memory, streams and events; libcuda for the device
name and compute capability), so TensorRT inference and device fingerprints need neither PyTorch,
pycuda nor cuda-python: JetPack ships these libraries. Imports nothing heavy; loads libraries on use.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

H2D, D2H = 1, 2
_libs: dict[str, Any] = {}


class CudaError(RuntimeError):
    pass


def _load(kind: str) -> Any:
    if kind in _libs:
        return _libs[kind]
    names = {"cudart": ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.13"],
             "cuda": ["libcuda.so.1", "libcuda.so"]}[kind]
    found = ctypes.util.find_library(kind)
    for name in ([found] if found else []) + names:
        try:
            _libs[kind] = ctypes.CDLL(name)
            return _libs[kind]
        except OSError:
            continue
    raise CudaError(f"the CUDA library {names[0]} was not found (is this a CUDA machine? On a Jetson it "
                    "comes with JetPack; check LD_LIBRARY_PATH includes /usr/local/cuda/lib64)")


def _check(code: int, what: str) -> None:
    if code != 0:
        rt = _libs.get("cudart")
        msg = ""
        if rt is not None:
            rt.cudaGetErrorString.restype = ctypes.c_char_p
            msg = rt.cudaGetErrorString(code).decode()
        raise CudaError(f"{what} failed with CUDA error {code} {msg}")


def device_info(index: int = 0) -> dict[str, Any]:
    """GPU name and compute capability through the driver API; raises CudaError without a GPU."""
    cu = _load("cuda")
    _check(cu.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    _check(cu.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev), "cuDeviceGetAttribute(major)")
    _check(cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev), "cuDeviceGetAttribute(minor)")
    sms = ctypes.c_int()
    # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: Orin Nano and AGX Orin share compute capability 8.7
    _check(cu.cuDeviceGetAttribute(ctypes.byref(sms), 16, dev), "cuDeviceGetAttribute(multiprocessors)")
    ver = ctypes.c_int()
    cu.cuDriverGetVersion(ctypes.byref(ver))
    return {"gpu": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}",
            "sm_count": sms.value, "cuda_driver": f"{ver.value // 1000}.{(ver.value % 1000) // 10}"}


def l4t_release() -> str | None:
    """The Jetson Linux (L4T) release from /etc/nv_tegra_release, or None off a Jetson."""
    try:
        first = open("/etc/nv_tegra_release", encoding="utf-8").readline()
    except OSError:
        return None
    # "# R35 (release), REVISION: 4.1, GCID: ..., BOARD: ..."
    parts = first.replace("#", "").split(",")
    try:
        major = parts[0].split()[0].lstrip("R")
        rev = parts[1].split(":")[1].strip()
        return f"{major}.{rev}"
    except (IndexError, ValueError):
        return first.strip()


class DeviceBuffer:
    """Device memory of ``nbytes`` (cudaMalloc), freed on close."""

    def __init__(self, nbytes: int) -> None:
        self.rt = _load("cudart")
        self.ptr = ctypes.c_void_p()
        self.nbytes = nbytes
        _check(self.rt.cudaMalloc(ctypes.byref(self.ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")

    def close(self) -> None:
        if self.ptr:
            self.rt.cudaFree(self.ptr)
            self.ptr = ctypes.c_void_p()


class HostBuffer:
    """Page-locked host memory (cudaHostAlloc) as a numpy array: copies from it are truly asynchronous and
    faster than from pageable memory, and can be captured in a CUDA graph."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        import numpy as np
        self.rt = _load("cudart")
        self.ptr = ctypes.c_void_p()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        _check(self.rt.cudaHostAlloc(ctypes.byref(self.ptr), ctypes.c_size_t(max(nbytes, 1)), 0), "cudaHostAlloc")
        buf = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr.value)
        self.array = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self.array = None
            self.rt.cudaFreeHost(self.ptr)
            self.ptr = ctypes.c_void_p()


class Event:
    """A CUDA event; ``elapsed_ms(start, end)`` is the device time between two recorded events (what trtexec
    reports as "GPU Compute Time" when they bracket the enqueue)."""

    def __init__(self) -> None:
        self.rt = _load("cudart")
        self.handle = ctypes.c_void_p()
        _check(self.rt.cudaEventCreate(ctypes.byref(self.handle)), "cudaEventCreate")

    def record(self, stream: "Stream") -> None:
        _check(self.rt.cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    @staticmethod
    def elapsed_ms(start: "Event", end: "Event") -> float:
        ms = ctypes.c_float()
        _check(start.rt.cudaEventSynchronize(end.handle), "cudaEventSynchronize")
        _check(start.rt.cudaEventElapsedTime(ctypes.byref(ms), start.handle, end.handle), "cudaEventElapsedTime")
        return float(ms.value)

    def close(self) -> None:
        if self.handle:
            self.rt.cudaEventDestroy(self.handle)
            self.handle = ctypes.c_void_p()


class Stream:
    def __init__(self) -> None:
        self.rt = _load("cudart")
        self.handle = ctypes.c_void_p()
        _check(self.rt.cudaStreamCreate(ctypes.byref(self.handle)), "cudaStreamCreate")

    def copy_in(self, dst: DeviceBuffer, src: Any) -> None:
        _check(self.rt.cudaMemcpyAsync(dst.ptr, ctypes.c_void_p(src.ctypes.data), ctypes.c_size_t(src.nbytes), H2D,
                                       self.handle), "cudaMemcpyAsync H2D")

    def copy_out(self, dst: Any, src: DeviceBuffer) -> None:
        _check(self.rt.cudaMemcpyAsync(ctypes.c_void_p(dst.ctypes.data), src.ptr, ctypes.c_size_t(dst.nbytes), D2H,
                                       self.handle), "cudaMemcpyAsync D2H")

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle:
            self.rt.cudaStreamDestroy(self.handle)
            self.handle = ctypes.c_void_p()


class Graph:
    """A CUDA graph captured from the work queued on ``stream`` between ``begin`` and ``end``, replayed by
    ``launch``. Uses cudaGraphInstantiateWithFlags (CUDA 11.4+, the same signature on 12.x)."""

    THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal

    def __init__(self, stream: Stream) -> None:
        self.rt, self.stream = _load("cudart"), stream
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        self.capturing = False

    def begin(self) -> None:
        _check(self.rt.cudaStreamBeginCapture(self.stream.handle, self.THREAD_LOCAL), "cudaStreamBeginCapture")
        self.capturing = True

    def end(self) -> None:
        self.capturing = False
        _check(self.rt.cudaStreamEndCapture(self.stream.handle, ctypes.byref(self.graph)), "cudaStreamEndCapture")
        _check(self.rt.cudaGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0)),
               "cudaGraphInstantiateWithFlags")

    def launch(self) -> None:
        _check(self.rt.cudaGraphLaunch(self.exec, self.stream.handle), "cudaGraphLaunch")

    def abort(self) -> None:
        """After a failed capture: leave capture mode (else the stream stays unusable), clear the error it left,
        and free whatever was made."""
        if self.capturing:
            self.capturing = False
            self.rt.cudaStreamEndCapture(self.stream.handle, ctypes.byref(self.graph))
        self.rt.cudaGetLastError()
        self.close()

    def close(self) -> None:
        if self.exec:
            self.rt.cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph:
            self.rt.cudaGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()


def available() -> tuple[bool, str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False, "CUDA_VISIBLE_DEVICES is empty"
    try:
        device_info()
        return True, ""
    except CudaError as exc:
        return False, str(exc)
