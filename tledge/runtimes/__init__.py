"""One Runner per backend (torch, onnxruntime, tensorrt), all context managers with ``infer(x)``.

Runners hold no timing code: latency is measured in one place, tledge.bench.latency.
"""
from __future__ import annotations

from tledge.runtimes.base import Runner, available_runners, get_runner

__all__ = ["Runner", "available_runners", "get_runner"]
