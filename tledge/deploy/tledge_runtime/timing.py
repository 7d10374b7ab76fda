"""Latency statistics and the timing loop, shared by `tledge bench` and the deploy runtime's `bench`.

Warm-up, perf_counter_ns around infer + synchronize, linear-interpolated percentiles. Runners return
host arrays (device work finished and copied back) and synchronize() is called before the clock stops,
so GPU work is never timed as an asynchronous launch.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(samples_ns: Sequence[int] | np.ndarray, batch: int) -> dict[str, Any]:
    """Latency statistics in milliseconds (linear-interpolated percentiles) and throughput."""
    s = np.asarray(samples_ns, np.float64) / 1e6
    if s.size == 0:
        raise ValueError("no latency samples")
    p = np.percentile(s, PERCENTILES)
    return {"batch": batch, "iters": int(s.size), "p50_ms": float(p[0]), "p90_ms": float(p[1]),
            "p99_ms": float(p[2]), "mean_ms": float(s.mean()), "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
            "min_ms": float(s.min()), "max_ms": float(s.max()), "throughput_ips": float(batch * 1000.0 / p[0])}


def time_calls(fn: Callable[[], Any], sync: Callable[[], None] | None = None, warmup: int = 5,
               iters: int | None = None, budget_s: float = 2.0, min_iters: int = 10, max_iters: int = 10000) -> list[int]:
    """Run ``fn`` ``warmup`` times, then time each call (until ``iters`` calls, or ``budget_s`` seconds
    with at least ``min_iters`` calls). Returns nanoseconds per call."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    out: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    while True:
        t0 = clock()
        fn()
        sync()
        out.append(clock() - t0)
        n = len(out)
        if iters is not None:
            if n >= iters:
                break
        elif (n >= min_iters and clock() >= deadline) or n >= max_iters:
            break
    return out
