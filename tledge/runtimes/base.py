"""The Runner interface and registry."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tledge.errors import unknown_choice


class Runner:
    """Load on ``__enter__``, ``infer(float32 NCHW) -> float32 logits``, release on ``__exit__``.

    ``synchronize()`` waits for queued device work (no-op on CPU), so a timer around ``infer`` +
    ``synchronize`` measures device time honestly.
    """

    name = "runner"
    device = "cpu"

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def deactivate(self) -> None:
        pass

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"runner": self.name, "device": self.device}


_REGISTRY: dict[str, Callable[..., Runner]] = {}
_AVAILABLE: dict[str, Callable[[], tuple[bool, str]]] = {}


def register_runner(name: str, factory: Callable[..., Runner], available: Callable[[], tuple[bool, str]]) -> None:
    _REGISTRY[name] = factory
    _AVAILABLE[name] = available


def get_runner(name: str, *args: Any, **kwargs: Any) -> Runner:
    _load_builtin()
    if name not in _REGISTRY:
        raise unknown_choice("runtime", name, _REGISTRY)
    return _REGISTRY[name](*args, **kwargs)


def available_runners() -> dict[str, tuple[bool, str]]:
    """name -> (available, reason when not)."""
    _load_builtin()
    return {n: f() for n, f in _AVAILABLE.items()}


def _load_builtin() -> None:
    from tledge.runtimes import onnxruntime as _ort  # noqa: F401
    from tledge.runtimes import tensorrt as _trt  # noqa: F401
    from tledge.runtimes import torch as _torch  # noqa: F401
