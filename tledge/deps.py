"""Lazy imports of heavy or optional packages, with errors that say what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from tledge.errors import MissingDependency

_HINTS = {
    "tensorrt": "on a Jetson it comes with JetPack (python3-libnvinfer, in /usr/lib/python3/dist-packages; "
                "in a venv use --system-site-packages); on x86 install the extra: pip install 'tledge[tensorrt]'",
    "onnxruntime": "pip install 'tledge[cpu]' (or 'tledge[gpu]' for onnxruntime-gpu; the two conflict, "
                   "install only one)",
    "onnx": "pip install onnx",
    "torch": "pip install torch torchvision",
    "torchvision": "pip install torchvision",
    "matplotlib": "pip install matplotlib",
    "sklearn": "pip install 'tledge[dev]' (scikit-learn)",
    "efficientnet_lite_pytorch": "pip install efficientnet-lite-pytorch",
}


def optional_import(name: str, hint: str | None = None) -> ModuleType:
    """Import ``name`` or raise MissingDependency naming the package or extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        raise MissingDependency(
            f"this step needs the Python package '{top}', which is not importable ({exc}).",
            hint or _HINTS.get(top, f"pip install {top}"),
        ) from exc


def has_module(name: str) -> bool:
    """True when ``name`` can be imported (without importing anything heavy on failure)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
