"""Quantization-aware fine-tuning (`tledge export --int8 --qat`): train the merged network through the very
quantizers tledge's Q/DQ graph has, then write the result back as the same INT8 graph.

The network trained is the form's Q/DQ graph itself, interpreted op by op in torch (``QdqNet``), so the fake
quantization sits exactly where the exported graph quantizes, with its signedness, zero-points and ranges:
- each activation QuantizeLinear/DequantizeLinear pair becomes ``(clamp(round(x/s) + z, lo, hi) - z) * s`` with a
  straight-through round, one fused torch kernel (int8, z = 0 for the TensorRT form; uint8 with its zero-point for the CPU form);
- each weight DequantizeLinear becomes per-channel symmetric fake quantization with tledge's own scale rule
  (max |w| / 127, narrow range), recomputed from the current weights, as quantize_model will at export;
- BatchNorm is already folded into the convolutions by the ONNX export, so it cannot drift.
Training starts from the PTQ recipe (calibrated ranges, learned rounding when present: the starting weights
are the dequantized INT8 weights, so step 0 is the PTQ graph exactly), distils from the FP32 graph's logits on
training images (never val), and keeps the weights with the lowest distillation loss on held-out training
images (early stopping). Activation scales keep their calibrated values by default (``--qat-scales learned``
learns them LSQ-style).
The result is a new FormState: float weights and biases whose nearest rounding is what was trained, plus the
learned activation scales; the gate and the writer then treat it like any other recipe. torch runs on a
fixed context.TORCH_THREADS threads here, whatever --threads says or the machine has: a fixed partition of every
reduction, so the same graph comes out of `--threads 1` and `--threads 2` (measured: 1 and 2 threads differ by
1.5e-8 in the weights after 8 steps, enough to flip a rounding; 2 threads halve the time of 1).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from tledge.console import note, progress, warn
from tledge.errors import UsageError
from tledge.export.config import ExportConfig
from tledge.export.int8.context import FormState, Int8Context, torch_threads
from tledge.export.int8.plan import PassRecord
from tledge.faults import maybe_interrupt

# shape arithmetic and layout (EfficientNet-Lite's run-time "same" padding: the batch is dynamic, so folding
# leaves Shape -> Gather -> ... -> Pad chains in the graph), computed by shape_op
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Slice", "Transpose", "Cast", "ConstantOfShape", "Constant")
SUPPORTED = {"Conv", "Gemm", "Clip", "Relu", "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "Flatten", "Pad",
             "Reshape", "ReduceMean", "Concat", "Sigmoid", "Identity", "MaxPool", "AveragePool",
             "QuantizeLinear", "DequantizeLinear", *SHAPE_OPS}

# Adam moves a parameter by about its learning rate each step, whatever the gradient's size. Activation scales
# span 10x (0.005-0.047 in mobilenet_v2), so one absolute rate (it was 10 x --qat-lr) moved the small ones by 2%
# a step. Each scale's rate is SCALE_LR x --qat-lr x its calibrated value instead: at --qat-lr 1e-5, at most
# 0.1% a step. Even so, learned scales raised the TensorRT form's held-out loss at 64 px from an empirically
# bias-corrected start (30, 100 and 300 all did), which is why --qat-scales defaults to fixed.
SCALE_LR = 100.0

# ONNX TensorProto data types -> torch dtypes, for Cast and ConstantOfShape
_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fake_quant(x: Any, scale: Any, zp: int, lo: int, hi: int) -> Any:
    """``(clamp(round(x/s) + zp, lo, hi) - zp) * s``, round half to even. With gradients on (training): one fused
    torch kernel, forward and backward, gradient straight through inside the range (QAT's cost is mostly these
    elementwise passes, not the convolutions); a trainable ``scale`` gets the LSQ gradient (Esser et al. 2020, no
    gradient scaling). The fused kernels round ``x * (1/s)``, which differs from ONNX QuantizeLinear's ``x / s`` at
    ties; with gradients off (held-out checks, node_check, inference) it is written out with the division, so each
    quantizer computes exactly what onnxruntime's does (node_check: 0 of 18 million values differ at 64 px, where
    the fused kernel differed at 581, 1.4% of one quantizer's values, all at ties of a GlobalAveragePool)."""
    import torch
    if not torch.is_grad_enabled():
        return (torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp) * scale
    if scale.requires_grad:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), torch.full((1,), float(zp), device=x.device), lo, hi, 1.0)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), torch.full((1,), zp, dtype=torch.int32,
                                                                                   device=x.device), lo, hi)


def round_ste(v: Any) -> Any:
    """round(v) forward (half to even, as ONNX QuantizeLinear), identity backward."""
    import torch
    return v + (torch.round(v) - v).detach()


def weight_fake_quant(w: Any, axis: int) -> Any:
    """Per-channel symmetric narrow-range fake quantization: the scale rule of quantize.weight_scales (max |w| /
    127, recomputed from the current weights, not trained). Written out rather than torch's fused per-channel
    kernel: that one rounds w * (1/s), which differs from quantize_weight's w / s at a few ties (1 weight in
    153,600 in the test run), and the weights are a small part of a step's time."""
    import torch
    dims = tuple(i for i in range(w.dim()) if i != axis)
    amax = w.detach().abs().amax(dim=dims, keepdim=True)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.clamp(round_ste(w / s), -127, 127) * s


def build(q: Any, learn_scales: bool = False) -> Any:
    """A torch module computing the Q/DQ graph ``q`` with trainable weights and biases (``q``'s dequantized
    weights and biases) and fake quantizers at its Q/DQ pairs. At its start it computes ``q`` itself."""
    import torch
    from onnx import numpy_helper

    from tledge.export.int8.quantize import weight_axis

    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    bad = sorted({n.op_type for n in q.graph.node} - SUPPORTED)
    if bad:
        raise UsageError(f"--qat does not support the ops {', '.join(bad)} of this network yet.",
                         "export without --qat (post-training INT8), or use --fp16.")

    def _value(name: str) -> np.ndarray:
        """An initializer, or the dequantized value of a DequantizeLinear of initializers, as float32."""
        if name in inits:
            return np.ascontiguousarray(inits[name].astype(np.float32))
        dq = producer[name]
        if dq.op_type == "Identity":  # the torch exporter shares equal initializers (e.g. zero biases) this way
            return _value(dq.input[0])
        if dq.op_type == "Constant":
            return np.ascontiguousarray(numpy_helper.to_array(_attr(dq, "value", None)).astype(np.float32))
        v = inits[dq.input[0]].astype(np.float64)
        s = inits[dq.input[1]].astype(np.float64)
        z = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else 0.0
        axis = int(_attr(dq, "axis", 1))
        shape = [1] * v.ndim
        if np.ndim(s) == 1 and v.ndim > 0:
            shape[axis] = -1
            s, z = s.reshape(shape), np.reshape(z, shape) if np.ndim(z) else z
        return np.ascontiguousarray(((v - z) * s).astype(np.float32))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b, self.s = torch.nn.ParameterDict(), torch.nn.ParameterDict(), torch.nn.ParameterDict()
            self.steps: list[tuple[str, Any]] = []
            self.consts: dict[str, Any] = {}
            self.qparams: dict[str, tuple[int, int, int]] = {}   # Q node -> (zp, lo, hi)
            self.act_of: dict[str, str] = {}                      # Q node -> activation tensor it quantizes
            self.weight_axis: dict[str, int] = {}
            self.node_of: dict[str, str] = {}                     # parameter key -> Conv/Gemm node name
            skip_dq = set()
            for n in q.graph.node:
                if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                    skip_dq.add(n.output[0])  # weight / bias DQ: replaced by parameters
            self.skip = skip_dq
            for n in q.graph.node:
                key = _key(n.name)
                if n.op_type in ("Conv", "Gemm"):
                    self.node_of[key] = n.name
                    if n.input[1] in skip_dq:  # quantized weight: start from its dequantized INT8 values
                        self.weight_axis[key] = weight_axis(n)
                    self.w[key] = torch.nn.Parameter(torch.from_numpy(_value(n.input[1])))
                    if len(n.input) > 2 and n.input[2]:  # float bias, or the CPU form's int32 bias dequantized
                        self.b[key] = torch.nn.Parameter(torch.from_numpy(_value(n.input[2])))
                elif n.op_type == "QuantizeLinear":
                    s = float(inits[n.input[1]])
                    z = inits[n.input[2]]  # tledge's quantizers always carry an explicit zero-point
                    zp = int(z)
                    lo, hi = (-128, 127) if z.dtype == np.int8 else (0, 255)
                    self.qparams[key] = (zp, lo, hi)
                    self.s[key] = torch.nn.Parameter(torch.tensor(s, dtype=torch.float32), requires_grad=learn_scales)
                    self.act_of[key] = n.input[0]
                for i in n.input:
                    if i in inits and i not in self.consts and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                        self.consts[i] = torch.from_numpy(np.array(inits[i]))
                self.steps.append((key, n))

        def to_device(self, device: Any) -> "Net":
            self.to(device)
            self.consts = {k: v.to(device) for k, v in self.consts.items()}
            return self

        def forward(self, x: Any, trace: dict[str, Any] | None = None, given: dict[str, Any] | None = None) -> Any:
            """The graph's output; with ``trace``, every tensor computed is also stored there by name. With
            ``given`` (tensors by name, e.g. another runtime's), every node reads its inputs from ``given`` where it
            holds them, not from what this network computed: a node-by-node comparison (node_check)."""
            import torch.nn.functional as F
            env: dict[str, Any] = {q.graph.input[0].name: x} if trace is None else trace
            env[q.graph.input[0].name] = x
            for key, n in self.steps:
                op = n.op_type
                if op == "DequantizeLinear":
                    if n.output[0] in self.skip:
                        continue
                    env[n.output[0]] = env[n.input[0]]  # the fake quantizer already dequantized
                    continue
                ins = [given[i] if given is not None and i in given else env[i] if i in env else self.consts.get(i)
                       for i in n.input]
                if op == "QuantizeLinear":
                    zp, lo, hi = self.qparams[key]
                    y = fake_quant(ins[0], self.s[key], zp, lo, hi)
                elif op == "Conv":
                    w = self.w[key]
                    if key in self.weight_axis:
                        w = weight_fake_quant(w, self.weight_axis[key])
                    pads = list(_attr(n, "pads", [0, 0, 0, 0]))
                    xin = ins[0]
                    if pads[0] != pads[2] or pads[1] != pads[3]:
                        xin = F.pad(xin, (pads[1], pads[3], pads[0], pads[2]))
                        pad = (0, 0)
                    else:
                        pad = (pads[0], pads[1])
                    y = F.conv2d(xin, w, self.b[key] if key in self.b else None, tuple(_attr(n, "strides", [1, 1])),
                                 pad, tuple(_attr(n, "dilations", [1, 1])), int(_attr(n, "group", 1)))
                elif op == "Gemm":
                    w = self.w[key]
                    if key in self.weight_axis:
                        w = weight_fake_quant(w, self.weight_axis[key])
                    a = ins[0].t() if _attr(n, "transA", 0) else ins[0]
                    bm = w.t() if _attr(n, "transB", 0) else w
                    y = float(_attr(n, "alpha", 1.0)) * (a @ bm)
                    if key in self.b:
                        y = y + float(_attr(n, "beta", 1.0)) * self.b[key]
                elif op == "Clip":
                    lo_ = float(ins[1]) if len(ins) > 1 and ins[1] is not None else None
                    hi_ = float(ins[2]) if len(ins) > 2 and ins[2] is not None else None
                    y = ins[0].clamp(lo_, hi_)
                elif op == "Relu":
                    y = F.relu(ins[0])
                elif op in ("Add", "Sub", "Mul", "Div"):
                    a, b = ins[0], ins[1]
                    if op == "Div" and not a.is_floating_point() and not b.is_floating_point():
                        y = torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates
                    else:
                        y = {"Add": lambda: a + b, "Sub": lambda: a - b, "Mul": lambda: a * b, "Div": lambda: a / b}[op]()
                elif op in SHAPE_OPS:
                    y = shape_op(n, ins)
                elif op == "GlobalAveragePool":
                    y = ins[0].mean(dim=(2, 3), keepdim=True)
                elif op == "Flatten":
                    y = ins[0].flatten(int(_attr(n, "axis", 1)))
                elif op == "Pad":
                    p = [int(v) for v in ins[1]]
                    k = len(p) // 2
                    tp = []
                    for d in reversed(range(k)):
                        tp += [p[d], p[d + k]]
                    val = float(ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
                    y = F.pad(ins[0], tp, mode="constant", value=val)
                elif op == "Reshape":
                    shape = [int(v) for v in ins[1]]
                    shape = [ins[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
                    y = ins[0].reshape(shape)
                elif op == "ReduceMean":
                    axes = _attr(n, "axes", None)
                    if axes is None and len(ins) > 1 and ins[1] is not None:
                        axes = [int(v) for v in ins[1]]
                    y = ins[0].mean(dim=tuple(axes), keepdim=bool(_attr(n, "keepdims", 1)))
                elif op == "Concat":
                    y = torch.cat(ins, dim=int(_attr(n, "axis", 1)))
                elif op == "Sigmoid":
                    y = ins[0].sigmoid()
                elif op == "Identity":
                    y = ins[0]
                elif op in ("MaxPool", "AveragePool"):
                    ks, st = tuple(_attr(n, "kernel_shape", [1, 1])), tuple(_attr(n, "strides", [1, 1]))
                    pads = list(_attr(n, "pads", [0, 0, 0, 0]))
                    fn_ = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
                    y = fn_(ins[0], ks, st, (pads[0], pads[1]))
                else:  # guarded by SUPPORTED
                    raise UsageError(f"--qat: op {op} not supported", "export without --qat.")
                env[n.output[0]] = y
            return env[q.graph.output[0].name]

    return Net()


def node_check(q: Any, x: np.ndarray, net: Any = None) -> dict[str, Any]:
    """Node by node, the torch network of ``q`` (``build(q)`` unless given) against onnxruntime's reference
    execution of ``q`` (graph optimisations off: every Q/DQ pair as written): each node of the torch network reads
    onnxruntime's values of its inputs, and every activation quantizer's integer output is compared with
    onnxruntime's. This separates what each node computes from how rounding differences grow through the network:
    end to end, a one-step flip anywhere (a float sum in another order) is carried on and grows, so two correct
    executions of one INT8 graph disagree on a few percent of top-1 (onnxruntime's own optimised and reference
    sessions among them; see benchmarks/qat.py).

    Returns ``{"elements", "differing", "max_steps", "worst": (node, fraction)}``: how many quantized values were
    compared, how many differ, by at most how many quantization steps, and the quantizer with the largest
    fraction differing."""
    import torch

    from tledge.export import ort
    inits = {i.name for i in q.graph.initializer}
    names = [o for n in q.graph.node for o in n.output if o]
    sess, inp = ort.probe_session(q, names, optimize=False)
    outs = sess.run(None, {inp: x})
    ref = {o.name: v for o, v in zip(sess.get_outputs(), outs)}
    net = build(q) if net is None else net
    given = {k: torch.from_numpy(np.asarray(v)) for k, v in ref.items()}
    trace: dict[str, Any] = {}
    with torch.no_grad():
        net(torch.from_numpy(x), trace=trace, given=given)
    elements = differing = max_steps = 0
    worst = ("", 0.0)
    for key, n in net.steps:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        zp = net.qparams[key][0]
        s = float(net.s[key].detach().cpu())
        mine = np.round(trace[n.output[0]].cpu().numpy() / s).astype(np.int64)  # dequantized: (q - zp) * s
        theirs = ref[n.output[0]].astype(np.int64) - zp
        d = np.abs(mine - theirs)
        elements += d.size
        differing += int((d > 0).sum())
        max_steps = max(max_steps, int(d.max()))
        frac = float((d > 0).mean())
        if frac > worst[1]:
            worst = (n.name, frac)
    return {"elements": elements, "differing": differing, "max_steps": max_steps, "worst": worst}


def shape_op(n: Any, ins: list[Any]) -> Any:
    """The shape-arithmetic and layout ops of SHAPE_OPS in torch, with ONNX's semantics (opset 13+: axes and
    Slice bounds as inputs, older opsets' attributes also read)."""
    import torch
    from onnx import numpy_helper
    op, x = n.op_type, ins[0] if ins else None
    if op == "Shape":
        return torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    if op == "Gather":
        axis, idx = int(_attr(n, "axis", 0)), ins[1].long()
        axis = axis % x.dim()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        if idx.dim() == 0:
            return x.select(axis, int(idx))
        return x.index_select(axis, idx.flatten()).reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])
    if op == "Unsqueeze":
        axes = _attr(n, "axes", None)
        axes = [int(v) for v in (ins[1] if axes is None else axes)]
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x
    if op == "Slice":
        starts, ends = _attr(n, "starts", None), _attr(n, "ends", None)
        if starts is None:
            starts, ends = [int(v) for v in ins[1]], [int(v) for v in ins[2]]
            axes = [int(v) for v in ins[3]] if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
            steps = [int(v) for v in ins[4]] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        else:
            axes, steps = list(_attr(n, "axes", range(len(starts)))), [1] * len(starts)
        for st, en, a, sp in zip(starts, ends, axes, steps):
            a %= x.dim()
            keep = list(range(*slice(st, en, sp).indices(x.shape[a])))  # clamps INT64_MAX ends, negative steps
            x = x.index_select(a, torch.tensor(keep, dtype=torch.int64, device=x.device))
        return x
    if op == "Transpose":
        perm = _attr(n, "perm", None)
        return x.permute(*(perm if perm is not None else reversed(range(x.dim()))))
    if op == "Cast":
        return x.to(getattr(torch, _DTYPES[int(_attr(n, "to", 1))]))
    if op == "ConstantOfShape":
        v = _attr(n, "value", None)
        fill = numpy_helper.to_array(v).reshape(-1) if v is not None else np.zeros(1, np.float32)
        return torch.full([int(d) for d in x], fill[0].item(), dtype=getattr(torch, str(fill.dtype)), device=x.device)
    if op == "Constant":
        return torch.from_numpy(np.array(numpy_helper.to_array(_attr(n, "value", None))))
    raise UsageError(f"--qat: op {op} not supported", "export without --qat.")


def _key(name: str) -> str:
    return name.replace(".", "_")  # ParameterDict keys cannot hold dots


def trained_tensors(net: Any, model: Any) -> dict[str, np.ndarray]:
    """The trained float weights and biases by their initializer name in ``model`` (the form's float graph,
    whose node names the Q/DQ graph keeps)."""
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for key, p in net.w.items():
        out[nodes[net.node_of[key]].input[1]] = p.detach().cpu().numpy().astype(np.float32).copy()
    for key, p in net.b.items():
        out[nodes[net.node_of[key]].input[2]] = p.detach().cpu().numpy().astype(np.float32).copy()
    return out


def uncentre(q: Any, trained: dict[str, np.ndarray], model: Any) -> None:
    """Turn the trained biases of a centred graph (quantize_model(centre=...): each centred quantizer's producer
    holds its bias - s, each reader its bias + s * (sum of its quantized weights)) into the float graph's, in place,
    so that quantize_model's centring of ``model`` gives back the graph that was trained (the offsets s are the
    calibrated ranges', which fixed-scale training keeps)."""
    import torch

    from tledge.export.graph import consumers_of
    from tledge.export.int8.quantize import centred_offsets, weight_axis
    offsets = centred_offsets(q)
    if not offsets:
        return
    producer = {o: n for n in q.graph.node for o in n.output}
    consumers = consumers_of(q)
    fp = {n.name: n for n in model.graph.node}

    def readers(t: str) -> list[Any]:
        """The Convs reading ``t`` through its Q/DQ pair (and a centring Pad)."""
        out, todo = [], [t]
        while todo:
            for c in consumers.get(todo.pop(), []):
                if c.op_type in ("QuantizeLinear", "DequantizeLinear", "Pad"):
                    todo.append(c.output[0])
                elif c.op_type == "Conv":
                    out.append(c)
        return out

    def add(name: str, delta: Any) -> None:
        trained[name] = (trained[name].astype(np.float64) + delta).astype(np.float32)

    for t, s in sorted(offsets.items()):
        node = producer[t]
        if node.op_type == "Conv":  # the producer's output: its bias took -s
            add(fp[node.name].input[2], s)
            continue
        if not any(c.op_type == "QuantizeLinear" for c in consumers.get(t, [])):
            continue  # a Clip output between the producer and the exporter's Pad: its quantized output counts
        for c in readers(t):        # the centred tensor: each reader's bias took + s * sum(quantized weights)
            f = fp[c.name]
            w = weight_fake_quant(torch.from_numpy(trained[f.input[1]]), weight_axis(f)).numpy().astype(np.float64)
            add(f.input[2], -s * w.sum(axis=tuple(range(1, w.ndim))))


def write_back(net: Any, state: FormState, new: dict[str, np.ndarray]) -> None:
    """Put the trained weights and biases ``new`` (trained_tensors) and the learned activation scales into
    ``state``: its float graph then holds the trained float weights (quantize_model's nearest rounding of
    them is what the fake quantizers computed)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(state.model)
    for init in m.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    state.act_qparams = {net.act_of[k]: (float(net.s[k].detach().cpu()), net.qparams[k][0]) for k in net.s} \
        if any(p.requires_grad for p in net.s.values()) else {}
    state.model, state.rounding, state.rounding_name = m, {}, "qat"


def expected_seconds(net: Any, x: Any, teacher: Any, opt_step: Any, teacher_net: Any = None) -> float:
    """Seconds of one training step on this machine: the median of three timed steps on a copy, after one
    untimed (allocation) step, the FP32 teacher's forward pass included when it runs per step (mixup). The
    minimum of two steps, without the held-out checks, had printed 0.56-1.2x what the pass took (benchmarks/qat.py).
    Only printed: no decision depends on it."""
    import copy

    import torch
    probe = copy.deepcopy(net)
    opt = opt_step(probe)
    t = []
    for _ in range(4):
        t0 = time.perf_counter()
        if teacher_net is not None:
            with torch.no_grad():
                teacher_net(x)
        loss = distill_loss(probe(x), teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t.append(time.perf_counter() - t0)
    return float(np.median(t[1:]))


WARMUP = 0.2


def seeded(base: int, seed: int) -> np.random.Generator:
    """The generator of one of QAT's draws under --qat-seed: seed 0 is ``base`` alone (the draws of every release
    before the option), any other seed an independent stream of ``base`` and ``seed``."""
    return np.random.default_rng(base if seed == 0 else [base, seed])


def warmup_steps(steps: int) -> int:
    """The steps of the learning rate's linear warm-up (the first WARMUP of ``steps``, at least 1)."""
    return max(1, round(WARMUP * steps))


def lr_factor(step: int, steps: int) -> float:
    """The learning rate's multiplier at ``step`` (1-based) of ``steps``: a linear warm-up over the first
    WARMUP of the steps, then a cosine decay to 0. Adam's first steps move every parameter by about its full
    rate in the sign of one batch's gradient, a noisy start from a PTQ recipe already close to FP32. Measured
    at 64 px it is not what made learned scales fail (warm-up 0.2 and 0.5 did not stop the TensorRT form's
    held-out KL rising); with fixed scales and this schedule both forms' held-out KL fell."""
    import math
    warm = warmup_steps(steps)
    if step <= warm:
        return step / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def augment(x: Any, rng: np.random.Generator) -> Any:
    """Each image of the batch ``x`` (N, C, H, W) shifted by up to H/8 and W/8 pixels each way (its edge pixels
    repeated into the gap, so a plain background stays plain) and flipped left-right with probability 1/2, all
    drawn from ``rng`` (seeded: the same images on every machine). The teacher is run on the very images the
    student sees, which is what lets distillation use images the dataset does not hold (Beyer et al. 2022,
    "Knowledge distillation: a good teacher is patient and consistent")."""
    import torch
    import torch.nn.functional as F
    n, _, h, w = x.shape
    mh, mw = max(1, h // 8), max(1, w // 8)
    flips = rng.random(n) < 0.5
    dy, dx = rng.integers(0, 2 * mh + 1, n), rng.integers(0, 2 * mw + 1, n)
    xp = F.pad(x, (mw, mw, mh, mh), mode="replicate")
    out = [xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]
    return torch.stack([im.flip(-1) if f else im for im, f in zip(out, flips)])


def distill_loss(z: Any, t: Any) -> Any:
    """KL(softmax(t) || softmax(z)): the student follows the FP32 model's class distribution."""
    import torch.nn.functional as F
    return F.kl_div(F.log_softmax(z, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")


class Qat:
    name = "qat"

    def escalates(self, cfg: ExportConfig) -> bool:
        return False

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        q = cfg.quant
        if q.qat == "off":
            return False, "--qat off"
        return True, (f"{q.qat_steps} steps of batch {q.qat_batch}, scales {q.qat_scales}"
                      + (", augmented images" if q.qat_augment else "")
                      + (f", weight average (decay {q.qat_ema})" if q.qat_ema else "")
                      + (f", seed {q.qat_seed}" if q.qat_seed else ""))

    def run(self, state: FormState, ctx: Int8Context) -> PassRecord:
        import torch

        from tledge.export.int8.passes.head_refit import train_images, train_teacher_logits
        from tledge.export.int8.quantize import ensure_node_names

        cfg = ctx.cfg.quant
        ensure_node_names(state.model)  # the Q/DQ graph's node names are the float graph's
        if cfg.qat_scales == "learned":
            # learned scales are written as act_overrides, which quantize_model does not centre: train what is exported
            state.centre = "off"
        q = ctx.quantize(state)
        train = train_images(ctx)
        x_all = np.concatenate(list(train.batches(256))) if len(train) else np.zeros((0,))
        teacher = train_teacher_logits(ctx).astype(np.float32)
        rng = seeded(2468, cfg.qat_seed)
        order = rng.permutation(len(x_all))
        n_hold = max(32, len(x_all) // 10)
        hold, fit = order[:n_hold], order[n_hold:]
        # a CUDA GPU when torch sees one (not run here: no GPU on the build machines); results then differ from
        # the CPU's in the last bits, as any two devices' float reductions do
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        xh, th = torch.from_numpy(x_all[hold]).to(dev), torch.from_numpy(teacher[hold]).to(dev)
        with torch_threads():
            torch.manual_seed(1357 + 7919 * cfg.qat_seed)
            net = build(q, cfg.qat_scales == "learned").to_device(dev)
            fresh = cfg.qat_mix > 0 or cfg.qat_augment   # new images each step: the teacher runs on them
            teacher_net = build(ctx.base).to_device(dev).eval() if fresh else None
            mix_rng = seeded(8642, cfg.qat_seed)
            aug_rng = seeded(9753, cfg.qat_seed)

            def mixed(xb: Any) -> tuple[Any, Any]:
                """The batch augmented (--qat-augment), then mixup (pairs of images, Beta(a, a) weights; --qat-mix
                above 0), and the FP32 teacher's logits on the result."""
                xm = augment(xb, aug_rng) if cfg.qat_augment else xb
                if cfg.qat_mix > 0:
                    lam = torch.from_numpy(mix_rng.beta(cfg.qat_mix, cfg.qat_mix, len(xm)).astype(np.float32))
                    lam = lam.to(dev).view(-1, 1, 1, 1)
                    perm = torch.from_numpy(mix_rng.permutation(len(xm))).to(dev)
                    xm = lam * xm + (1 - lam) * xm[perm]
                with torch.no_grad():
                    return xm, torch.cat([teacher_net(xm[i:i + 64]) for i in range(0, len(xm), 64)])

            if teacher_net is not None:  # early stopping also sees mixed (augmented) held-out images, fixed once
                xm, tm = mixed(xh)
                xh, th = torch.cat([xh, xm]), torch.cat([th, tm])

            def make_opt(m: Any) -> Any:
                groups = [{"params": list(m.w.values()) + list(m.b.values()), "lr": cfg.qat_lr}]
                if cfg.qat_scales == "learned":  # each scale's step relative to its calibrated value (m is
                    # made before any step: the network, or expected_seconds' copy of it)
                    groups += [{"params": [p], "lr": cfg.qat_lr * SCALE_LR * float(p.detach().cpu())}
                               for p in m.s.values()]
                return torch.optim.Adam(groups)

            opt = make_opt(net)
            base_lr = [g["lr"] for g in opt.param_groups]

            def held_out() -> tuple[float, float]:
                with torch.no_grad():
                    z = torch.cat([net(xh[i:i + 64]) for i in range(0, len(xh), 64)])
                    return float(distill_loss(z, th)), float((z.argmax(1) == th.argmax(1)).float().mean())

            b = cfg.qat_batch
            # --qat-ema: the held-out checks and the result use an exponential moving average of the weights
            # and biases (decay d per step) instead of the last step's, which one noisy batch has moved
            ema_d = cfg.qat_ema
            live = {f"w.{k}": v for k, v in net.w.items()} | {f"b.{k}": v for k, v in net.b.items()}
            ema = {k_: p_.detach().clone() for k_, p_ in live.items()} if ema_d else {}

            def swap_ema() -> None:
                """Exchange the live weights and biases with their averages (twice: back as they were)."""
                for k_, p_ in live.items():
                    p_.data, ema[k_] = ema[k_], p_.data
            batch_idx = [fit[(i * b + np.arange(b)) % len(fit)] for i in range(cfg.qat_steps)]
            per_step = expected_seconds(net, torch.from_numpy(x_all[batch_idx[0]]).to(dev),
                                        torch.from_numpy(teacher[batch_idx[0]]).to(dev), make_opt, teacher_net)
            t_check = time.perf_counter()
            loss0, agree0 = held_out()
            per_check = time.perf_counter() - t_check
            every = max(1, cfg.qat_steps // 10)
            n_checks = cfg.qat_steps // every + (cfg.qat_steps % every != 0)
            expected = per_step * cfg.qat_steps + per_check * n_checks
            kind = ", ".join(w for w, on in (("shifted and flipped", cfg.qat_augment), ("mixup", cfg.qat_mix > 0)) if on)
            note(f"QAT ({state.form}, {dev.type}): {cfg.qat_steps} steps of batch {b} on {len(fit)} training images "
                 + (f"({kind}) " if kind else "") +
                 f"({n_hold} held out for early stopping, checked {n_checks} times); expected about "
                 f"{expected / 60:.1f} min here (at most: early stopping may end it sooner)")
            best = {"step": 0, "loss": loss0, "agreement": agree0,
                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}
            history = [{"step": 0, "held_out_kl": loss0, "held_out_agreement": agree0}]
            bad = 0
            warm = warmup_steps(cfg.qat_steps)   # patience: checks up to the end of the warm-up do not count
            spent = {"steps_s": 0.0, "checks_s": per_check}   # for the record only: no decision reads them
            with progress() as prog:
                task = prog.add_task(f"QAT ({state.form})", total=cfg.qat_steps, info="")
                for step, idx in enumerate(batch_idx, 1):
                    t_step = time.perf_counter()
                    for grp, lr0 in zip(opt.param_groups, base_lr):
                        grp["lr"] = lr0 * lr_factor(step, cfg.qat_steps)
                    xb, tb = torch.from_numpy(x_all[idx]).to(dev), torch.from_numpy(teacher[idx]).to(dev)
                    if teacher_net is not None:  # mixup: images between two classes, where the decisions are made
                        xb, tb = mixed(xb)         # (and with --qat-augment, images the dataset does not hold)
                    loss = distill_loss(net(xb), tb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if ema_d:
                        with torch.no_grad():
                            for k_, p_ in live.items():
                                ema[k_].mul_(ema_d).add_(p_.detach(), alpha=1 - ema_d)
                    spent["steps_s"] += time.perf_counter() - t_step
                    prog.advance(task, 1)
                    maybe_interrupt(f"qat:{step}")
                    if step % every == 0 or step == cfg.qat_steps:
                        t_check = time.perf_counter()
                        if ema_d:  # check (and keep) the averaged weights, then train on from the live ones
                            swap_ema()
                        hl, ha = held_out()
                        spent["checks_s"] += time.perf_counter() - t_check
                        history.append({"step": step, "held_out_kl": hl, "held_out_agreement": ha})
                        if hl < best["loss"]:
                            best = {"step": step, "loss": hl, "agreement": ha,
                                    "state": {k: v.detach().clone() for k, v in net.state_dict().items()}}
                            bad = 0
                        elif step > warm:
                            bad += 1
                        if ema_d:
                            swap_ema()
                        if bad >= cfg.qat_patience:
                            break
            net.load_state_dict(best["state"])
        if best["step"] == 0:
            # No step came closer to FP32 on the held-out images: ``state`` is left as it was, so the graph is the
            # post-training one byte for byte (writing step 0's weights back moved 17 centred biases of
            # mobilenet_v2 by float rounding, and 1 of 1,000 val images with them), and there are no QAT weights.
            decision = (f"no step lowered the held-out KL ({loss0:.4f} at the start, agreement with FP32 "
                        f"{agree0:.1%}; {history[-1]['step']} steps run): the PTQ start kept, no QAT weights written")
            warn(f"INT8 {state.form}: QAT {decision}. More steps or another --qat-lr may help; the graph is the "
                 "post-training one")
        else:
            trained = trained_tensors(net, state.model)
            uncentre(q, trained, state.model)
            write_back(net, state, trained)
            ctx.cache[("qat", state.form)] = {**trained, **{f"scale:{net.act_of[k]}": np.array(
                float(p.detach().cpu()), np.float32) for k, p in net.s.items()}}
            decision = (f"fine-tuned through the quantizers: held-out KL {loss0:.4f} -> {best['loss']:.4f}, "
                        f"agreement with FP32 {agree0:.1%} -> {best['agreement']:.1%} (best at step {best['step']})")
        return PassRecord(self.name, state.form, decision,
                          f"distilled from FP32 logits on {len(fit)} training images, {n_hold} held out",
                          details={"history": history, "best_step": best["step"], "steps_run": history[-1]["step"],
                                   "scales": cfg.qat_scales, "lr": cfg.qat_lr, "batch": b, "device": dev.type,
                                   "mix": cfg.qat_mix, "augment": cfg.qat_augment, "patience": cfg.qat_patience,
                                   "ema": cfg.qat_ema, "seed": cfg.qat_seed,
                                   "expected_s_per_step": round(per_step, 3), "expected_s": round(expected, 1),
                                   "steps_s": round(spent["steps_s"], 1), "checks_s": round(spent["checks_s"], 1)})
