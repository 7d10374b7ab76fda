"""The one place where tledge times inference: warm-up, perf_counter_ns around infer + synchronize,
percentiles. Runners' ``infer`` returns host arrays (device work finished and copied back), and
``synchronize()`` is called before the clock stops, so GPU work is never timed as an asynchronous launch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tledge.deploy.tledge_runtime.timing import summarize, time_calls


def measure_model(runner: Any, x: np.ndarray, **kw: Any) -> dict[str, Any]:
    """Model-only latency of ``runner.infer`` on a preprocessed batch."""
    return summarize(time_calls(lambda: runner.infer(x), runner.synchronize, **kw), len(x))


def measure_end_to_end(runner: Any, files: Sequence[str], pre: Any, **kw: Any) -> dict[str, Any]:
    """Decode + preprocess + infer for a batch of image files."""
    def step() -> Any:
        return runner.infer(np.stack([pre(f) for f in files]))
    return summarize(time_calls(step, runner.synchronize, **kw), len(files))
