"""FP16 graphs: weights and computation in half precision, input and output kept FP32.

The graph casts its FP32 input to FP16 first and its FP16 logits back to FP32, so callers feed and read
FP32 as for the FP32 graph. TensorRT builds such a graph as an FP16 engine (strongly typed on 10.x/11.x);
onnxruntime's CPU provider runs it too (it inserts casts around kernels it lacks in FP16), which is how
its accuracy is checked here.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FP16_MAX = 65504.0


def to_fp16(fp32: Any) -> tuple[Any, dict[str, Any]]:
    """Convert; returns the model and a report (how many weights were clipped to the FP16 range)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(fp32)
    g = m.graph
    clipped = 0
    new_inits = []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(init)
            clipped += int(np.sum(np.abs(a) > FP16_MAX))
            new_inits.append(numpy_helper.from_array(np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16), init.name))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    inp, out = g.input[0].name, g.output[0].name
    half_in, half_out = f"{inp}__fp16", f"{out}__fp16"
    for n in g.node:
        for k, i in enumerate(n.input):
            if i == inp:
                n.input[k] = half_in
        for k, o in enumerate(n.output):
            if o == out:
                n.output[k] = half_out
    nodes = [helper.make_node("Cast", [inp], [half_in], name="input_to_fp16", to=TensorProto.FLOAT16)]
    nodes += list(g.node)
    nodes.append(helper.make_node("Cast", [half_out], [out], name="logits_to_fp32", to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(m)
    return m, {"weights_clipped_to_fp16_range": clipped}
