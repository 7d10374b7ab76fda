"""ONNX graph helpers shared by the export passes (public names; no pass imports another's privates)."""
from __future__ import annotations

from typing import Any


def copy_model(model: Any) -> Any:
    import onnx
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def attr(node: Any, name: str, default: Any) -> Any:
    """An INT or INTS attribute of ``node``, else ``default``."""
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else list(a.ints)
    return default


def consumers_of(model: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it (a node reading a tensor twice is listed twice)."""
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def weighted_nodes(model: Any) -> list[Any]:
    """Conv/Gemm nodes whose weight and bias are initializers (the layers the passes adjust)."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2
            and n.input[1] in inits and n.input[2] in inits]
