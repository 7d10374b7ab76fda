"""Graph pass: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.1).

For Conv -> [ReLU] -> Conv pairs, scale output channel i of the first by 1/s_i and input channel i of the
second by s_i, s_i = sqrt(r1_i / r2_i): per-channel weight ranges are equalized and the FP32 function is
unchanged (ReLU is positively homogeneous). Pairs joined by ReLU6/Clip are skipped: clip(s x, 0, 6) / s =
clip(x, 0, 6 / s) is another function (the paper replaces ReLU6 by ReLU; tledge does not change what the
user trained). BatchNorm is already folded into the convolutions by the exporter.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tledge.errors import AccuracyError
from tledge.export.config import ExportConfig
from tledge.export.graph import attr, consumers_of, copy_model
from tledge.export.int8.context import Int8Context
from tledge.export.int8.plan import PassRecord


def equalizable_pairs(model: Any) -> list[tuple[Any, Any, str]]:
    """(conv1, conv2, joint): conv1 (ungrouped) feeds only conv2, directly or through one ReLU, the cases
    where equalization is exact. conv2 may be ungrouped or depthwise."""
    inits = {i.name for i in model.graph.initializer}
    consumers = consumers_of(model)
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t, joint = n.output[0], "none"
        cons = consumers.get(t, [])
        if len(cons) == 1 and cons[0].op_type == "Relu":
            t, joint = cons[0].output[0], "relu"
            cons = consumers.get(t, [])
        if t in outputs or len(cons) != 1 or cons[0].op_type != "Conv" or cons[0].input[0] != t:
            continue
        nxt = cons[0]
        if nxt.input[1] not in inits:
            continue
        if attr(n, "group", 1) != 1:
            continue  # a grouped first conv would need its groups kept consistent; not needed for these models
        pairs.append((n, nxt, joint))
    return pairs


def equalize(model: Any, iterations: int = 2) -> tuple[Any, dict[str, Any]]:
    """Cross-layer equalization; returns the new model and a report (pairs equalized and skipped)."""
    from onnx import numpy_helper

    m = copy_model(model)
    inits = {i.name: i for i in m.graph.initializer}
    pairs = equalizable_pairs(m)
    for _ in range(iterations):
        for a, b, _joint in pairs:
            w1 = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
            w2 = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
            g2 = attr(b, "group", 1)
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
            if g2 == 1:
                r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
            elif g2 == w1.shape[0] and w2.shape[1] == 1:  # depthwise: one filter per channel
                r2 = np.abs(w2).reshape(w2.shape[0], -1).max(1)
            else:
                continue
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-12)), 1.0)
            w1 = w1 / s[:, None, None, None]
            if g2 == 1:
                w2 = w2 * s[None, :, None, None]
            else:
                w2 = w2 * s[:, None, None, None]
            inits[a.input[1]].CopyFrom(numpy_helper.from_array(w1.astype(np.float32), a.input[1]))
            inits[b.input[1]].CopyFrom(numpy_helper.from_array(w2.astype(np.float32), b.input[1]))
            if len(a.input) > 2 and a.input[2] in inits:
                b1 = numpy_helper.to_array(inits[a.input[2]]).astype(np.float64) / s
                inits[a.input[2]].CopyFrom(numpy_helper.from_array(b1.astype(np.float32), a.input[2]))
    return m, {"pairs": len(pairs), "skipped_relu6_pairs": clip_joined_pairs(m)}


def clip_joined_pairs(model: Any) -> int:
    """Conv -> Clip -> Conv pairs (ReLU6), which equalization leaves alone."""
    consumers = consumers_of(model)
    count = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            c = consumers.get(n.output[0], [])
            if len(c) == 1 and c[0].op_type == "Clip":
                c2 = consumers.get(c[0].output[0], [])
                count += int(len(c2) == 1 and c2[0].op_type == "Conv")
    return count


class Equalize:
    name = "cle"

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        return (True, "exact, cheap") if cfg.quant.cle else (False, "--no-cle")

    def run(self, ctx: Int8Context) -> PassRecord:
        eq, info = equalize(ctx.base)
        diff, same = ctx.fp32_diff(eq)
        if not same:
            raise AccuracyError(f"internal error: cross-layer equalization changed the FP32 outputs by {diff:.3g}.",
                                "export with --no-cle and report this bug.")
        ctx.base = eq
        return PassRecord(self.name, "graph", f"{info['pairs']} conv pairs equalized",
                          f"{info['skipped_relu6_pairs']} pairs joined by ReLU6 left alone; FP32 unchanged "
                          f"(max |logit diff| {diff:.1e})", details={**info, "fp32_max_abs_logit_diff": diff})
