"""INT8 calibration: streaming activation statistics with bounded memory, and the range rules.

Statistics are collected in one pass with onnxruntime (every calibrated tensor made a graph output),
batch by batch: per tensor a running min/max and two 2048-bin histograms (positive values and
magnitudes of negative values, counted by torch.histc) over [0, hmax]. When a batch exceeds hmax, the
range doubles and bins merge pairwise, which is exact. Memory is bins x tensors plus one batch of
activations, whatever the number of images (onnxruntime's own entropy calibrator keeps every activation
and was seen to need over 24 GB for ResNet-50 with 256 images).

Range rules (per tensor):
- ``minmax``: the observed range.
- ``percentile``: the ``percentile``-th percentile of |x| (TensorRT's and pytorch-quantization's
  percentile calibrator).
- ``entropy``: TensorRT's entropy calibration (KL divergence between the clipped reference histogram and
  its 128-level quantized version; Migacz, "8-bit Inference with TensorRT", GTC 2017).
- ``mse``: the clipping threshold that minimises the expected squared quantization error under the
  histogram (as in pytorch-quantization's MSE calibrator and AIMET's "tf_enhanced").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

BINS = 2048
HISTC_CHUNK = 1 << 24  # torch.histc's float32 counts are exact up to 2^24
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class TensorStats:
    """Streaming min/max and histograms of one tensor."""

    bins: int = BINS
    min: float = float("inf")
    max: float = float("-inf")
    hmax: float = 0.0
    pos: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    # compute_range's results by (method, symmetric, percentile): every quantize of a form asks again, and the
    # entropy search alone took 4.6 s for mobilenet_v2's 63 tensors each time. Cleared by update().
    ranges: dict[tuple[str, bool, float], tuple[float, float]] = field(default_factory=dict, repr=False,
                                                                        compare=False)

    def update(self, x: np.ndarray) -> None:
        import torch

        x = np.ascontiguousarray(x, np.float32).ravel()
        if x.size == 0:
            return
        self.ranges.clear()
        t = torch.from_numpy(x)
        lo_t, hi_t = torch.aminmax(t)
        lo, hi = float(lo_t), float(hi_t)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if self.hmax == 0.0:
            self.hmax = amax if amax > 0 else 1e-8
        while amax > self.hmax:
            # double the range: merge bins pairwise (exact)
            self.pos = np.concatenate([self.pos.reshape(-1, 2).sum(1), np.zeros(self.bins // 2)])
            self.neg = np.concatenate([self.neg.reshape(-1, 2).sum(1), np.zeros(self.bins // 2)])
            self.hmax *= 2.0
        # One histogram of 2B equal bins over [-hmax, hmax]: bins 0..B-1 hold negative values (by magnitude,
        # reversed), B..2B-1 positive ones, each bin [k, k+1) * hmax / B (a value at hmax goes to the last
        # bin). torch.histc counts in float32, exact only to 2^24 per bin: fed chunks of at most 2^24 values,
        # every count is exact whatever the thread count. 2.5x faster per update than numpy's floor + clip
        # + bincount, which were most of the calibration pass (1.8 billion values for mobilenet_v2 at 224 px).
        # Exact zeros (most of a post-ReLU tensor) are left out of the histograms: every range
        # represents zero exactly, so they carry no rounding or clipping error, and a zero spike in the
        # first bin drags entropy calibration to tiny thresholds.
        b = self.bins
        counts = np.zeros(2 * b, np.float64)
        for i in range(0, x.size, HISTC_CHUNK):
            counts += torch.histc(t[i:i + HISTC_CHUNK], bins=2 * b, min=-self.hmax, max=self.hmax).double().numpy()
        counts[b] -= np.count_nonzero(x == 0)
        self.pos += counts[b:]
        self.neg += counts[b - 1::-1]

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/minmax": np.array([self.min, self.max, self.hmax]), f"{prefix}/pos": self.pos,
                f"{prefix}/neg": self.neg}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "TensorStats":
        mm = arrays[f"{prefix}/minmax"]
        pos = arrays[f"{prefix}/pos"]
        return cls(len(pos), float(mm[0]), float(mm[1]), float(mm[2]), pos.copy(), arrays[f"{prefix}/neg"].copy())


# ------------------------------------------------------------------------------ threshold rules

def _edges(hmax: float, bins: int) -> np.ndarray:
    return np.linspace(0.0, hmax, bins + 1)


def threshold_percentile(hist: np.ndarray, hmax: float, percentile: float) -> float:
    total = hist.sum()
    if total == 0:
        return 0.0
    c = np.cumsum(hist) / total
    i = int(np.searchsorted(c, percentile / 100.0))
    return float(_edges(hmax, len(hist))[min(i + 1, len(hist))])


def threshold_mse(hist: np.ndarray, hmax: float, levels: int) -> float:
    """argmin_t of E[(x - q_t(x))^2]: rounding noise t^2/(12 levels^2) inside, clipping error outside."""
    n = len(hist)
    centers = (np.arange(n) + 0.5) * hmax / n
    cand = np.arange(1, n + 1) * hmax / n                      # thresholds at the upper bin edges
    c0 = np.cumsum(hist)                                       # counts with center <= cand[i]
    s0 = hist[::-1].cumsum()[::-1]                             # suffix sums from bin i
    s1 = (hist * centers)[::-1].cumsum()[::-1]
    s2 = (hist * centers ** 2)[::-1].cumsum()[::-1]
    # clipped part: bins i+1.. : sum h (c - t)^2 = s2 - 2 t s1 + t^2 s0
    nxt = np.arange(1, n + 1)
    S0 = np.append(s0, 0.0)[nxt]
    S1 = np.append(s1, 0.0)[nxt]
    S2 = np.append(s2, 0.0)[nxt]
    clip = S2 - 2 * cand * S1 + cand ** 2 * S0
    step = cand / levels
    err = c0 * step ** 2 / 12.0 + clip
    return float(cand[int(np.argmin(err))])


def threshold_entropy(hist: np.ndarray, hmax: float, levels: int = 128, stride: int = 4) -> float:
    """TensorRT's entropy calibration on a magnitude histogram."""
    n = len(hist)
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, n
    for i in range(levels, n + 1, stride):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()
        nz = ref > 0
        if not nz.any():
            continue
        # quantize the first i bins into `levels` groups, expand back over the non-empty bins
        idx = np.minimum((np.arange(i) * levels) // i, levels - 1)
        sums = np.bincount(idx, weights=hist[:i], minlength=levels)
        cnts = np.bincount(idx, weights=(hist[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(hist[:i] > 0, sums[idx] / np.maximum(cnts[idx], 1), 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q = q / qs
        mask = nz & (q > 0)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask]))) + (float(p[nz & (q == 0)].sum()) * 1e3)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i * hmax / n)


def compute_range(st: TensorStats, method: str, symmetric: bool, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) for one tensor. Symmetric: (-t, t). Asymmetric: a one-sided range for non-negative
    tensors (after ReLU), else the symmetric threshold clipped to the observed range. Remembered in ``st``
    until its next update."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choices: {', '.join(METHODS)}")
    key = (method, symmetric, float(percentile))
    if key not in st.ranges:
        st.ranges[key] = _compute_range(st, method, symmetric, percentile)
    return st.ranges[key]


def _compute_range(st: TensorStats, method: str, symmetric: bool, percentile: float) -> tuple[float, float]:
    if st.max == float("-inf"):
        return (0.0, 0.0)
    nonneg = st.min >= 0.0
    if method == "minmax":
        t = max(abs(st.min), abs(st.max))
        if symmetric:
            return (-t, t)
        return (min(st.min, 0.0), max(st.max, 0.0))
    hist = st.pos if (nonneg and not symmetric) else st.pos + st.neg
    levels = 255 if (nonneg and not symmetric) else 127
    if method == "percentile":
        t = threshold_percentile(hist, st.hmax, percentile)
    elif method == "mse":
        t = threshold_mse(hist, st.hmax, levels)
    else:
        t = threshold_entropy(hist, st.hmax, 128)
    t = max(t, 1e-8)
    if symmetric:
        return (-t, t)
    if nonneg:
        return (0.0, min(t, st.max) if st.max > 0 else t)
    return (max(st.min, -t), min(st.max, t))


def collect(onnx_model: Any, tensor_names: list[str], batches: Iterable[np.ndarray], threads: int | None = None,
            progress_task: Callable[[int], Any] | None = None) -> dict[str, TensorStats]:
    """Run the FP32 graph over ``batches`` with ``tensor_names`` exposed as outputs and stream their
    statistics (in a fixed order: the result does not depend on threads or timing)."""
    from tledge.export.ort import probe_session
    sess, input_name = probe_session(onnx_model, tensor_names, threads)
    stats = {n: TensorStats() for n in tensor_names}
    for x in batches:
        outs = sess.run(tensor_names, {input_name: x})
        for n, v in zip(tensor_names, outs):
            stats[n].update(v)
        if progress_task is not None:
            progress_task(len(x))
    return stats


def save_stats(path: Any, stats: dict[str, TensorStats], key: str) -> None:
    from tledge.fsutil import atomic_path

    arrays: dict[str, np.ndarray] = {"__key__": np.frombuffer(key.encode(), np.uint8)}
    names = sorted(stats)
    arrays["__names__"] = np.frombuffer("\n".join(names).encode(), np.uint8)
    for i, n in enumerate(names):
        arrays.update(stats[n].to_arrays(str(i)))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_stats(path: Any, key: str) -> dict[str, TensorStats] | None:
    """The cached statistics when ``path`` exists and was made with ``key``; else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    if bytes(arrays.get("__key__", np.zeros(0, np.uint8))).decode() != key:
        return None
    names = bytes(arrays["__names__"]).decode().split("\n")
    return {n: TensorStats.from_arrays(arrays, str(i)) for i, n in enumerate(names)}
