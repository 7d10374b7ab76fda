"""Latency statistics on known samples and the timing loop's contract."""
from __future__ import annotations

import numpy as np
import pytest

from tledge.bench.latency import summarize, time_calls


def test_percentiles_on_known_samples() -> None:
    ns = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    s = summarize(ns, batch=4)
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5) and s["min_ms"] == 1 and s["max_ms"] == 100
    assert s["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s["throughput_ips"] == pytest.approx(4 * 1000 / 50.5)
    assert s["iters"] == 100


def test_single_sample_and_empty() -> None:
    assert summarize([2_000_000], 1)["std_ms"] == 0.0
    with pytest.raises(ValueError):
        summarize([], 1)


def test_time_calls_counts_warmup_and_syncs() -> None:
    calls = {"fn": 0, "sync": 0}

    def fn() -> None:
        calls["fn"] += 1

    def sync() -> None:
        calls["sync"] += 1

    out = time_calls(fn, sync, warmup=3, iters=7)
    assert len(out) == 7 and calls["fn"] == 10 and calls["sync"] == 10
    assert all(isinstance(v, int) and v >= 0 for v in out)
    assert len(time_calls(fn, None, warmup=0, budget_s=0.0, min_iters=5)) == 5
