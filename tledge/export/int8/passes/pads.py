"""Graph pass (``--centre padded``, ``auto``): the zero padding of a convolution that reads a ReLU6 output becomes a Pad
node of its own in front of the quantizer, Clip -> Pad(0) -> [Q/DQ] -> Conv(no padding), the shape
EfficientNet-Lite's exported graph already has. The FP32 function is unchanged (checked, else not kept).

Centring (quantize.centred_tensors) then moves the quantizer of that input to the middle of its range and lets
the Pad pad with -s instead of 0, with the convolution still reading its DequantizeLinear directly (the pattern
TensorRT fuses into an INT8 convolution). Wherever the Pad would still pad with 0 (the CPU form, which has a
zero-point; a quantizer the gate keeps in float) quantize_model gives the padding back to the convolution.
mobilenet_v2's depthwise convolutions pad themselves: without this pass their inputs (17 of the TensorRT form's
63 activation quantizers) stay on 7 useful bits.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tledge.console import warn
from tledge.export.config import ExportConfig
from tledge.export.graph import consumers_of, copy_model
from tledge.export.int8.context import Int8Context
from tledge.export.int8.plan import PassRecord


def _relu6_output(model: Any, t: str, producer: dict[str, Any], consumers: dict[str, list[Any]]) -> bool:
    """``t`` is the output of a Clip(0, c) that a Conv alone feeds (what centring can move)."""
    from tledge.export.int8.quantize import _const
    act = producer.get(t)
    if act is None or act.op_type != "Clip" or len(act.input) < 2 or _const(model, act.input[1]) != 0.0:
        return False
    p = producer.get(act.input[0])
    return p is not None and p.op_type == "Conv" and len(consumers.get(act.input[0], [])) == 1


def pad_explicitly(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` in which every 2-D Conv with explicit non-zero pads that is the only reader of a
    ReLU6 output reads it through a constant-zero Pad node instead (its own pads set to 0); and the names of
    those Convs, in graph order."""
    from onnx import helper, numpy_helper

    from tledge.export.int8.quantize import PAD_SUFFIX, _explicit_pads, ensure_node_names
    m = ensure_node_names(copy_model(model))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = consumers_of(m)
    outputs = {o.name for o in g.output}
    done: list[str] = []
    for c in list(g.node):
        if c.op_type != "Conv" or not c.input or c.input[0] in outputs:
            continue
        pads = _explicit_pads(c)
        t = c.input[0]
        if (pads is None or not any(pads) or len(consumers.get(t, [])) != 1
                or not _relu6_output(m, t, producer, consumers)):
            continue
        g.initializer.append(numpy_helper.from_array(
            np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), f"{c.name}__centre_pads"))
        pad = helper.make_node("Pad", [t, f"{c.name}__centre_pads"], [f"{c.name}__centre_padded"],
                               name=f"{c.name}{PAD_SUFFIX}", mode="constant")
        c.input[0] = pad.output[0]
        for a in c.attribute:
            if a.name == "pads":
                del a.ints[:]
                a.ints.extend([0, 0, 0, 0])
        g.node.insert(list(g.node).index(c), pad)
        done.append(c.name)
    del g.value_info[:]
    return m, done


class ExplicitPads:
    name = "pads"

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        if cfg.quant.centre not in ("padded", "auto"):
            return False, f"--centre {cfg.quant.centre}"
        if "tensorrt" not in cfg.quant.forms:
            return False, "no TensorRT form (the CPU form has a zero-point: nothing to centre)"
        return True, f"--centre {cfg.quant.centre}" + (" (padded is the second cheap recipe when exact misses "
                                                       "the target; exact and the CPU form pad in their "
                                                       "convolutions)" if cfg.quant.centre == "auto" else "")

    def run(self, ctx: Int8Context) -> PassRecord:
        padded, convs = pad_explicitly(ctx.base)
        if not convs:
            return PassRecord(self.name, "graph", "no convolution pads a ReLU6 output itself",
                              details={"pad_nodes": 0})
        diff, same = ctx.fp32_diff(padded)
        if not same:  # Pad(0) + Conv(no pads) is Conv(pads): a difference means a bug, not rounding
            warn(f"--centre padded: the explicit Pad nodes changed the FP32 outputs (max |logit diff| {diff:.3g}); "
                 "quantizing without them (the padded convolutions' inputs stay uncentred). Please report this.")
            return PassRecord(self.name, "graph", "not applied", f"FP32 logits moved by {diff:.3g}",
                              details={"pad_nodes": 0, "fp32_max_abs_logit_diff": diff})
        ctx.base = padded
        return PassRecord(self.name, "graph", f"{len(convs)} Pad nodes in front of the quantizers of padded "
                          "convolutions' ReLU6 inputs", details={"pad_nodes": len(convs), "convs": convs,
                                                                 "fp32_max_abs_logit_diff": diff})
