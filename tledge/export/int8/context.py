"""The INT8 context and per-form state that every pass reads and writes.

``Int8Context`` owns what all passes share: the FP32 graph the forms start from (``base``, set by the
graph-wide passes), the calibration statistics, the judge images (calibration images held out of every
fit) with their FP32 logits, the fit images, and one ``score()`` (logit MSE and top-1 agreement against FP32)
that every decision uses.
``FormState`` is one form's recipe: its FP32 graph (bias-corrected, head re-fitted), range method, weight
rounding and quantizers kept in float; ``quantized()`` turns it into the Q/DQ graph.

Determinism: decisions depend on images, counts and fixed seeds only. torch work runs on a fixed
TORCH_THREADS threads (``torch_threads``), whatever ``--threads`` says or the machine has: every reduction is
then partitioned the same way, so the learned values do not depend on either.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from tledge.export import ort
from tledge.export.config import ExportConfig
from tledge.export.int8.calibrate import TensorStats
from tledge.export.int8.quantize import quantize_model


# torch threads inside the INT8 passes. Fixed, not --threads: 1 and 2 threads give different float sums (measured
# 1.5e-8 apart in QAT weights after 8 steps, enough to flip a rounding). 2, not 1: learned rounding runs 1.5x
# faster on 2 cores (demo, 16 layers x 200 iterations: 57 s -> 37 s), and a 1-core machine still gets the same
# numbers, only slower.
TORCH_THREADS = 2


@contextlib.contextmanager
def torch_threads(n: int = TORCH_THREADS) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block: a fixed reduction order, so learned values do not
    depend on the machine's core count or the user's --threads."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class FormState:
    """One INT8 form's recipe, built up pass by pass."""

    form: str
    model: Any                                   # FP32 graph for this form (bias correction, head refit applied)
    method: str = "minmax"                       # activation range rule
    rounding: dict[str, np.ndarray] = field(default_factory=dict)   # learned weight rounding (empty: nearest)
    rounding_name: str = "nearest"
    float_tensors: tuple[str, ...] = ()          # activation quantizers the gate removed
    act_qparams: dict[str, tuple[float, int]] = field(default_factory=dict)  # learned (scale, zero-point) (QAT)
    stage: str = "cheap"                         # the recipe being built: cheap | expensive (what --replay looks up)
    centre: str | None = None                    # centring of symmetric quantizers (None: --centre; QAT sets "off")

    def input_key(self) -> tuple[str, str, str, str, tuple[str, ...], str | None]:
        """What a pass's result depends on (form, ranges, rounding, graph, quantizers kept in float, centring):
        passes that see the same key again reuse their earlier result."""
        import hashlib
        return (self.form, self.method, self.rounding_name,
                hashlib.sha256(self.model.SerializeToString(deterministic=True)).hexdigest(), self.float_tensors,
                self.centre)

    def copy(self, **changes: Any) -> "FormState":
        d = {**self.__dict__, **changes}
        return FormState(**d)


@dataclass
class Int8Context:
    cfg: ExportConfig
    base: Any                                    # FP32 graph the forms start from
    judge: np.ndarray                            # held-out calibration images: they only judge candidates
    fit: np.ndarray                              # calibration images fits learn on (disjoint from judge)
    calib_batches: list[np.ndarray]              # every calibration image, in fixed batches (statistics)
    card: dict[str, Any]
    train_samples: list[Any]                     # the training split (head refit), never val
    run: Any = None                              # the run directory (statistics cache under run/calib)
    calib_ids: list[str] = field(default_factory=list)    # SHA-256 of each calibration image (cache key)
    stats: dict[str, TensorStats] | None = None
    judge_ref: np.ndarray | None = None          # FP32 logits of ``base`` on the judge images
    cache: dict[str, Any] = field(default_factory=dict)   # results shared across forms (learned rounding ...)
    replay: Any = None                           # int8.replay.Replay: decisions taken from an earlier export

    def replayed(self, form: str) -> Any:
        """The recorded decisions of ``form`` when replaying (--replay), else None."""
        return self.replay.forms[form] if self.replay is not None else None

    @property
    def threads(self) -> int | None:
        return self.cfg.threads

    def fit_subset(self, n: int) -> np.ndarray:
        """``n`` of the fit images, spread evenly over them (every k-th). Not the first ``n``: calibration
        folders are read in sorted order, class by class, and the first 64 of the demo's fit images held
        5 of its 10 classes."""
        if n >= len(self.fit):
            return np.ascontiguousarray(self.fit)
        idx = np.unique(np.linspace(0, len(self.fit) - 1, n).round().astype(int))
        return np.ascontiguousarray(self.fit[idx])

    def judge_batches(self, size: int = 32) -> list[np.ndarray]:
        return [np.ascontiguousarray(self.judge[i:i + size]) for i in range(0, len(self.judge), size)]

    def judge_ref_batches(self, size: int = 32) -> list[np.ndarray]:
        """The FP32 logits of the judge images, in the batches of ``judge_batches(size)``."""
        return [self.judge_ref[i:i + size] for i in range(0, len(self.judge), size)]

    def logits(self, model: Any, x: np.ndarray | None = None) -> np.ndarray:
        batches = self.judge_batches() if x is None else [np.ascontiguousarray(x[i:i + 32])
                                                          for i in range(0, len(x), 32)]
        return ort.logits(model, batches, self.threads)

    def set_reference(self) -> None:
        self.judge_ref = self.logits(self.base)

    def quantize(self, state: FormState, float_weights: bool = False, **changes: Any) -> Any:
        s = state.copy(**changes) if changes else state
        if self.stats is None:
            raise RuntimeError("calibration statistics are needed before quantizing")
        return quantize_model(s.model, self.stats, s.form, s.method, self.cfg.calib.percentile,
                              weight_overrides=s.rounding or None, exclude_tensors=set(s.float_tensors),
                              act_overrides=s.act_qparams or None, float_weights=float_weights,
                              centre=self.centre_of(s))

    def centre_of(self, state: FormState) -> str:
        """The centring of ``state``'s symmetric quantizers (off | exact | padded): its own when set (the plan sets
        it under --centre auto; QAT with learned scales trains the uncentred graph), else --centre (auto, not
        chosen by the plan: exact)."""
        c = state.centre if state.centre is not None else self.cfg.quant.centre
        return "exact" if c == "auto" else c

    def weight_bound(self, state: FormState) -> dict[str, float]:
        """``score`` of ``state`` with its activations quantized and every weight left in FP32: learned
        rounding's ideal (it reconstructs each layer's FP32 output), run with onnxruntime's optimizations off.
        Not a bound on every rounding: at 64 px, nearest rounding's TensorRT form came closer to FP32 than it."""
        return self.score(self.quantize(state, float_weights=True), optimize=False)

    def score(self, model: Any, optimize: bool = True) -> dict[str, float]:
        """How far ``model``'s logits are from FP32 on the judge images: mean squared difference and top-1
        agreement (the one measure every pass and the plan decide by). ``optimize=False``: onnxruntime runs
        the graph as written (for graphs its optimizations would change, e.g. float weights)."""
        z = ort.logits(model, self.judge_batches(), self.threads, optimize=optimize)
        ref = self.judge_ref
        return {"mse": float(np.mean((z - ref) ** 2)), "agreement": float((z.argmax(1) == ref.argmax(1)).mean())}

    def fp32_diff(self, model: Any) -> tuple[float, bool]:
        """Max |logit diff| of a transformed FP32 graph against ``base`` on the judge images, and whether it
        is within float tolerance."""
        d = float(np.abs(self.logits(model) - self.judge_ref).max())
        return d, d <= 1e-4 * max(1.0, float(np.abs(self.judge_ref).max()))
