"""One onnxruntime helper for the export: CPU sessions of in-memory graphs, logits, and probe sessions
that expose intermediate tensors."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def session(model: Any, threads: int | None = None, optimize: bool = True) -> Any:
    """A CPU session of an in-memory ONNX graph. ``optimize=False`` keeps the graph as it is, so that no
    probed tensor is fused away."""
    import onnxruntime as ort

    from tledge.runtimes.onnxruntime import session_options
    so = session_options(threads)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def logits(model: Any, batches: Iterable[np.ndarray], threads: int | None = None,
           advance: Any = None, optimize: bool = True) -> np.ndarray:
    """The graph's first output over ``batches``, concatenated. ``advance(n)`` is called per batch.
    ``optimize=False`` runs the graph as written (every Q/DQ pair computed in float, no fused INT8 kernels)."""
    sess = session(model, threads, optimize)
    name = sess.get_inputs()[0].name
    out = []
    for b in batches:
        out.append(sess.run(None, {name: b})[0])
        if advance is not None:
            advance(len(b))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def probe_session(onnx_model: Any, tensor_names: Iterable[str], threads: int | None = None,
                  optimize: bool = False) -> tuple[Any, str]:
    """A session of a copy of ``onnx_model`` with ``tensor_names`` added as outputs, and its input name."""
    import onnx

    from tledge.export.graph import copy_model
    m = copy_model(onnx_model)
    have = {o.name for o in m.graph.output}
    for name in tensor_names:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    sess = session(m, threads, optimize)
    return sess, sess.get_inputs()[0].name
