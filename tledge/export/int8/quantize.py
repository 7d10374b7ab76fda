"""INT8 Q/DQ graphs in two forms, from an FP32 ONNX graph and calibration statistics.

``tensorrt`` form (explicit quantization as TensorRT 8.5-11 builds it): QuantizeLinear/DequantizeLinear
on the inputs of Conv, Gemm/MatMul and Add; signed INT8, zero-point 0 everywhere, per-tensor
activation scales, per-channel weight scales on the output-channel axis, float bias (TensorRT fuses the
pairs into INT8 kernels; NVIDIA TensorRT developer guide, "Explicit Quantization").

``cpu`` form (onnxruntime's CPU kernels): unsigned asymmetric activations, signed symmetric per-channel
weights, int32 bias, and a Q/DQ pair also on the outputs of quantized operators, so onnxruntime fuses
DQ -> Conv -> (Relu|Clip) -> Q into QLinearConv (as onnxruntime's own QDQ quantizer lays them out).

Layers named in ``exclude`` stay in floating point (the accuracy gate's fallback).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tledge.export.config import GRAPH_CENTRE_MODES
from tledge.export.graph import consumers_of, copy_model
from tledge.export.int8.calibrate import TensorStats, compute_range

WEIGHTED = {"Conv", "Gemm", "MatMul"}
ACT_OPS_BOTH = {"Add"}
CPU_EXTRA = {"GlobalAveragePool", "AveragePool", "MaxPool"}
PASS_THROUGH_ACT = {"Relu", "Clip"}


@dataclass(frozen=True)
class Form:
    name: str
    signed: bool                 # int8 (True) or uint8 (False) activations
    symmetric: bool
    quantize_outputs: bool
    quantize_bias: bool
    extra_ops: frozenset[str] = frozenset()


FORMS = {
    "tensorrt": Form("tensorrt", signed=True, symmetric=True, quantize_outputs=False, quantize_bias=False),
    "cpu": Form("cpu", signed=False, symmetric=False, quantize_outputs=True, quantize_bias=True,
                extra_ops=frozenset(CPU_EXTRA)),
}


def _onnx() -> Any:
    import onnx
    return onnx


def quantizable_nodes(model: Any, form: Form) -> list[str]:
    """Names of the nodes the form quantizes (weighted ops with initializer weights, Adds of two
    activations, and for the CPU form pooling)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits:
            out.append(n.name)
        elif n.op_type in ACT_OPS_BOTH and all(i not in inits for i in n.input):
            out.append(n.name)
        elif n.op_type in form.extra_ops:
            out.append(n.name)
    return out


def ensure_node_names(model: Any) -> Any:
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return model


def activation_tensors(model: Any) -> list[str]:
    """Every float activation tensor (graph input and node outputs), the candidates for calibration."""
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for n in model.graph.node:
        names += [o for o in n.output if o]
    return names


def _act_qparams(st: TensorStats, form: Form, method: str, percentile: float) -> tuple[float, int]:
    lo, hi = compute_range(st, method, form.symmetric, percentile)
    if form.symmetric:
        t = max(abs(lo), abs(hi), 1e-8)
        return t / 127.0, 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return scale, zp


def weight_scales(w: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel symmetric scales (narrow range, +-127) along ``axis``."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red) if red else np.abs(w)
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def per_channel(s: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-channel scales ``s`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional weight."""
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape)


def quantize_weight(w: np.ndarray, axis: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    s = weight_scales(w, axis) if scales is None else scales
    q = np.clip(np.round(w / per_channel(s, w.ndim, axis)), -127, 127).astype(np.int8)
    return q, s


def weight_axis(node: Any) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0  # Conv: (out, in/groups, kh, kw)


def _quantizer_sites(model: Any, form: Form, qnodes: set[str], exclude_tensors: frozenset[str] | set[str],
                     ) -> dict[str, list[tuple[Any, int]]]:
    """Activation tensor -> the (consumer node, input index) pairs that read it through a Q/DQ pair."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    graph_outputs = {o.name for o in g.output}
    wants: dict[str, list[tuple[Any, int]]] = {}
    for n in g.node:
        if n.name not in qnodes:
            continue
        idxs = [0] if n.op_type in WEIGHTED or n.op_type in form.extra_ops else range(len(n.input))
        for k in idxs:
            t = n.input[k]
            if t and t not in inits:
                wants.setdefault(t, []).append((n, k))
    for t in exclude_tensors:
        wants.pop(t, None)
    if form.quantize_outputs:
        for n in g.node:
            if n.name not in qnodes:
                continue
            t = n.output[0]
            cons = consumers.get(t, [])
            if len(cons) == 1 and cons[0][0].op_type in PASS_THROUGH_ACT:
                t = cons[0][0].output[0]
            if t in graph_outputs or t in exclude_tensors:
                continue
            for c in consumers.get(t, []):
                if (c[0], c[1]) not in [(x[0], x[1]) for x in wants.get(t, [])]:
                    wants.setdefault(t, []).append(c)
    return wants


OFFSETS_KEY = "tledge.centred_offsets"
PAD_SUFFIX = "__CentrePad"   # the Pad the ``pads`` graph pass put in front of <conv>'s quantizer: "<conv>__CentrePad"


def centre_pad_nodes(model: Any) -> list[Any]:
    """The Pad nodes the ``pads`` graph pass put into ``model`` (named "<conv>" + PAD_SUFFIX)."""
    return [n for n in model.graph.node if n.op_type == "Pad" and n.name.endswith(PAD_SUFFIX)]


def _const(model: Any, name: str) -> float | None:
    """The scalar value of initializer ``name``, else None."""
    from onnx import numpy_helper
    for i in model.graph.initializer:
        if i.name == name:
            v = numpy_helper.to_array(i)
            return float(v) if v.size == 1 else None
    return None


def _zero_padded(node: Any) -> bool:
    """A Conv that reads no padding (a constant added to its input is a constant added to its output)."""
    for a in node.attribute:
        if a.name == "pads" and any(a.ints):
            return False
        if a.name == "auto_pad" and a.s not in (b"", b"NOTSET", b"VALID"):
            return False
    return True


def centred_tensors(model: Any, form: Form, qnodes: set[str], wants: dict[str, list[tuple[Any, int]]],
                    stats: dict[str, TensorStats], skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """The quantized tensors whose symmetric quantizer can be centred on their range with the network's function
    unchanged: the non-negative output ``t`` of a Clip(0, c) (ReLU6) fed by a Conv that it alone reads, and read
    only through its Q/DQ pair by quantized Convs at input 0 that do not pad; or the output of a constant zero
    Pad of such a Clip output (the exporter's own padding, EfficientNet-Lite's, or the one the ``pads`` graph pass
    puts there for --centre padded), which then pads with -s: centred with no node added.

    A symmetric INT8 quantizer of a non-negative tensor uses 128 of its 255 levels (TensorRT's form has no
    zero-point): the ReLU6 outputs of mobilenet_v2 have 7 useful bits, the largest error source of that form
    (benchmarks/int8_error_sources.py). Centred, ``t - s`` is quantized instead, s = half the calibrated range,
    scale s / 127: all 255 levels, and 0 maps to -127 exactly. The producer's bias and the Clip's bounds take -s;
    each reader's bias takes + s * (sum of the weights it computes with), and a Pad in between pads with -s, so
    the graph computes what it did. Values: placeholders for s.
    ``skip``: tensors not to centre (learned scales of the uncentred form)."""
    if not form.symmetric:
        return {}
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = consumers_of(model)
    outputs = {o.name for o in model.graph.output}
    out: dict[str, float] = {}
    for t, cons in wants.items():
        st = stats.get(t)
        act = producer.get(t)
        if t in skip or st is None or not (st.min >= 0.0 < st.max) or act is None or t in outputs:
            continue
        if act.op_type == "Pad":
            # the exporter's own zero padding between the Clip and its reader (EfficientNet-Lite's "same"
            # padding): it pads with -s instead, no node added; the Clip output may also feed Shape nodes
            pad, act = act, producer.get(act.input[0])
            if (not _zero_pad_node(model, pad) or act is None or act.output[0] in outputs
                    or any(c is not pad and c.op_type != "Shape" for c in consumers.get(act.output[0], []))):
                continue
        if act.op_type != "Clip" or len(act.input) < 2 or _const(model, act.input[1]) != 0.0:
            continue
        if len(act.input) > 2 and act.input[2] and _const(model, act.input[2]) is None:
            continue
        p = producer.get(act.input[0])
        if (p is None or not _conv_with_bias(p, inits) or len(consumers.get(act.input[0], [])) != 1
                or act.input[0] in outputs):
            continue
        if len(consumers.get(t, [])) != len(cons):
            continue  # something reads the tensor without its quantizer
        if all(_conv_with_bias(c, inits) and c.name in qnodes and k == 0
               and _zero_padded(c) for c, k in cons):
            out[t] = 0.0
    return out


def _zero_pad_node(model: Any, node: Any) -> bool:
    """A Pad node in constant mode padding with 0 (its value input absent or a zero initializer)."""
    for a in node.attribute:
        if a.name == "mode" and a.s not in (b"", b"constant"):
            return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    return _const(model, node.input[2]) == 0.0


def _conv_with_bias(node: Any, inits: set[str]) -> bool:
    """A Conv whose weight and bias are initializers (what centring moves constants between)."""
    return node.op_type == "Conv" and len(node.input) > 2 and node.input[1] in inits and node.input[2] in inits


def _explicit_pads(node: Any) -> list[int] | None:
    """A 2-D Conv's explicit pads [top, left, bottom, right], or None (auto_pad, or not 2-D)."""
    for a in node.attribute:
        if a.name == "auto_pad" and a.s not in (b"", b"NOTSET"):
            return None
    for a in node.attribute:
        if a.name == "pads":
            return list(a.ints) if len(a.ints) == 4 else None
    return [0, 0, 0, 0]


def _add_to_bias(model: Any, node: Any, delta: np.ndarray, tag: str) -> Any:
    """A new initializer holding ``node``'s bias + ``delta``, wired into ``node`` in place of its bias."""
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    name = f"{node.input[2]}__{node.name}__{tag}"
    node.input[2] = name
    return numpy_helper.from_array((b + delta).astype(np.float32), name)


def _apply_shifts(model: Any, shifted: dict[str, float], wants: dict[str, list[tuple[Any, int]]],
                  read_weights: dict[str, np.ndarray], producer: dict[str, Any]) -> None:
    """Rewrite ``model`` in place for the centred quantizers of ``centred_tensors`` (offsets s filled in)."""
    from onnx import numpy_helper
    g = model.graph
    for t, s in shifted.items():
        act = producer[t]
        if act.op_type == "Pad":  # the exporter's zero padding (centred_tensors): pads with -s instead
            g.initializer.append(numpy_helper.from_array(np.array(-s, np.float32), f"{t}__centre_pad_value"))
            while len(act.input) < 3:
                act.input.append("")
            act.input[2] = f"{t}__centre_pad_value"
            act = producer[act.input[0]]
        p = producer[act.input[0]]
        g.initializer.append(_add_to_bias(model, p, np.float64(-s), "centre"))
        g.initializer.append(numpy_helper.from_array(np.array(-s, np.float32), f"{t}__centre_min"))
        act.input[1] = f"{t}__centre_min"
        if len(act.input) > 2 and act.input[2]:
            g.initializer.append(numpy_helper.from_array(np.array(_const(model, act.input[2]) - s, np.float32),
                                                         f"{t}__centre_max"))
            act.input[2] = f"{t}__centre_max"
        for c, _ in wants[t]:
            w = read_weights[c.name].astype(np.float64)
            red = tuple(range(1, w.ndim))  # Conv weights: (out, in/groups, kh, kw)
            g.initializer.append(_add_to_bias(model, c, s * w.sum(axis=red), "uncentre"))


def _fold_zero_pads(model: Any) -> None:
    """Give the padding of the ``pads`` graph pass back to its convolution wherever the Pad pads with 0 and reads
    the Clip directly: in the CPU form (which has a zero-point: nothing to centre) and with centring off or exact
    before the quantizers are placed, and after centring for a quantizer the gate keeps in float. There the Pad
    only costs time: with it, onnxruntime ran the CPU form 1.25-1.36x slower (benchmarks/centre_pads_latency.py).
    The Pad's readers read the Clip's output again, so the graph, its quantizer names and their statistics (of the
    unpadded tensor) are those of the graph without the pass."""
    from onnx import numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    convs = {n.name: n for n in g.node if n.op_type == "Conv"}
    producer = {o: n for n in g.node for o in n.output}
    drop = []
    for pad in centre_pad_nodes(model):
        if len(pad.input) > 2 and pad.input[2]:  # pads with a value (centred): not ours to give back
            continue
        conv, clip = convs.get(pad.name[: -len(PAD_SUFFIX)]), producer.get(pad.input[0])
        if conv is None or clip is None or clip.op_type != "Clip" or pad.input[1] not in inits:
            continue
        p = [int(v) for v in numpy_helper.to_array(inits[pad.input[1]])]   # [0, 0, t, l, 0, 0, b, r]
        for a in conv.attribute:
            if a.name == "pads":
                del a.ints[:]
                a.ints.extend([p[2], p[3], p[6], p[7]])
        for n in g.node:
            n.input[:] = [pad.input[0] if i == pad.output[0] else i for i in n.input]
        drop.append(pad)
    for pad in drop:
        g.node.remove(pad)
    used = {i for n in g.node for i in n.input}
    for pad in drop:  # its pads initializer too, once nothing reads it (onnxruntime warns of unused ones)
        if pad.input[1] not in used and pad.input[1] in inits:
            g.initializer.remove(inits[pad.input[1]])


def without_centre_pads(model: Any) -> Any:
    """A copy of ``model`` with the ``pads`` graph pass's zero Pads given back to their convolutions: the graph
    the pass started from (the same function, node for node)."""
    m = copy_model(model)
    _fold_zero_pads(m)
    return m


def _set_offsets(model: Any, shifted: dict[str, float], producer: dict[str, Any]) -> None:
    """Record, in ``model``'s metadata, the offset each centred tensor (and its producing Conv's output) now holds:
    the graph's value of that tensor is FP32's minus the offset."""
    import json
    offsets = {}
    for t, s in shifted.items():
        offsets[t] = s
        node = producer[t]
        while node.op_type in ("Pad", "Clip"):  # back to the producing Conv: [Conv ->] Clip [-> Pad] -> t
            offsets[node.input[0]] = s
            node = producer[node.input[0]]
    entry = model.metadata_props.add()
    entry.key, entry.value = OFFSETS_KEY, json.dumps(offsets, sort_keys=True)


def centred_offsets(q: Any) -> dict[str, float]:
    """Tensor -> offset of a graph made by ``quantize_model(centre=...)``: the tensor holds FP32's value minus the
    offset (empty for an uncentred graph)."""
    import json
    for p in q.metadata_props:
        if p.key == OFFSETS_KEY:
            return {k: float(v) for k, v in json.loads(p.value).items()}
    return {}


def quantized_tensors(model: Any, form_name: str) -> list[str]:
    """The activation tensors the form can put a quantizer on (the ones calibration needs statistics for): for a
    graph with the ``pads`` pass's Pad nodes, those of the padded graph (padded centring) and of the graph with
    the padding given back (off, exact, the CPU form), each once."""
    form = FORMS[form_name]
    m = ensure_node_names(copy_model(model))
    folded = without_centre_pads(m)  # as quantize_model does for the CPU form and for centring off or exact
    sites = [] if not form.symmetric else list(_quantizer_sites(m, form, set(quantizable_nodes(m, form)), frozenset()))
    return list(dict.fromkeys(sites + list(_quantizer_sites(folded, form, set(quantizable_nodes(folded, form)),
                                                            frozenset()))))


def quantize_model(fp32: Any, stats: dict[str, TensorStats], form_name: str, method: str,
                   percentile: float = 99.99, exclude: frozenset[str] | set[str] = frozenset(),
                   weight_overrides: dict[str, np.ndarray] | None = None,
                   exclude_tensors: frozenset[str] | set[str] = frozenset(),
                   act_overrides: dict[str, tuple[float, int]] | None = None, float_weights: bool = False,
                   centre: str = "off") -> Any:
    """A Q/DQ copy of ``fp32`` in the given form. ``weight_overrides`` maps a weight initializer name to
    its already-rounded INT8 values (learned rounding); scales stay the per-channel max rule. Nodes in
    ``exclude`` stay float entirely; activation tensors in ``exclude_tensors`` get no quantizer (their
    consumers read them in float), which is what the accuracy gate keeps in float. ``act_overrides`` maps an
    activation tensor to its (scale, zero-point) when they were learned (QAT with learned scales).
    ``float_weights``: quantize the activations only (weights and biases stay FP32): learned rounding's
    ideal, whose layer-by-layer target is the FP32 output. Run such a graph with onnxruntime's optimizations off: its
    WeightBiasQuantization transformer re-quantizes float weights per tensor.
    ``centre`` (TensorRT form; ``centred_tensors``): off | exact | padded. The Pad nodes padded centring needs
    are put into the FP32 graph before calibration by the ``pads`` graph pass (passes.pads.pad_explicitly); off
    and exact give their padding back to the convolutions (``_fold_zero_pads``), so one graph and one set of
    statistics serve all three. The offsets are recorded in the graph's metadata (``centred_offsets``)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    form = FORMS[form_name]
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    ensure_node_names(model)
    if not form.symmetric or centre != "padded":
        _fold_zero_pads(model)  # the pads graph pass's Pads: nothing will pad with anything but 0
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    qnodes = set(quantizable_nodes(model, form)) - set(exclude)
    wants = _quantizer_sites(model, form, qnodes, exclude_tensors)
    if centre not in GRAPH_CENTRE_MODES:
        raise ValueError(f"unknown centre mode {centre!r}; choices: {', '.join(GRAPH_CENTRE_MODES)}")
    shifted = (centred_tensors(model, form, qnodes, wants, stats, frozenset(act_overrides or ()))
               if centre != "off" else {})

    new_inits: list[Any] = []
    qdq_after: dict[str, list[Any]] = {}   # producer output -> nodes to emit right after it
    head_nodes: list[Any] = []             # Q/DQ of graph inputs and weight DQs
    act_scale: dict[str, float] = {}
    qdtype = TensorProto.INT8 if form.signed else TensorProto.UINT8
    for t, cons in wants.items():
        if t not in stats:
            raise KeyError(f"no calibration statistics for tensor {t!r}")
        if act_overrides and t in act_overrides:
            scale, zp = act_overrides[t]
        elif t in shifted:
            _, hi = compute_range(stats[t], method, False, percentile)
            scale, zp = max(hi, 1e-8) / 254.0, 0
            shifted[t] = scale * 127.0
        else:
            scale, zp = _act_qparams(stats[t], form, method, percentile)
        act_scale[t] = scale
        s_name, z_name = f"{t}__scale", f"{t}__zp"
        new_inits.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
        new_inits.append(helper.make_tensor(z_name, qdtype, [], [zp]))
        q = helper.make_node("QuantizeLinear", [t, s_name, z_name], [f"{t}__q"], name=f"{t}__Q")
        dq = helper.make_node("DequantizeLinear", [f"{t}__q", s_name, z_name], [f"{t}__dq"], name=f"{t}__DQ")
        (qdq_after.setdefault(t, []) if t in producer else head_nodes).extend([q, dq])
        for node, k in cons:
            node.input[k] = f"{t}__dq"

    # 2. weights (per-channel) and, for the CPU form, int32 bias
    read_weights: dict[str, np.ndarray] = {}   # reader of a centred tensor -> the weights it computes with
    readers = {c.name for t in shifted for c, _ in wants[t]}
    for n in g.node:
        if n.name not in qnodes or n.op_type not in WEIGHTED:
            continue
        wname = n.input[1]
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        axis = weight_axis(n)
        if float_weights:
            if n.name in readers:
                read_weights[n.name] = w
            continue
        if weight_overrides and wname in weight_overrides:
            wq = weight_overrides[wname]
            ws = weight_scales(w, axis)
        else:
            wq, ws = quantize_weight(w, axis)
        if n.name in readers:
            read_weights[n.name] = wq.astype(np.float32) * per_channel(ws, w.ndim, axis)
        base = f"{wname}__{n.name}"
        new_inits += [numpy_helper.from_array(wq, f"{base}__q"), numpy_helper.from_array(ws, f"{base}__wscale"),
                      numpy_helper.from_array(np.zeros(len(ws), np.int8), f"{base}__wzp")]
        head_nodes.append(helper.make_node("DequantizeLinear", [f"{base}__q", f"{base}__wscale", f"{base}__wzp"],
                                           [f"{base}__dq"], name=f"{base}__DQ", axis=axis))
        n.input[1] = f"{base}__dq"
        if form.quantize_bias and len(n.input) > 2 and n.input[2] in inits:
            in_t = n.input[0][: -len("__dq")] if n.input[0].endswith("__dq") else None
            if in_t in act_scale:
                b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
                bs = (act_scale[in_t] * ws.astype(np.float64))
                bq = np.clip(np.round(b / bs), -(2**31), 2**31 - 1).astype(np.int32)
                bname = f"{n.input[2]}__{n.name}"
                new_inits += [numpy_helper.from_array(bq, f"{bname}__q"),
                              numpy_helper.from_array(bs.astype(np.float32), f"{bname}__bscale"),
                              numpy_helper.from_array(np.zeros(len(bs), np.int32), f"{bname}__bzp")]
                head_nodes.append(helper.make_node("DequantizeLinear", [f"{bname}__q", f"{bname}__bscale", f"{bname}__bzp"],
                                                   [f"{bname}__dq"], name=f"{bname}__DQ", axis=0))
                n.input[2] = f"{bname}__dq"

    if shifted:
        _apply_shifts(model, shifted, wants, read_weights, producer)
        _set_offsets(model, shifted, producer)
    _fold_zero_pads(model)

    nodes = list(head_nodes)
    for n in g.node:
        nodes.append(n)
        for o in n.output:
            nodes.extend(qdq_after.get(o, []))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    # drop float weights no longer used
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


def activation_quantizers(model: Any) -> list[Any]:
    """The QuantizeLinear nodes of a Q/DQ graph that quantize activations (not initializers), in graph order."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


def check_tensorrt_qdq(model: Any) -> list[str]:
    """Problems that keep a graph from being a valid TensorRT explicit-quantization graph: every
    quantizer symmetric INT8 with zero-point 0, activations per-tensor, weights per-channel on the
    output-channel axis. Returns an empty list for a valid graph."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    problems: list[str] = []
    consumers = consumers_of(model)
    n_q = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n_q += 1
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{n.name}: no explicit zero-point")
            continue
        zp = inits[n.input[2]]
        if zp.data_type != TensorProto.INT8:
            problems.append(f"{n.name}: zero-point type {TensorProto.DataType.Name(zp.data_type)}, not INT8")
        if np.any(numpy_helper.to_array(zp) != 0):
            problems.append(f"{n.name}: non-zero zero-point")
        scale = numpy_helper.to_array(inits[n.input[1]])
        if np.any(scale <= 0):
            problems.append(f"{n.name}: non-positive scale")
        is_weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        if is_weight:
            w = numpy_helper.to_array(inits[n.input[0]])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            user = consumers.get(n.output[0], [None])[0]
            want_axis = weight_axis(user) if user is not None else 0
            if scale.ndim != 1 or scale.shape[0] != w.shape[want_axis] or axis != want_axis:
                problems.append(f"{n.name}: weights not per-channel on the output-channel axis "
                                f"(scale shape {scale.shape}, axis {axis}, weight shape {w.shape})")
        elif scale.ndim != 0:
            problems.append(f"{n.name}: activation scale is not per-tensor (shape {scale.shape})")
    if n_q == 0:
        problems.append("no Q/DQ nodes: the graph is not quantized")
    return problems
