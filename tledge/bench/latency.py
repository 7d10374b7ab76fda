"""The one place where tledge times inference: warm-up, perf_counter_ns around infer + synchronize,
percentiles. Runners' ``infer`` returns host arrays (device work finished and copied back), and
``synchronize()`` is called before the clock stops, so GPU work is never timed as an asynchronous launch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tledge.deploy.tledge_runtime.timing import summarize, time_calls


def measure_model(runner: Any, x: np.ndarray, **kw: Any) -> dict[str, Any]:
    """Model-only latency of ``runner.infer`` on a preprocessed batch: ``p50_ms`` etc. are host-observed
    (copies in and out included, ``timer: host``); a runner that reports device time (``device_times_ms()``,
    CUDA events around the enqueue) adds ``device`` statistics of the same calls (trtexec's GPU Compute Time)."""
    before = len(runner.device_times_ms()) if hasattr(runner, "device_times_ms") else None
    res = {**summarize(time_calls(lambda: runner.infer(x), runner.synchronize, **kw), len(x)), "timer": "host"}
    if before is not None:
        dev = runner.device_times_ms()[before:]
        tail = dev[-res["iters"]:]  # the timed calls (warm-up excluded)
        if tail:
            res["device"] = {k: v for k, v in summarize(np.asarray(tail) * 1e6, len(x)).items() if k != "batch"}
    return res


def measure_end_to_end(runner: Any, files: Sequence[str], pre: Any, **kw: Any) -> dict[str, Any]:
    """Decode + preprocess + infer for a batch of image files."""
    def step() -> Any:
        return runner.infer(np.stack([pre(f) for f in files]))
    return summarize(time_calls(step, runner.synchronize, **kw), len(files))
