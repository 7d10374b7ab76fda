"""INT8 export as a recorded plan of passes (see plan.py): calibration samples and statistics, the Q/DQ
forms, the passes, the gate. ``build_int8`` is the one entry point the export pipeline calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tledge import card as card_mod
from tledge.console import note, warn
from tledge.errors import AccuracyError
from tledge.evalset import EvalSet
from tledge.export import artefacts
from tledge.export import onnx as onnx_io
from tledge.export.config import ExportConfig
from tledge.export.int8.context import Int8Context
from tledge.export.int8.gate import gate
from tledge.export.int8.plan import Plan
from tledge.export.int8.quantize import activation_quantizers, centre_pad_nodes, centred_offsets, check_tensorrt_qdq
from tledge.export.int8.samples import calibration_samples, judge_split
from tledge.fsutil import write_json


def build_int8(run: Path, card: dict[str, Any], cfg: ExportConfig, fp32: Any, rep: Any, evalset: EvalSet,
               ref: np.ndarray, plan: Plan | None = None, dest: Path | None = None, replay: Any = None
               ) -> dict[str, Any]:
    """Run the plan, gate each form on val, write the INT8 graphs and calib/calibration.json into ``dest``
    (default ``run``; the export passes its staging folder; statistics stay cached under ``run``). Returns the
    manifest's ``int8`` section: the plan, every pass record, per form the kept recipe and the gate. ``replay``
    (int8.replay.Replay, --replay): every decision is taken from it instead of made."""
    plan = plan or Plan.default()
    pre = card_mod.preprocess_of(card)
    samples, where = calibration_samples(card, cfg.calib, rep)
    note(f"calibration: {len(samples)} images from {where}")
    with EvalSet(samples, pre, label="calibration images") as calib:
        x = calib.pre.finish(np.asarray(calib.x))  # normalised: the INT8 passes work on the FP32 graph's input
    judge_idx, fit_idx = judge_split(len(x), cfg.calib.judge_images)
    ctx = Int8Context(cfg, base=fp32, judge=x[judge_idx], fit=x[fit_idx],
                      calib_batches=[x[i:i + 32] for i in range(0, len(x), 32)], card=card,
                      train_samples=list(rep.train), run=Path(run), calib_ids=[s.sha256 for s in samples],
                      replay=replay)
    ctx.set_reference()
    note(f"calibration: {len(judge_idx)} images judge, {len(fit_idx)} are for fits")
    section: dict[str, Any] = {"plan": plan.announce(cfg), "calibration_source": where,
                               "judge_images": int(len(judge_idx)), "fit_images": int(len(fit_idx))}
    if replay is not None:
        note(f"INT8: replaying the decisions of {replay.source}: nothing is chosen anew, only the values are "
             "computed here")
        section["replay"] = replay.to_dict()
    section["graph"] = [r.to_dict() for r in plan.run_graph(ctx)]
    calib_rec = next(r for r in section["graph"] if r["name"] == "calibrate")["details"]
    section["forms"], section["gate"], files, ranges = {}, {}, {}, {}
    try:
        for form in cfg.quant.forms:
            state, record = plan.run_form(form, ctx)
            rescue = None
            if cfg.quant.qat == "on":
                record["qat"] = run_qat(state, ctx)
            elif cfg.quant.qat == "auto":
                rescue = lambda s: run_qat(s, ctx)  # noqa: E731 - only when the gate misses --max-drop
            q, report = gate(ctx, state, evalset, ref, rescue=rescue)
            if state.rounding_name == "qat":
                section.setdefault("qat", {})[form] = save_qat(ctx, form, Path(dest or run))
            record["centre"] = centre_record(ctx, state, q, record)
            if form == "tensorrt":
                problems = check_tensorrt_qdq(q)
                if problems:
                    raise AccuracyError(f"internal error: the TensorRT-form graph is not valid explicit "
                                        f"quantization: {problems[:3]}", "report this bug.")
            onnx_io.set_metadata(q, {**onnx_io.metadata(card), "tledge.precision": f"int8-{form}",
                                     "tledge.calibration": calib_rec["key"]})
            p = Path(dest or run) / artefacts.int8_file(form)
            onnx_io.save_model(q, p)
            files[form] = onnx_io.file_info([p])
            section["forms"][form] = record
            section["gate"][form] = report
            ranges[form] = qdq_ranges(q)
        refit_reference(ctx, section, evalset, ref)
    finally:
        if "train" in ctx.cache:
            ctx.cache["train"].close()
    write_json(Path(dest or run) / artefacts.CALIBRATION, {"key": calib_rec["key"], "source": where, "images": len(samples),
                                                   "percentile": cfg.calib.percentile, "forms": ranges})
    section["calibration"] = {**calib_rec, "source": where}
    section["files"] = files
    return section


def centre_record(ctx: Int8Context, state: Any, q: Any, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """How many of the kept graph's activation quantizers are centred (``mode``: the centring the kept recipe has;
    ``asked``: --centre), said in one line; with
    --centre exact, when the kept recipe (``record``: the plan's record of the form) misses --target-agreement
    on the judge images and --centre padded would centre more quantizers, a hint that says how many."""
    mode = ctx.centre_of(state)
    offsets = centred_offsets(q)
    act = [n.input[0] for n in activation_quantizers(q)]
    centred = [t for t in act if t in offsets]
    pads = len(centre_pad_nodes(q))
    replayed = ctx.replay.forms.get(state.form) if ctx.replay is not None else None
    recorded = replayed.centred if replayed is not None else None
    if recorded is not None and recorded != len(centred):
        warn(f"INT8 {state.form}: the replayed export centred {recorded} activation quantizers, this tledge centres "
             f"{len(centred)} (--centre {mode}; its rules changed since): the graph differs from the recorded one "
             "there. Export without --replay for this version's own decisions.")
    if mode != "off" and state.form == "tensorrt":
        how = f"--centre {mode}" if ctx.cfg.quant.centre == mode else f"--centre {ctx.cfg.quant.centre}: {mode}"
        note(f"INT8 {state.form}: {len(centred)} of {len(act)} activation quantizers centred on their range "
             f"({how}{f', {pads} Pad nodes added' if pads else ''})")
    out = {"mode": mode, "asked": ctx.cfg.quant.centre, "centred": len(centred), "quantizers": len(act),
           "pad_nodes": pads}
    if ctx.cfg.quant.centre == "exact" and state.form == "tensorrt" and record is not None:
        from tledge.export.int8.passes.pads import pad_explicitly
        kept = record.get("kept", "cheap")
        agreement = record.get("scores", {}).get(kept, record.get("check", {})).get("agreement")
        missed = agreement is not None and agreement < ctx.cfg.quant.target_agreement
        more = len(pad_explicitly(ctx.base)[1]) if missed else 0  # (a copy of the graph: only when it can matter)
        if more:
            out["padded_would_add"] = more
            note(f"INT8 {state.form}: the kept recipe agrees with FP32 on {agreement:.1%} of the judge images "
                 f"(target {ctx.cfg.quant.target_agreement:.0%}); --centre padded would centre {more} more "
                 f"quantizers (the inputs of convolutions that pad) through {more} Pad nodes, whose cost on the "
                 "device is not measured: compare both with tledge bench there")
    return out


def run_qat(state: Any, ctx: Int8Context) -> dict[str, Any]:
    from tledge.export.int8.passes.qat import Qat
    from tledge.export.int8.plan import run_timed
    return run_timed(Qat().run, state, ctx).to_dict()


def save_qat(ctx: Int8Context, form: str, dest: Path) -> dict[str, Any]:
    """The QAT weights of ``form`` as their own artefact (safetensors: float weights and biases by initializer
    name, activation scales), written atomically into the export's staging folder."""
    from safetensors.numpy import save_file

    from tledge.fsutil import atomic_path, sha256_file
    tensors = ctx.cache.pop(("qat", form))
    p = dest / artefacts.qat_file(form)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata={"tledge.form": form, "tledge.kind": "qat"})
    return {"file": artefacts.qat_file(form), "tensors": len(tensors), "sha256": sha256_file(p)}


def refit_reference(ctx: Int8Context, section: dict[str, Any], evalset: EvalSet, ref: np.ndarray) -> None:
    """Beside each form's drop against PyTorch, its drop against the FP32 model given the same head refit:
    quantization alone, without what the refit itself adds or takes (issue 15 item 9). Said when the two
    differ by a point or more."""
    from tledge.evalset import compare
    from tledge.export.int8.passes.head_refit import fp32_refit_logits

    refitted = [f for f, rec in section["forms"].items()
                if any(r["name"] == "head_refit" and r["decision"].startswith("head re-fitted")
                       for stage in ("cheap", "expensive") for r in rec.get(stage, []))]
    if not refitted:
        return
    logits = fp32_refit_logits(ctx, evalset)
    if logits is None:
        return
    base = compare(logits, ref, evalset.labels)
    effect = -base["drop_points"] + 0.0  # (+0.0: never "-0.00") what the refit alone does to FP32's val top-1
    for form in refitted:
        final = section["gate"][form]["final"]
        quant = round((base["top1"] - final["top1"]) * 100, 4)
        section["gate"][form]["refit_reference"] = {"fp32_refit_top1": base["top1"], "refit_effect_points": effect,
                                                    "quantization_drop_points": quant}
        msg = (f"INT8 {form}: against the FP32 model given the same head refit (val top-1 {base['top1']:.4f}), "
               f"quantization alone costs {quant:.2f} pt; the refit itself moves FP32 by {effect:+.2f} pt")
        if abs(effect) >= 1.0:
            warn(msg + f": the drop against PyTorch ({final['drop_points']:.2f} pt) mixes both (a short tune's head "
                 "trains further in the refit)")
        else:
            note(msg)


def qdq_ranges(q: Any) -> dict[str, dict[str, float]]:
    """Scale and zero-point of every activation quantizer of ``q``."""
    from onnx import numpy_helper
    inits = {i.name: i for i in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            s = float(numpy_helper.to_array(inits[n.input[1]]))
            z = int(numpy_helper.to_array(inits[n.input[2]]))
            out[n.input[0]] = {"scale": s, "zero_point": z}
    return out
