"""A set of images preprocessed once (with the model card's recipe) and reused by every runner that is
checked or benchmarked on it, so the comparison sees identical input tensors.

The set keeps the fitted 0-255 pixels (uint8, a quarter of the float tensor's size) and finishes each
batch for the graph that reads it: normalised for the PyTorch model and the usual graphs, raw for a graph
exported with ``--input raw`` (Preprocess.finish; the same float32 operations as the per-image path)."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from tledge.console import progress
from tledge.data import Sample
from tledge.fsutil import scratch_dir
from tledge.preprocess import Preprocess


class EvalSet:
    """Fitted pixels (uint8 NCHW, in a temporary memory-mapped file) and their labels."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocess, workers: int = 2, label: str = "preprocess") -> None:
        from torch.utils.data import DataLoader

        from tledge.features import ImageDataset

        self.samples = list(samples)
        self.pre = pre
        self.labels = np.array([s.label for s in self.samples], np.int64)
        self._dir = scratch_dir("tledge-eval")
        shape = (len(self.samples), *pre.input_shape)
        self.x = np.lib.format.open_memmap(os.path.join(self._dir.name, "x.npy"), mode="w+", dtype=np.uint8,
                                           shape=shape) if self.samples else np.zeros(shape, np.uint8)
        self.ok = np.ones(len(self.samples), bool)
        loader = DataLoader(ImageDataset(self.samples, pre, pixels=True), batch_size=64, num_workers=workers)
        with progress() as prog:
            task = prog.add_task(label, total=len(self.samples), info="")
            for xb, _, idx, ok in loader:
                self.x[idx.numpy()] = xb.numpy()
                self.ok[idx.numpy()] = ok.numpy()
                prog.advance(task, len(idx))

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch: int, pre: Preprocess | None = None) -> Iterator[np.ndarray]:
        """Input tensors in order, finished by ``pre`` (default: the set's own recipe, normalised)."""
        finish = (pre or self.pre).finish
        for i in range(0, len(self.samples), batch):
            yield finish(np.asarray(self.x[i:i + batch]))

    def first(self, n: int, pre: Preprocess | None = None) -> np.ndarray:
        """A batch of exactly ``n`` inputs (the set repeated when smaller), for latency measurement."""
        x = np.asarray(self.x[: min(n, len(self))])
        x = np.concatenate([x] * -(-n // len(x)))[:n]
        return (pre or self.pre).finish(x)

    def close(self) -> None:
        self.x = np.zeros((0,), np.uint8)
        self._dir.cleanup()

    def __enter__(self) -> "EvalSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_logits(infer, evalset: EvalSet, batch: int = 32, pre: Preprocess | None = None) -> np.ndarray:
    """Logits of ``infer`` (a callable on NCHW batches, finished by ``pre``) over the whole set."""
    out = [np.asarray(infer(x), np.float32) for x in evalset.batches(batch, pre)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def compare(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 of both, agreement of top-1 predictions and max absolute logit difference."""
    top1 = float((logits.argmax(1) == labels).mean())
    ref_top1 = float((ref.argmax(1) == labels).mean())
    return {"n": int(len(labels)), "top1": top1, "ref_top1": ref_top1,
            "drop_points": round((ref_top1 - top1) * 100, 4),
            "top1_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - ref).max()) if len(ref) else 0.0}
