"""Quantization that fixes the causes of INT8 accuracy loss, applied to the FP32 graph before and around
quantization. Each technique is switchable and recorded in the export manifest.

- Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and
  Bias Correction", sec. 4.1): for Conv -> [ReLU] -> Conv pairs, scale output channel i of the first by
  1/s_i and input channel i of the second by s_i, s_i = sqrt(r1_i / r2_i), which equalizes per-channel
  weight ranges and leaves the FP32 function unchanged (ReLU is positively homogeneous). Pairs joined by
  ReLU6/Clip are skipped: clip(s x, 0, 6) / s = clip(x, 0, 6 / s) is not the same function, so scaling
  across them would change the FP32 network (the paper replaces ReLU6 by ReLU; tledge does not change
  what the user trained). BatchNorm is already folded into the convolutions by the exporter.
- Bias correction (same paper, sec. 4.2, with empirical input means as in AIMET): the expected output
  shift caused by weight rounding, E[(W_q - W) x] = (W_q - W) E[x], is subtracted from each bias; E[x]
  per input channel comes from the calibration images.
- Empirical bias correction (the same paper's empirical variant, as AIMET's ``correct_bias`` runs it):
  layer by layer, the per-channel mean difference between the INT8 network's outputs and the FP32 ones
  on calibration images is subtracted from the bias. It also removes the shift that activation
  quantization causes; it is measured only where values pass the activation and the next quantizer
  unclipped. Per form (their activation grids differ). The export keeps whichever of the two
  corrections brings the INT8 logits closer to FP32 on calibration images the fit did not see.
- Learned weight rounding (AdaRound, Nagel et al. 2020): each weight rounded up or down to reconstruct
  its layer's FP32 output on calibration images, for the layers whose output nearest rounding costs most,
  worst first, within a wall-clock budget and a memory cap (see ``adaround``).
- Quantization-tolerant head: the classification head is re-fitted on features computed by the INT8
  backbone on training images (never val), so it learns the decision margins of the features it will
  really see. The FP32 model is unchanged; only the INT8 graph's head differs. Linear heads only.
  Optionally distilled from the FP32 logits of the same images (Hinton et al. 2015, ``refit_distill``).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from tledge.export.calibrate import probe_session
from tledge.export.quantize import _weight_axis, consumers_of, per_channel, quantize_weight


def _onnx() -> Any:
    import onnx
    return onnx


def _copy(model: Any) -> Any:
    m = _onnx().ModelProto()
    m.CopyFrom(model)
    return m


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else list(a.ints)
    return default


# ---------------------------------------------------------------------------- cross-layer equalization

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
        if _attr(n, "group", 1) != 1:
            continue  # a grouped first conv would need its groups kept consistent; not needed for these models
        pairs.append((n, nxt, joint))
    return pairs


def equalize(model: Any, iterations: int = 2) -> tuple[Any, dict[str, Any]]:
    """Cross-layer equalization; returns the new model and a report (pairs equalized and skipped)."""
    from onnx import numpy_helper

    m = _copy(model)
    inits = {i.name: i for i in m.graph.initializer}
    pairs = equalizable_pairs(m)
    for _ in range(iterations):
        for a, b, _joint in pairs:
            w1 = numpy_helper.to_array(inits[a.input[1]]).astype(np.float64)
            w2 = numpy_helper.to_array(inits[b.input[1]]).astype(np.float64)
            g2 = _attr(b, "group", 1)
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
    skipped = _clip_joined(m)
    return m, {"pairs": len(pairs), "skipped_relu6_pairs": skipped}


def _clip_joined(model: Any) -> int:
    consumers = consumers_of(model)
    count = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            c = consumers.get(n.output[0], [])
            if len(c) == 1 and c[0].op_type == "Clip":
                c2 = consumers.get(c[0].output[0], [])
                count += int(len(c2) == 1 and c2[0].op_type == "Conv")
    return count


# ------------------------------------------------------------------------------------ bias correction

def weighted_nodes(model: Any) -> list[Any]:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2
            and n.input[1] in inits and n.input[2] in inits]


def channel_means(model: Any, batches: Iterable[np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    """Mean of every Conv/Gemm input over the calibration images, per channel and position (C, H, W), so
    the correction also holds at borders, where the kernel sees padding (one FP32 pass)."""
    names = sorted({n.input[0] for n in weighted_nodes(model)})
    sess, inp = probe_session(model, names, threads)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for x in batches:
        for n, v in zip(names, sess.run(names, {inp: x})):
            mu = v.sum(axis=0)
            sums[n] = sums.get(n, 0) + mu.astype(np.float64)
        count += len(x)
    return {n: s / max(count, 1) for n, s in sums.items()}


def bias_correct(model: Any, means: dict[str, np.ndarray], weight_overrides: dict[str, np.ndarray] | None = None,
                 ) -> tuple[Any, dict[str, Any]]:
    """Subtract (W_q - W) E[x] from every Conv/Gemm bias (W_q: nearest rounding, or the learned one)."""
    from onnx import numpy_helper

    m = _copy(model)
    inits = {i.name: i for i in m.graph.initializer}
    shifts = []
    for n in weighted_nodes(m):
        if n.input[0] not in means:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        axis = _weight_axis(n)
        q, s = quantize_weight(w, axis)
        if weight_overrides and n.input[1] in weight_overrides:
            q = weight_overrides[n.input[1]]
        dw = q.astype(np.float64) * per_channel(s, w.ndim, axis) - w.astype(np.float64)
        mu = means[n.input[0]]
        if n.op_type == "Gemm":
            delta = (dw.T if axis == 1 else dw) @ mu
        else:
            # E[conv(x, dW)] = conv(E[x], dW) by linearity, averaged over output positions
            import torch
            import torch.nn.functional as F
            pads = _attr(n, "pads", [0, 0, 0, 0])
            x = F.pad(torch.from_numpy(mu[None]), (pads[1], pads[3], pads[0], pads[2]))
            y = F.conv2d(x, torch.from_numpy(dw), None, _attr(n, "strides", [1, 1]), 0, _attr(n, "dilations", [1, 1]),
                         _attr(n, "group", 1))
            delta = y.mean(dim=(0, 2, 3)).numpy()
        b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) - delta
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), n.input[2]))
        shifts.append(float(np.abs(delta).mean()))
    return m, {"layers": len(shifts), "mean_abs_shift": float(np.mean(shifts)) if shifts else 0.0}


# ------------------------------------------------------------------------------------------ head refit

def head_gemm(model: Any) -> Any | None:
    """The classifier's final Gemm when the head is a single linear layer fed by the backbone features."""
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(gemms) != 1 or model.graph.output[0].name not in gemms[0].output:
        return None
    return gemms[0]


def features_through(q: Any, gemm_input: str, batches: Iterable[np.ndarray], threads: int | None = None) -> np.ndarray:
    """The features the quantized head sees (after the input's Q/DQ), for ``batches``."""
    sess, inp = probe_session(q, [gemm_input], threads, optimize=True)
    return np.concatenate([sess.run([gemm_input], {inp: x})[0] for x in batches])


def refit_head(features: np.ndarray, labels: np.ndarray, w0: np.ndarray, b0: np.ndarray, epochs: int,
               weight_decay: float, label_smoothing: float, dropout: float, lr: float = 1e-3, seed: int = 0,
               batch: int = 256, teacher: np.ndarray | None = None, distill: float = 0.0,
               temperature: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """AdamW + cosine from the FP32 head, a fixed number of epochs (no selection on val). The loss mixes
    cross-entropy on the labels with, weighted by ``distill``, knowledge distillation (Hinton et al. 2015)
    towards ``teacher``, the FP32 network's logits for the same images: the INT8 head then learns to make
    the FP32 network's decisions from the features it will really see, rather than new ones."""
    import torch

    torch.manual_seed(seed)
    lin = torch.nn.Linear(w0.shape[1], w0.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w0))
        lin.bias.copy_(torch.from_numpy(b0))
    head = torch.nn.Sequential(torch.nn.Dropout(dropout), lin)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = torch.from_numpy(features), torch.from_numpy(labels).long()
    tz = torch.from_numpy(teacher.astype(np.float32)) if teacher is not None else None
    if distill > 0 and tz is None:
        raise ValueError("distillation needs the teacher's logits")
    steps = max(1, epochs * ((len(x) + batch - 1) // batch))
    k = 0
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + np.cos(np.pi * k / steps))
            k += 1
            idx = perm[i:i + batch]
            logits = head(x[idx])
            loss = (1 - distill) * torch.nn.functional.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
            if distill > 0:
                t = temperature
                loss = loss + distill * t * t * torch.nn.functional.kl_div(
                    torch.log_softmax(logits / t, 1), torch.log_softmax(tz[idx] / t, 1), log_target=True,
                    reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return lin.weight.detach().numpy().astype(np.float32), lin.bias.detach().numpy().astype(np.float32)


def with_head(model: Any, gemm: Any, w: np.ndarray, b: np.ndarray) -> Any:
    from onnx import numpy_helper

    m = _copy(model)
    inits = {i.name: i for i in m.graph.initializer}
    trans_b = _attr(gemm, "transB", 0)
    inits[gemm.input[1]].CopyFrom(numpy_helper.from_array(w if trans_b else w.T.copy(), gemm.input[1]))
    inits[gemm.input[2]].CopyFrom(numpy_helper.from_array(b, gemm.input[2]))
    return m


def head_weights(model: Any, gemm: Any) -> tuple[np.ndarray, np.ndarray]:
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float32)
    if not _attr(gemm, "transB", 0):
        w = w.T.copy()
    return w, numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float32)




# ------------------------------------------------------------------------------ learned weight rounding

def layer_io(model: Any, nodes: list[Any], batches: Iterable[np.ndarray], threads: int | None = None,
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FP32 inputs and outputs of ``nodes`` over ``batches`` (one pass, all layers at once)."""
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    sess, inp = probe_session(model, names, threads)
    total = sum(len(x) for x in batches)
    cat: dict[str, np.ndarray] = {}
    at = 0
    for x in batches:  # written into preallocated arrays: no second copy for a concatenation
        for t, v in zip(names, sess.run(names, {inp: x})):
            if t not in cat:
                cat[t] = np.empty((total, *v.shape[1:]), v.dtype)
            cat[t][at:at + len(v)] = v
        at += len(x)
    return {n.name: (cat[n.input[0]], cat[n.output[0]]) for n in nodes}


def _io_groups(nodes: list[Any], per_image: dict[str, int], images: int, cap_bytes: int) -> list[list[Any]]:
    """``nodes`` (in their order) cut into consecutive groups whose inputs and outputs for ``images`` images
    fit in ``cap_bytes`` (a layer bigger than the cap is a group of its own)."""
    groups: list[list[Any]] = []
    size = 0
    for n in nodes:
        b = per_image[n.name] * images
        if groups and size + b <= cap_bytes:
            groups[-1].append(n)
            size += b
        else:
            groups.append([n])
            size = b
    return groups


def _layer_forward(n: Any, inits: dict[str, Any]) -> tuple[np.ndarray, int, Any]:
    """(FP32 weight, its channel axis, fwd(x, w) with the layer's own bias) of a Conv/Gemm, in torch."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
    b = torch.from_numpy(numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)) if len(n.input) > 2 else None
    if n.op_type == "Conv":
        stride, dil = _attr(n, "strides", [1, 1]), _attr(n, "dilations", [1, 1])
        pads, groups = _attr(n, "pads", [0, 0, 0, 0]), _attr(n, "group", 1)

        def fwd(x: Any, wq: Any) -> Any:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            return F.conv2d(x, wq, b, stride, 0, dil, groups)
    else:
        trans_b = _attr(n, "transB", 0)

        def fwd(x: Any, wq: Any) -> Any:
            return F.linear(x, wq if trans_b else wq.t(), b)
    return w, _weight_axis(n), fwd


# An 8-bit activation grid over +-4 sigma adds noise of (8/255)^2/12 ~ 8e-5 of the output's variance; a layer
# whose nearest weight rounding adds less than an eighth of that is not worth learning.
ADAROUND_MIN_REL_ERROR = 1e-5


def adaround(model: Any, batches: list[np.ndarray], budget_s: float = 60.0, min_iters: int = 50,
             max_iters: int = 1000, reg: float = 0.01, threads: int | None = None, seed: int = 0,
             min_rel_error: float = ADAROUND_MIN_REL_ERROR, memory_mib: float = 256,
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Learned weight rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
    Quantization"; loss and annealing as in AIMET): per Conv/Gemm, choose each weight's rounding (down or
    up, same per-channel scales) to reconstruct the layer's FP32 output on calibration images.

    Where weight rounding costs accuracy, within ``budget_s`` seconds of wall time in all (data passes
    included): every layer's nearest-rounding output error relative to its output variance is measured
    first; layers below ``min_rel_error`` keep nearest rounding, the others are learned worst first, each
    given the time left divided by the layers left, until the budget is spent (a layer still learning
    then stops and is judged as it stands; the overrun is one iteration and one evaluation). A learned rounding is kept only where it reconstructs the
    output better than nearest rounding. Layer inputs and outputs are held for at most ``memory_mib`` MiB at
    a time (layers are learned in groups, one network pass per group).
    Returns {weight initializer: int8 array} for quantize_model's ``weight_overrides`` and a report."""
    import time

    import torch

    t_start = time.perf_counter()
    deadline = t_start + budget_s
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
             and (len(n.input) < 3 or n.input[2] in inits)]
    n_img = sum(len(x) for x in batches)
    # bytes per image of every layer's input + output, from a one-image pass
    one = layer_io(model, nodes, [batches[0][:1]], threads)
    per_image = {k: a.nbytes + b.nbytes for k, (a, b) in one.items()}
    del one
    cap = int(memory_mib * 2 ** 20)
    # 1. what nearest rounding costs each layer, on as many images as fit in the memory cap
    score_img = int(np.clip(cap // max(1, sum(per_image.values())), 1, n_img))
    flat = np.concatenate(batches)

    def passes(group: list[Any], images: int) -> list[np.ndarray]:
        """``images`` images in batches whose fetched tensors take at most a quarter of the cap per run."""
        k = int(np.clip(cap // 4 // max(1, sum(per_image[n.name] for n in group)), 1, 8))
        return [flat[i:min(i + k, images)] for i in range(0, images, k)]

    cost: dict[str, float] = {}
    with torch.no_grad():
        for group in _io_groups(nodes, per_image, score_img, cap):
            io = layer_io(model, group, passes(group, score_img), threads)
            for n in group:
                w, axis, fwd = _layer_forward(n, inits)
                q, s = quantize_weight(w, axis)
                x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in io[n.name])
                wq = torch.from_numpy((q.astype(np.float32) * per_channel(s, w.ndim, axis)).astype(np.float32))
                cost[n.name] = float((fwd(x, wq) - y).pow(2).mean() / (y.var() + 1e-12))
            del io
    chosen = sorted((n for n in nodes if cost[n.name] >= min_rel_error), key=lambda n: -cost[n.name])
    # 2. learn the chosen layers, worst first, in groups that fit in memory
    zeta, gamma = 1.1, -0.1
    out: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(seed)
    done = groups = 0
    for group in _io_groups(chosen, per_image, n_img, cap):
        if time.perf_counter() >= deadline:
            break
        groups += 1
        io = layer_io(model, group, passes(group, n_img), threads)
        for n in group:
            now = time.perf_counter()
            if now >= deadline:
                break
            # 85%: the data passes and each layer's final evaluation come out of the same budget
            per_layer = 0.85 * (deadline - now) / (len(chosen) - done)
            done += 1
            w, axis, fwd = _layer_forward(n, inits)
            q_near, s = quantize_weight(w, axis)
            W, S = torch.from_numpy(w), torch.from_numpy(per_channel(s, w.ndim, axis))
            x_all, y_all = (torch.from_numpy(np.ascontiguousarray(a)) for a in io[n.name])
            floor = torch.floor(W / S)
            rest = (W / S - floor).clamp(1e-4, 1 - 1e-4)
            V = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
            opt = torch.optim.Adam([V], lr=1e-2)

            def h() -> Any:
                return torch.clamp(torch.sigmoid(V) * (zeta - gamma) + gamma, 0, 1)

            def rec(wq: Any, idx: Any) -> Any:
                d = fwd(x_all[idx], wq) - y_all[idx]
                return d.pow(2).sum(1).mean()

            t0 = time.perf_counter()
            it, iters_cap = 0, max_iters
            bs = min(8, len(x_all))
            while it < iters_cap:
                idx = torch.randint(0, len(x_all), (bs,), generator=g)
                frac = it / iters_cap
                beta = 20 - (20 - 2) * max(0.0, (frac - 0.2) / 0.8)
                wq = S * torch.clamp(floor + h(), -127, 127)
                loss = rec(wq, idx)
                if frac >= 0.2:  # warm-up without the rounding regulariser, then anneal beta 20 -> 2
                    loss = loss + reg * (1 - (2 * h() - 1).abs().pow(beta)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                it += 1
                if it == min_iters:  # set this layer's iteration count from the time the first ones took
                    per_it = (time.perf_counter() - t0) / it
                    iters_cap = int(np.clip(per_layer / max(per_it, 1e-6), min_iters, max_iters))
                if time.perf_counter() >= deadline:  # budget spent: stop here, judged against nearest below
                    break
            with torch.no_grad():
                q = torch.clamp(floor + (h() >= 0.5).float(), -127, 127)
                q_n = torch.from_numpy(q_near.astype(np.float32))
                chunks = [torch.arange(i, min(i + 8, len(x_all))) for i in range(0, len(x_all), 8)]
                err_ada = float(sum(float(rec(S * q, c)) * len(c) for c in chunks) / len(x_all))
                err_near = float(sum(float(rec(S * q_n, c)) * len(c) for c in chunks) / len(x_all))
            if err_ada < err_near:  # keep nearest rounding where learning did not help
                out[n.input[1]] = q.numpy().astype(np.int8)
            layers.append({"layer": n.name, "rel_error_nearest": cost[n.name], "iters": it,
                           "recon_error_nearest": err_near, "recon_error_learned": min(err_ada, err_near),
                           "kept": err_ada < err_near})
        del io
    report = {"layers": len(nodes), "costly": len(chosen), "learned": len(layers), "improved": len(out),
              "not_reached": len(chosen) - len(layers), "min_rel_error": min_rel_error,
              "seconds": round(time.perf_counter() - t_start, 1), "budget_s": budget_s, "images": n_img,
              "scoring_images": score_img, "memory_mib": memory_mib, "data_passes": groups,
              "mean_iters": float(np.mean([r["iters"] for r in layers])) if layers else 0.0,
              "recon_error_nearest": float(np.sum([r["recon_error_nearest"] for r in layers])),
              "recon_error_learned": float(np.sum([r["recon_error_learned"] for r in layers])),
              "per_layer": layers}
    return out, report


# --------------------------------------------------------------------------- empirical bias correction

def _linear_region(model: Any, q: Any, t: str) -> tuple[float, float]:
    """The interval of layer output ``t`` in which the INT8 network passes it on unchanged: inside its
    activation's linear part (ReLU, Clip) and inside the range of the Q/DQ that follows (in ``q``)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in list(model.graph.initializer) + list(q.graph.initializer)}
    consumers = consumers_of(model)
    lo, hi, post = -np.inf, np.inf, t
    cons = consumers.get(t, [])
    if len(cons) == 1 and cons[0].op_type in ("Relu", "Clip"):
        act = cons[0]
        lo = 0.0 if act.op_type == "Relu" else -np.inf
        if act.op_type == "Clip":
            if len(act.input) > 1 and act.input[1] in inits:
                lo = float(inits[act.input[1]])
            if len(act.input) > 2 and act.input[2] in inits:
                hi = float(inits[act.input[2]])
        post = act.output[0]
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == post:
            scale, zp = float(inits[n.input[1]]), inits[n.input[2]]
            qmin, qmax = (-128, 127) if zp.dtype == np.int8 else (0, 255)
            lo = max(lo, (qmin - float(zp)) * scale)
            hi = min(hi, (qmax - float(zp)) * scale)
            break
    return lo, hi


def _masked_shift(qs: Any, fs: Any, inp: str, t: str, region: tuple[float, float], batches: list[np.ndarray],
                  feeds: dict[str, np.ndarray] | None = None, min_count: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean of (INT8 - FP32) output ``t`` where the FP32 value lies in ``region``; channels with
    fewer than ``min_count`` such values get 0. Returns (shift, channel has enough values)."""
    lo, hi = region
    s = cnt = 0
    for x in batches:
        yq = qs.run([t], {inp: x, **(feeds or {})})[0]
        yf = fs.run([t], {inp: x})[0]
        mask = (yf > lo) & (yf < hi)
        axes = tuple(i for i in range(yf.ndim) if i != 1)
        s = s + np.where(mask, yq - yf, 0).astype(np.float64).sum(axis=axes)
        cnt = cnt + mask.sum(axis=axes)
    ok = np.asarray(cnt) >= min_count
    return np.where(ok, s / np.maximum(cnt, 1), 0.0), ok


def layer_shifts(fp32: Any, q: Any, batches: list[np.ndarray], threads: int | None = None) -> dict[str, float]:
    """Mean |per-channel output shift| of every Conv/Gemm of the quantized ``q`` against ``fp32``, measured
    as empirical bias correction measures it (what it removes)."""
    outs = [n.output[0] for n in weighted_nodes(fp32)]
    qs, inp = probe_session(q, outs, threads)
    fs, _ = probe_session(fp32, outs, threads)
    return {t: float(np.abs(_masked_shift(qs, fs, inp, t, _linear_region(fp32, q, t), batches)[0]).mean())
            for t in outs}


def empirical_bias_correct(model: Any, quantize: Any, batches: list[np.ndarray], threads: int | None = None,
                           min_count: int = 16) -> tuple[Any, dict[str, Any]]:
    """Empirical bias correction (Nagel et al. 2019 sec. 4.2, empirical variant as in AIMET's
    ``correct_bias``): layer by layer in graph order, run the quantized network (``quantize(model)``, with
    the corrections so far) and the FP32 one on the same calibration images and subtract the mean
    difference of the layer's outputs, per channel, from its bias. Unlike the analytic form it also removes
    the shift that activation quantization causes, most of the INT8 error in depthwise networks.
    The mean is taken only where the FP32 output lies in the region the INT8 network passes on unchanged
    (the activation's linear part and the next quantizer's range): the error of clipped values is not a
    shift, and correcting it would move every unclipped value. One session for each network: a correction
    is a graph input added to its layer's output."""
    import time

    from onnx import TensorProto, helper, numpy_helper

    t0 = time.perf_counter()
    inits = {i.name: i for i in model.graph.initializer}
    shapes = {n.output[0]: [1, numpy_helper.to_array(inits[n.input[2]]).shape[0]] + ([1, 1] if n.op_type == "Conv" else [])
              for n in weighted_nodes(model)}
    outs = list(shapes)
    q = quantize(model)
    region = {t: _linear_region(model, q, t) for t in outs}
    nodes_out = []
    for n in q.graph.node:  # layer output t becomes t__raw + t__corr, a graph input fed the correction so far
        nodes_out.append(n)
        t = n.output[0] if n.output else None
        if t in shapes:
            n.output[0] = f"{t}__raw"
            nodes_out.append(helper.make_node("Add", [f"{t}__raw", f"{t}__corr"], [t], name=f"{t}__corr_add"))
            q.graph.input.append(helper.make_tensor_value_info(f"{t}__corr", TensorProto.FLOAT, shapes[t]))
    del q.graph.node[:]
    q.graph.node.extend(nodes_out)
    qs, inp = probe_session(q, outs, threads)
    fs, _ = probe_session(model, outs, threads)
    corr = {t: np.zeros(shapes[t], np.float32) for t in outs}
    before, used = [], []
    for t in outs:
        feeds = {f"{k}__corr": v for k, v in corr.items()}
        d, ok = _masked_shift(qs, fs, inp, t, region[t], batches, feeds, min_count)
        before.append(float(np.abs(d).mean()))
        used.append(float(ok.mean()))
        corr[t] = (corr[t] - d.reshape(shapes[t])).astype(np.float32)
    m = _copy(model)
    minits = {i.name: i for i in m.graph.initializer}
    for n in weighted_nodes(m):
        b = numpy_helper.to_array(minits[n.input[2]]).astype(np.float64) + corr[n.output[0]].reshape(-1)
        minits[n.input[2]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), n.input[2]))
    return m, {"layers": len(outs), "mean_abs_shift": float(np.mean(before)) if before else 0.0,
               "channels_corrected": float(np.mean(used)) if used else 0.0, "images": sum(len(b) for b in batches),
               "seconds": round(time.perf_counter() - t0, 1), "mode": "empirical"}
