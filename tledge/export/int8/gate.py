"""The accuracy gate: measure each INT8 graph's top-1 drop on val against PyTorch and, when it exceeds
--max-drop, keep the most damaging *quantizers* in float until it does not.

The damage of each activation quantizer is estimated in one pass of the INT8 graph over the judge
images: the relative error its Q/DQ adds to the tensor it quantizes (what clipping and rounding do to
that tensor, E[(dq(q(x)) - x)^2] / E[x^2]). Removing a quantizer removes exactly the operation that does
the damage, whatever kernels a CPU fuses it into (keeping a *node* in float left the CPU form's output
quantizers in place). One network run for the ranking, then one quantize + val run per fallback step
(1, 2, 4 ... quantizers).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tledge.console import note, progress, warn
from tledge.errors import AccuracyError
from tledge.evalset import EvalSet, compare
from tledge.export import ort
from tledge.export.int8.context import FormState, Int8Context


def quantizer_errors(q: Any, batches: list[np.ndarray], threads: int | None = None) -> list[tuple[str, float]]:
    """(activation tensor, relative error its quantizer adds) for every activation Q/DQ pair of ``q``, from
    one run over ``batches``; the most damaging first (ties by name, so the order is reproducible)."""
    inits = {i.name for i in q.graph.initializer}
    pairs = [(n.input[0], n.output[0]) for n in q.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    deq = {n.input[0]: n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    sites = [(t, deq[qo]) for t, qo in pairs if qo in deq]
    names = sorted({x for s in sites for x in s})
    sess, inp = ort.probe_session(q, names, threads)
    err = {t: 0.0 for t, _ in sites}
    energy = {t: 0.0 for t, _ in sites}
    for x in batches:
        vals = dict(zip(names, sess.run(names, {inp: x})))
        for t, d in sites:
            v = vals[t].astype(np.float64)
            err[t] += float(((vals[d] - v) ** 2).sum())
            energy[t] += float((v ** 2).sum())
    return sorted(((t, err[t] / max(energy[t], 1e-30)) for t, _ in sites), key=lambda p: (-p[1], p[0]))


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
    ranked = quantizer_errors(q, ctx.judge_batches(), ctx.threads)
    report["ranking"] = [{"tensor": t, "rel_error": e} for t, e in ranked[:32]]
    limit = max(1, int(len(ranked) * g.max_fallback_fraction))
    k, best = 1, res
    while True:
        keep = tuple(t for t, _ in ranked[:k])
        cand = state.copy(float_tensors=keep)
        q = ctx.quantize(cand)
        r = val_result(q, evalset, ref, ctx.threads, f"val INT8 ({form}, {k} in float)")
        report["steps"].append({"kept_float": k, "drop_points": r["drop_points"],
                                "top1_agreement": r["top1_agreement"]})
        note(f"  keeping the {k} most damaging quantizer(s) in float: drop {r['drop_points']:.2f} pt")
        if r["drop_points"] < best["drop_points"]:
            best = r
        if r["drop_points"] <= g.max_drop:
            state.float_tensors = keep
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
