"""The accuracy gate: measure each INT8 graph's top-1 drop on val against PyTorch and, when it exceeds
--max-drop, keep the most damaging *quantizers* in float until it does not.

The damage of each activation quantizer is estimated in one forward and one backward pass of the INT8
graph over the judge images (the graph interpreted in torch, as QAT trains it): with L the squared logit
difference to FP32 and e = dq(q(a)) - a the error the quantizer adds to its tensor a, removing it changes L
by about -<dL/d dq(q(a)), e> (first-order Taylor). That ranks by what each quantizer does to the *network's
output*. The previous ranking, the relative error a quantizer adds to its own tensor
(E[e^2] / E[a^2]), is what remains for graphs the torch interpreter does not cover; measured on the demo
(mobilenet_v2 224 px, TensorRT form, no head refit, 1,000 val images), keeping its top 1/2/4/8 in float
left the drop at 2.5-3.4 pt, the Taylor ranking's top 8 brought it from 2.1 to 0.5 pt.
Removing a quantizer removes exactly the operation that does the damage, whatever kernels a CPU fuses it
into (keeping a *node* in float left the CPU form's output quantizers in place). One ranking, then one
quantize + val run per fallback step (1, 2, 4 ... quantizers).
When the form's head was re-fitted (head_refit), each fallback step re-fits it on the features of *that*
candidate: the head fitted to the fully quantized backbone is the wrong head once quantizers go back to
float. Measured (efficientnet_lite0 224 px, TensorRT form): without it the fallback made the val drop worse,
1.20 pt fully quantized, 1.7-1.8 pt with 1 to 14 quantizers in float, and the export failed.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tledge.console import note, progress, warn
from tledge.errors import AccuracyError
from tledge.evalset import EvalSet, compare
from tledge.export import ort
from tledge.export.int8.context import FormState, Int8Context
from tledge.export.int8.quantize import activation_quantizers, centred_offsets


def quantizer_errors(q: Any, batches: list[np.ndarray], threads: int | None = None) -> list[tuple[str, float]]:
    """(activation tensor, relative error its quantizer adds) for every activation Q/DQ pair of ``q``, from
    one run over ``batches``; the most damaging first (ties by name, so the order is reproducible)."""
    pairs = [(n.input[0], n.output[0]) for n in activation_quantizers(q)]
    deq = {n.input[0]: n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    sites = [(t, deq[qo]) for t, qo in pairs if qo in deq]
    names = sorted({x for s in sites for x in s})
    sess, inp = ort.probe_session(q, names, threads)
    offsets = centred_offsets(q)  # relative to the tensor's FP32 value, not its centred one
    err = {t: 0.0 for t, _ in sites}
    energy = {t: 0.0 for t, _ in sites}
    for x in batches:
        vals = dict(zip(names, sess.run(names, {inp: x})))
        for t, d in sites:
            v = vals[t].astype(np.float64)
            err[t] += float(((vals[d] - v) ** 2).sum())
            energy[t] += float(((v + offsets.get(t, 0.0)) ** 2).sum())
    return sorted(((t, err[t] / max(energy[t], 1e-30)) for t, _ in sites), key=lambda p: (-p[1], p[0]))


def quantizer_sensitivity(q: Any, batches: list[np.ndarray], refs: list[np.ndarray],
                          advance: Callable[[int], None] | None = None) -> list[tuple[str, float]]:
    """(activation tensor, estimated decrease of the summed squared logit difference to ``refs`` if its
    quantizer were removed) for every activation Q/DQ pair of ``q``, largest first (ties by name). One
    forward and backward pass of ``q`` interpreted in torch per batch, on a fixed number of torch threads
    (the estimate then does not depend on --threads). Raises UsageError for ops the interpreter lacks."""
    import torch

    from tledge.export.int8.context import torch_threads
    from tledge.export.int8.passes.qat import build

    qnodes = activation_quantizers(q)
    net = build(q)
    for p in net.parameters():
        p.requires_grad_(False)
    score = {n.input[0]: 0.0 for n in qnodes}
    with torch_threads(), torch.enable_grad():
        for x, r in zip(batches, refs):
            env: dict[str, Any] = {}
            z = net(torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True), trace=env)
            loss = ((z - torch.from_numpy(r)) ** 2).sum()
            outs = [env[n.output[0]] for n in qnodes]
            for n, d, g in zip(qnodes, outs, torch.autograd.grad(loss, outs)):
                score[n.input[0]] += float((g.double() * (d - env[n.input[0]]).detach().double()).sum())
            if advance:
                advance(len(x))
    return sorted(score.items(), key=lambda p: (-p[1], p[0]))


def ranked_quantizers(ctx: Int8Context, q: Any, form: str) -> tuple[list[tuple[str, float]], str]:
    """The gate's ranking of ``q``'s activation quantizers, most damaging first, and how it was made."""
    from tledge.errors import UsageError
    # batches of 8: the trace keeps every tensor of the batch for the backward pass (about 1 GB at 32 images of
    # mobilenet_v2 at 224 px); the sums do not depend on the batch size beyond float order, which is fixed
    try:
        with progress() as prog:
            task = prog.add_task(f"ranking the quantizers ({form})", total=len(ctx.judge), info="")
            return quantizer_sensitivity(q, ctx.judge_batches(8), ctx.judge_ref_batches(8),
                                         lambda n: prog.advance(task, n)), "taylor"
    except UsageError as e:
        note(f"gate: ranking quantizers by the error each adds to its own tensor ({e.what})")
        return quantizer_errors(q, ctx.judge_batches(), ctx.threads), "relative-error"


def val_result(q: Any, evalset: EvalSet, ref: np.ndarray, threads: int | None, label: str) -> dict[str, float]:
    with progress() as prog:
        task = prog.add_task(label, total=len(evalset), info="")
        z = ort.logits(q, evalset.batches(32), threads, lambda n: prog.advance(task, n))
    return compare(z, ref, evalset.labels)


def gate(ctx: Int8Context, state: FormState, evalset: EvalSet, ref: np.ndarray,
         rescue: Callable[[FormState], dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """Quantize, measure the val drop, and keep the most damaging quantizers in float until the drop is
    within --max-drop. ``rescue`` (``--qat auto``) runs first when the drop is missed: it changes ``state``
    in place (fine-tuning through the quantizers) and returns its record; the fallback follows only if the
    drop is still missed. Raises AccuracyError (saying how far it got) when it cannot."""
    g, form = ctx.cfg.gate, state.form
    q = ctx.quantize(state)
    res = val_result(q, evalset, ref, ctx.threads, f"val INT8 ({form})")
    report: dict[str, Any] = {"method": state.method, "rounding": state.rounding_name, "initial": res,
                              "kept_float": [], "steps": []}
    note(f"INT8 {form} ({state.method}): val top-1 {res['top1']:.4f}, drop {res['drop_points']:.2f} pt, "
         f"agreement with FP32 {res['top1_agreement']:.2%} (limit {g.max_drop} pt)")
    replayed = ctx.replayed(form)
    if replayed is not None:
        return _replayed_gate(ctx, state, q, evalset, ref, report, replayed.kept_float)
    if res["drop_points"] > g.max_drop and rescue is not None:
        note(f"INT8 {form}: {res['drop_points']:.2f} pt misses --max-drop {g.max_drop}: fine-tuning through the "
             "quantizers (--qat auto) before keeping any in float")
        report["rescue"] = rescue(state)
        q = ctx.quantize(state)
        res = val_result(q, evalset, ref, ctx.threads, f"val INT8 ({form}, after QAT)")
        report["after_rescue"] = res
        note(f"INT8 {form} after QAT: val top-1 {res['top1']:.4f}, drop {res['drop_points']:.2f} pt, agreement "
             f"with FP32 {res['top1_agreement']:.2%}")
    if res["drop_points"] <= g.max_drop:
        report["final"] = res
        return q, report
    if not g.fallback:
        raise AccuracyError(f"INT8 {form} loses {res['drop_points']:.2f} points of top-1 (limit --max-drop "
                            f"{g.max_drop}) and --no-fallback forbids keeping layers in float.",
                            "allow the fallback, raise --max-drop, or use --fp16.")
    ranked, how = ranked_quantizers(ctx, q, form)
    report["ranking_method"] = how
    report["ranking"] = [{"tensor": t, "score": e} for t, e in ranked[:32]]
    note(f"INT8 {form}: most damaging quantizers ({how}): " + ", ".join(t for t, _ in ranked[:3]))
    limit = max(1, int(len(ranked) * g.max_fallback_fraction))
    k, best = 1, res
    while True:
        keep = tuple(t for t, _ in ranked[:k])
        cand = state.copy(float_tensors=keep)
        refit = _refit_for(ctx, cand)
        q = ctx.quantize(cand)
        r = val_result(q, evalset, ref, ctx.threads, f"val INT8 ({form}, {k} in float)")
        report["steps"].append({"kept_float": k, "drop_points": r["drop_points"],
                                "top1_agreement": r["top1_agreement"], "head_refit": refit})
        note(f"  keeping the {k} most damaging quantizer(s) in float{' (head re-fitted)' if refit else ''}: "
             f"drop {r['drop_points']:.2f} pt")
        if r["drop_points"] < best["drop_points"]:
            best = r
        if r["drop_points"] <= g.max_drop:
            state.model, state.rounding, state.float_tensors = cand.model, cand.rounding, keep
            report.update(kept_float=list(keep), final=r)
            warn(f"INT8 {form}: kept {k} of {len(ranked)} activation quantizers in float to stay within "
                 f"{g.max_drop} pt: {', '.join(keep)}")
            return q, report
        if k >= limit:
            break
        k = min(limit, k * 2)
    raise AccuracyError(
        f"INT8 {form} cannot stay within --max-drop {g.max_drop}: {res['drop_points']:.2f} pt fully quantized, "
        f"best {best['drop_points']:.2f} pt with up to {limit} of {len(ranked)} quantizers in float.",
        "raise --max-drop, try another --method, --escalate on, calibrate on more or better images (--calib), "
        "or use --fp16.")


def _replayed_gate(ctx: Int8Context, state: FormState, q: Any, evalset: EvalSet, ref: np.ndarray,
                   report: dict[str, Any], keep: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """--replay: the recorded quantizers in float, nothing ranked; the drop is still measured and held to
    --max-drop (a replay on this machine that misses it fails, as the export would)."""
    from tledge.export.int8.replay import mismatch
    g, form, src = ctx.cfg.gate, state.form, ctx.replay.source
    res = report["initial"]
    if keep:
        have = {n.input[0] for n in activation_quantizers(q)}
        unknown = [t for t in keep if t not in have]
        if unknown:
            raise mismatch(f"it keeps quantizers in float that this {form}-form graph does not have: "
                           f"{', '.join(unknown[:3])}", src)
        state.float_tensors = tuple(keep)
        refit = _refit_for(ctx, state)
        q = ctx.quantize(state)
        res = val_result(q, evalset, ref, ctx.threads, f"val INT8 ({form}, {len(keep)} in float)")
        report["steps"].append({"kept_float": len(keep), "drop_points": res["drop_points"],
                                "top1_agreement": res["top1_agreement"], "head_refit": refit})
        note(f"INT8 {form}: {len(keep)} quantizer(s) kept in float (replayed from {src}): drop "
             f"{res['drop_points']:.2f} pt")
    if res["drop_points"] > g.max_drop:
        raise AccuracyError(f"INT8 {form} replayed from {src} loses {res['drop_points']:.2f} points of top-1 here "
                            f"(limit --max-drop {g.max_drop}).",
                            "export without --replay to decide anew on this machine, or raise --max-drop.")
    report.update(kept_float=list(keep), final=res, replayed_from=src)
    return q, report


def _refit_for(ctx: Int8Context, state: FormState) -> bool:
    """Re-fit ``state``'s head on the features of its graph with its quantizers kept in float, when the plan
    re-fits heads (in place; the same images, recipe and seed as the head_refit pass, starting from the head
    that pass fitted). Whether it did."""
    from tledge.export.int8.passes.head_refit import HeadRefit
    refit = HeadRefit()
    on, _ = refit.enabled(ctx.cfg)
    if not on or state.rounding_name == "qat":  # QAT trained the head through the quantizers; its artefact is saved
        return False
    return refit.run(state, ctx).decision.startswith("head re-fitted")
