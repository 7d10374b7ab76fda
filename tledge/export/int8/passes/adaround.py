"""Form pass (expensive): learned weight rounding (AdaRound, Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization"; loss and annealing as in AIMET).

Per Conv/Gemm, each weight is rounded up or down (same per-channel scales) to reconstruct the layer's
FP32 output on the fit images. Budgets count layers and iterations, never seconds: every layer's
nearest-rounding output error relative to its output variance is measured first; the ``max_layers``
worst above ``min_rel_error`` are learned, ``iters`` iterations each (batch 8 of 16x16 output windows, annealed regulariser).
The rounding is learned once (on the FP32 graph both forms share) and each form keeps it only if its
INT8 logits come closer to FP32 on the judge images than with nearest rounding: reconstruction from
FP32 inputs does not see activation quantization, so it need not help every form.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from tledge.console import progress, status
from tledge.export.config import ExportConfig
from tledge.export.graph import attr
from tledge.export.int8.context import FormState, Int8Context, torch_threads
from tledge.export.int8.plan import PassRecord
from tledge.export.int8.quantize import per_channel, quantize_weight, weight_axis
from tledge.export.int8.select import best_of, fmt_scores
from tledge.export.ort import probe_session

# An 8-bit activation grid over +-4 sigma adds noise of (8/255)^2/12 ~ 8e-5 of the output's variance; a layer
# whose nearest weight rounding adds less than an eighth of that is not worth learning.
MIN_REL_ERROR = 1e-5


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


def io_groups(nodes: list[Any], per_image: dict[str, int], images: int, cap_bytes: int) -> list[list[Any]]:
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


def window_sampler(n: Any, inits: dict[str, Any], x_all: Any, y_all: Any, size: int, g: Any) -> tuple[Any, Any]:
    """For a Conv: (sample(idx) -> (input window, output window), fwd_valid(x, w)): a random ``size`` x
    ``size`` window of the outputs and the padded input window that produces exactly it with an unpadded
    conv. Learning on windows keeps an iteration's cost independent of the image size. Other layers:
    whole samples and their own forward."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    if n.op_type != "Conv" or y_all.ndim != 4:
        _, _, fwd = layer_forward(n, inits)
        return (lambda idx: (x_all[idx], y_all[idx])), fwd
    stride, dil = attr(n, "strides", [1, 1]), attr(n, "dilations", [1, 1])
    pads, groups = attr(n, "pads", [0, 0, 0, 0]), attr(n, "group", 1)
    kh, kw = numpy_helper.to_array(inits[n.input[1]]).shape[2:]
    b = torch.from_numpy(numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)) if len(n.input) > 2 else None
    x_pad = F.pad(x_all, (pads[1], pads[3], pads[0], pads[2]))
    ho, wo = y_all.shape[2], y_all.shape[3]
    h, w = min(ho, size), min(wo, size)
    ext_h, ext_w = (h - 1) * stride[0] + (kh - 1) * dil[0] + 1, (w - 1) * stride[1] + (kw - 1) * dil[1] + 1

    def sample(idx: Any) -> tuple[Any, Any]:
        oy = int(torch.randint(0, ho - h + 1, (1,), generator=g))
        ox = int(torch.randint(0, wo - w + 1, (1,), generator=g))
        iy, ix = oy * stride[0], ox * stride[1]
        return x_pad[idx, :, iy:iy + ext_h, ix:ix + ext_w], y_all[idx, :, oy:oy + h, ox:ox + w]

    def fwd_valid(x: Any, wq: Any) -> Any:
        return F.conv2d(x, wq, b, stride, 0, dil, groups)
    return sample, fwd_valid


def layer_forward(n: Any, inits: dict[str, Any]) -> tuple[np.ndarray, int, Any]:
    """(FP32 weight, its channel axis, fwd(x, w) with the layer's own bias) of a Conv/Gemm, in torch."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
    b = torch.from_numpy(numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)) if len(n.input) > 2 else None
    if n.op_type == "Conv":
        stride, dil = attr(n, "strides", [1, 1]), attr(n, "dilations", [1, 1])
        pads, groups = attr(n, "pads", [0, 0, 0, 0]), attr(n, "group", 1)

        def fwd(x: Any, wq: Any) -> Any:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            return F.conv2d(x, wq, b, stride, 0, dil, groups)
    else:
        trans_b = attr(n, "transB", 0)

        def fwd(x: Any, wq: Any) -> Any:
            return F.linear(x, wq if trans_b else wq.t(), b)
    return w, weight_axis(n), fwd


def adaround(model: Any, batches: list[np.ndarray], iters: int = 2000, max_layers: int = 64, reg: float = 0.01,
             threads: int | None = None, seed: int = 0, min_rel_error: float = MIN_REL_ERROR,
             memory_mib: float = 256, batch: int = 8, window: int = 16) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Learned rounding of the ``max_layers`` layers that nearest rounding costs most (relative output
    error above ``min_rel_error``), ``iters`` iterations each. Layer inputs and outputs are held for at
    most ``memory_mib`` MiB at a time (layers learned in groups, one network pass per group). torch runs
    on a fixed TORCH_THREADS threads: the result does not depend on the core count. Returns {weight initializer: int8
    array} for quantize_model's ``weight_overrides`` and a report. Learned on ``model`` with the ``pads`` graph
    pass's Pads given back (quantize.without_centre_pads): the same function, so the same rounding whether or not
    the pass ran. (With the Pads, the larger layer inputs left the ranking 18 scoring images within ``memory_mib``
    instead of 19, which swapped two layers in the learning order and with them the random windows: another
    rounding, and mobilenet_v2's CPU form at 112 px lost 1.8 pt on val instead of 1.0; 2026-12-03.)"""
    import torch

    from tledge.export.int8.quantize import without_centre_pads
    model = without_centre_pads(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
             and (len(n.input) < 3 or n.input[2] in inits)]
    n_img = sum(len(x) for x in batches)
    one = layer_io(model, nodes, [batches[0][:1]], threads)
    per_image = {k: a.nbytes + b.nbytes for k, (a, b) in one.items()}
    del one
    cap = int(memory_mib * 2 ** 20)
    score_img = int(np.clip(cap // max(1, sum(per_image.values())), 1, n_img))
    flat = np.concatenate(batches)

    def passes(group: list[Any], images: int) -> list[np.ndarray]:
        k = int(np.clip(cap // 4 // max(1, sum(per_image[n.name] for n in group)), 1, 8))
        return [flat[i:min(i + k, images)] for i in range(0, images, k)]

    cost: dict[str, float] = {}
    zeta, gamma = 1.1, -0.1
    out: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    # ranking the layers by nearest rounding's error (one FP32 pass per group of layers), under a bar
    with torch_threads(), torch.no_grad(), progress() as prog:
        task = prog.add_task("learned rounding: ranking layers", total=len(nodes), info="")
        for group in io_groups(nodes, per_image, score_img, cap):
            io = layer_io(model, group, passes(group, score_img), threads)
            for n in group:
                w, axis, fwd = layer_forward(n, inits)
                q, s = quantize_weight(w, axis)
                x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in io[n.name])
                wq = torch.from_numpy((q.astype(np.float32) * per_channel(s, w.ndim, axis)).astype(np.float32))
                cost[n.name] = float((fwd(x, wq) - y).pow(2).mean() / (y.var() + 1e-12))
            del io
            prog.advance(task, len(group))
    costly = sorted((n for n in nodes if cost[n.name] >= min_rel_error), key=lambda n: (-cost[n.name], n.name))
    chosen = costly[:max_layers]
    g = torch.Generator().manual_seed(seed)
    groups = 0
    with torch_threads(), progress() as prog:
        task = prog.add_task("learned rounding", total=len(chosen) * iters, info="")
        for group in io_groups(chosen, per_image, n_img, cap):
            groups += 1
            io = layer_io(model, group, passes(group, n_img), threads)
            for n in group:
                w, axis, fwd = layer_forward(n, inits)
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

                sample, fwd_win = window_sampler(n, inits, x_all, y_all, window, g)

                bs = min(batch, len(x_all))
                first = last = 0.0
                for it in range(iters):
                    idx = torch.randint(0, len(x_all), (bs,), generator=g)
                    frac = it / iters
                    beta = 20 - (20 - 2) * max(0.0, (frac - 0.2) / 0.8)
                    wq = S * torch.clamp(floor + h(), -127, 127)
                    xs, ys = sample(idx)
                    loss = (fwd_win(xs, wq) - ys).pow(2).sum(1).mean()
                    if it == 0:
                        first = loss.item()
                    last = loss.item()
                    if frac >= 0.2:  # warm-up without the rounding regulariser, then anneal beta 20 -> 2
                        loss = loss + reg * (1 - (2 * h() - 1).abs().pow(beta)).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if it % 50 == 49 or it == iters - 1:
                        prog.advance(task, it % 50 + 1)
                with torch.no_grad():
                    q = torch.clamp(floor + (h() >= 0.5).float(), -127, 127)
                    q_n = torch.from_numpy(q_near.astype(np.float32))
                    chunks = [torch.arange(i, min(i + 8, len(x_all))) for i in range(0, len(x_all), 8)]
                    err_ada = float(sum(float(rec(S * q, c)) * len(c) for c in chunks) / len(x_all))
                    err_near = float(sum(float(rec(S * q_n, c)) * len(c) for c in chunks) / len(x_all))
                if err_ada < err_near:  # keep nearest rounding where learning did not help
                    out[n.input[1]] = q.numpy().astype(np.int8)
                layers.append({"layer": n.name, "rel_error_nearest": cost[n.name], "iters": iters,
                               "recon_error_nearest": err_near, "recon_error_learned": min(err_ada, err_near),
                               "first_batch_loss": first, "last_batch_loss": last, "kept": err_ada < err_near})
            del io
    report = {"layers": len(nodes), "costly": len(costly), "learned": len(layers), "improved": len(out),
              "not_learned": len(costly) - len(layers), "max_layers": max_layers, "iters": iters,
              "min_rel_error": min_rel_error, "images": n_img, "scoring_images": score_img,
              "memory_mib": memory_mib, "data_passes": groups,
              "recon_error_nearest": float(np.sum([r["recon_error_nearest"] for r in layers])),
              "recon_error_learned": float(np.sum([r["recon_error_learned"] for r in layers])),
              "window": window, "batch": batch, "per_layer": layers}
    return out, report


class LearnedRounding:
    name = "learned_rounding"

    def escalates(self, cfg: ExportConfig) -> bool:
        return cfg.quant.adaround

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        q = cfg.quant
        if not q.adaround:
            return False, "--no-adaround"
        return True, f"{q.adaround_layers} costliest layers at most, {q.adaround_iters} iterations each"

    def run(self, state: FormState, ctx: Int8Context) -> PassRecord:
        q = ctx.cfg.quant
        r = ctx.replayed(state.form)
        if r is not None and r.rounding in ("not learned", "nearest rounding"):
            # nothing to learn: the recorded export kept nearest rounding (or never learned)
            return PassRecord(self.name, state.form, r.rounding, f"replayed from {ctx.replay.source}")
        if r is None and q.escalate == "auto":
            # Learned rounding reconstructs each layer's FP32 output from FP32 inputs: its ideal is the FP32
            # weights. When even those (activations INT8) miss the target on the judge images, its minutes
            # are not spent (--escalate on still learns). Measured on the demo at 224 px: learned once for
            # both forms, 191 s of a 430 s export, and the TensorRT form did not keep it.
            with status(f"INT8 {state.form}: learned rounding's bound, the judge images with every weight in FP32"):
                bound = ctx.weight_bound(state)
            if bound["agreement"] < q.target_agreement:
                return PassRecord(self.name, state.form, "not learned",
                                  f"with every weight in FP32 (activations INT8) the judge images agree with FP32 "
                                  f"on {bound['agreement']:.1%}, below the {q.target_agreement:.0%} target: "
                                  "learned rounding, whose ideal is the FP32 weights, would not reach it on its "
                                  "own (--escalate on learns it anyway)",
                                  scores={"weights_fp32": bound})
        if "adaround" not in ctx.cache:  # learned once on the shared FP32 graph; each form judges it
            fit = ctx.fit_subset(q.adaround_images)
            ctx.cache["adaround"] = adaround(ctx.base, [fit[i:i + 8].copy() for i in range(0, len(fit), 8)],
                                             q.adaround_iters, q.adaround_layers, threads=ctx.threads)
        learned, info = ctx.cache["adaround"]
        details = {k: v for k, v in info.items() if k != "per_layer"}
        if r is not None:
            if r.rounding != "learned rounding" or not learned:
                from tledge.export.int8.replay import mismatch
                raise mismatch(f"it records learned rounding {r.rounding!r} for the {state.form} form, and here "
                               f"{'no layer improved' if not learned else 'rounding was learned'}", ctx.replay.source)
            state.rounding, state.rounding_name = learned, "learned"
            details["per_layer"] = info["per_layer"]
            return PassRecord(self.name, state.form, "learned rounding", f"replayed from {ctx.replay.source}",
                              details=details)
        if not learned:
            return PassRecord(self.name, state.form, "nearest rounding", "no layer improved", details=info)
        cands = {"nearest": state.copy(), "learned": state.copy(rounding=learned, rounding_name="learned")}
        best, kept, scores = best_of(ctx, cands, ctx.quantize, f"learned rounding ({state.form})")
        state.rounding, state.rounding_name = kept.rounding, kept.rounding_name
        details["per_layer"] = info["per_layer"]
        return PassRecord(self.name, state.form, f"{best} rounding",
                          f"{info['improved']}/{info['learned']} learned layers improved their reconstruction "
                          f"({info['recon_error_nearest']:.3g} -> {info['recon_error_learned']:.3g}); judge: "
                          + fmt_scores(scores), scores=scores, details=details)
