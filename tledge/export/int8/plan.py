"""The INT8 plan: passes with one small interface, sequenced, printed and recorded pass by pass.

A pass has a ``name``, says whether the options enable it (``enabled(cfg) -> (bool, why)``) and runs:
graph-wide passes on the context (``run(ctx) -> PassRecord``: the FP32 graph both forms start from, the
statistics), per-form passes on a ``FormState`` (``run(state, ctx) -> PassRecord``).

The default plan is cheap: ranges, bias correction (analytic or empirical, judged) and the head refit. Only
when that misses ``--target-agreement`` (top-1 agreement with FP32 on the judge images, calibration images no
fit saw) do the expensive passes run (learned rounding, then the cheap passes again on its rounding), as a
second candidate recipe;
the one closer to FP32 on the judge images is kept, and the record says why each ran. (AIMET's
AutoQuant applies its techniques against an accuracy goal in the same way.)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tledge.console import note
from tledge.export.config import ExportConfig
from tledge.export.int8.context import FormState, Int8Context
from tledge.export.int8.select import best_of, fmt_scores


@dataclass
class PassRecord:
    name: str
    scope: str                                   # "graph" or the form
    decision: str                                # what the pass did or chose, one line
    why: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0                         # for the record only: no decision ever reads it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GraphPass(Protocol):
    name: str

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]: ...
    def run(self, ctx: Int8Context) -> PassRecord: ...


class FormPass(Protocol):
    name: str

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]: ...
    def escalates(self, cfg: ExportConfig) -> bool:
        """In the expensive recipe: whether this pass does something the cheap recipe did not (only then
        is escalating worth its cost)."""
    def run(self, state: FormState, ctx: Int8Context) -> PassRecord: ...


def run_timed(fn: Any, *args: Any) -> PassRecord:
    t0 = time.perf_counter()
    rec = fn(*args)
    rec.seconds = round(time.perf_counter() - t0, 3)
    note(f"  [{rec.scope}] {rec.name}: {rec.decision}" + (f" ({rec.why})" if rec.why else "")
         + f" [{rec.seconds:.1f} s]")
    return rec


@dataclass
class Plan:
    graph: list[GraphPass]
    cheap: list[FormPass]
    expensive: list[FormPass]

    @classmethod
    def default(cls) -> "Plan":
        from tledge.export.int8 import passes as p
        return cls(graph=[p.FoldShapes(), p.Equalize(), p.ExplicitPads(), p.Calibrate()],
                   cheap=[p.Ranges(), p.BiasCorrection(), p.HeadRefit()],
                   expensive=[p.LearnedRounding(), p.BiasCorrection(), p.HeadRefit()])

    def describe(self, cfg: ExportConfig) -> dict[str, list[dict[str, Any]]]:
        """Every pass of the plan, whether the options enable it and why (printed before the work)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for stage, passes in (("graph", self.graph), ("cheap", self.cheap), ("expensive", self.expensive)):
            out[stage] = [dict(zip(("pass", "enabled", "why"), (p.name, *p.enabled(cfg)))) for p in passes]
        q = cfg.quant
        out["escalation"] = [{"mode": q.escalate, "target_agreement": q.target_agreement,
                              "judge_images": cfg.calib.judge_images}]
        return out

    def announce(self, cfg: ExportConfig) -> dict[str, Any]:
        d = self.describe(cfg)
        for stage in ("graph", "cheap", "expensive"):
            parts = [p["pass"] + ("" if p["enabled"] else " (off)") for p in d[stage]]
            note(f"INT8 plan, {stage}: " + " -> ".join(parts))
        q = cfg.quant
        when = {"auto": f"when a form's cheap recipe agrees with FP32 on < {q.target_agreement:.0%} of the judge "
                        "images", "on": "always (--escalate on)", "off": "never (--escalate off)"}[q.escalate]
        note(f"INT8 plan: expensive passes run {when}")
        return d

    def run_graph(self, ctx: Int8Context) -> list[PassRecord]:
        recs = []
        for p in self.graph:
            on, why = p.enabled(ctx.cfg)
            recs.append(run_timed(p.run, ctx) if on else PassRecord(p.name, "graph", "skipped", why))
        return recs

    def _run_form_passes(self, passes: list[FormPass], state: FormState, ctx: Int8Context) -> list[PassRecord]:
        recs = []
        for p in passes:
            on, why = p.enabled(ctx.cfg)
            recs.append(run_timed(p.run, state, ctx) if on else PassRecord(p.name, state.form, "skipped", why))
        return recs

    def run_form(self, form: str, ctx: Int8Context) -> tuple[FormState, dict[str, Any]]:
        """The cheap recipe, the check against the target, and (when it misses) the expensive recipe;
        returns the kept recipe and the record."""
        from tledge.export.int8.quantize import FORMS
        q = ctx.cfg.quant
        auto = q.centre == "auto" and FORMS[form].symmetric and has_centre_pads(ctx.base)
        replayed = ctx.replayed(form)
        first = (replayed.centre_mode or "exact") if auto and replayed is not None else "exact"
        cheap = FormState(form, ctx.base, centre=first if q.centre == "auto" else None)
        record: dict[str, Any] = {"cheap": [r.to_dict() for r in self._run_form_passes(self.cheap, cheap, ctx)]}
        score = ctx.score(ctx.quantize(cheap))
        if auto and replayed is None:
            cheap, score = self._centre_choice(form, ctx, cheap, score, record)
        expensive_on = [p.name for p in self.expensive if p.enabled(ctx.cfg)[0] and p.escalates(ctx.cfg)]
        if replayed is not None:
            run, why = replayed.escalate, f"replayed from {ctx.replay.source}"
        elif q.escalate == "off":
            run, why = False, "--escalate off"
        elif not expensive_on:
            run, why = False, "no expensive pass is enabled"
        elif q.escalate == "on":
            run, why = True, "--escalate on"
        elif score["agreement"] < q.target_agreement:
            run, why = True, (f"cheap recipe agrees with FP32 on {score['agreement']:.1%} of the judge images, "
                              f"below the {q.target_agreement:.0%} target")
        else:
            run, why = False, (f"cheap recipe agrees with FP32 on {score['agreement']:.1%} of the judge images, "
                               f"target {q.target_agreement:.0%} met")
        record["check"] = {**score, "escalate": run, "why": why}
        note(f"INT8 {form}: expensive passes {'run' if run else 'not run'}: {why}")
        if not run:
            record["kept"] = "cheap"
            return cheap, record
        exp = FormState(form, ctx.base, method=cheap.method, stage="expensive", centre=cheap.centre)
        record["expensive"] = [r.to_dict() for r in self._run_form_passes(self.expensive, exp, ctx)]
        if replayed is not None:
            name = replayed.kept
            kept = {"cheap": cheap, "expensive": exp}[name]
            record.update(kept=name, scores={"cheap": score})
            note(f"INT8 {form}: {name} recipe kept (replayed from {ctx.replay.source})")
            return kept, record
        name, kept, scores = best_of(ctx, {"cheap": cheap, "expensive": exp}, ctx.quantize, f"judge recipes ({form})",
                                     known={"cheap": score})
        record.update(kept=name, scores=scores)
        note(f"INT8 {form}: {name} recipe kept (logit MSE, agreement on judge images: {fmt_scores(scores)})")
        return kept, record

    def _centre_choice(self, form: str, ctx: Int8Context, exact: FormState, score: dict[str, float],
                       record: dict[str, Any]) -> tuple[FormState, dict[str, float]]:
        """--centre auto: when the exact-centred cheap recipe misses --target-agreement on the judge images, the
        cheap recipe again with padded centring (the pads graph pass's Pad nodes), and the one closer to FP32 on
        the judge images kept (record["centre_choice"]; the kept one's passes become record["cheap"])."""
        q = ctx.cfg.quant
        if score["agreement"] >= q.target_agreement:
            why = (f"exact agrees with FP32 on {score['agreement']:.1%} of the judge images, target "
                   f"{q.target_agreement:.0%} met")
            record["centre_choice"] = {"kept": "exact", "why": why}
            return exact, score
        note(f"INT8 {form}: exact centring agrees with FP32 on {score['agreement']:.1%} of the judge images, below "
             f"the {q.target_agreement:.0%} target: the cheap recipe again with padded centring (--centre auto)")
        padded = FormState(form, ctx.base, centre="padded")
        padded_recs = [r.to_dict() for r in self._run_form_passes(self.cheap, padded, ctx)]
        name, kept, scores = best_of(ctx, {"exact": exact, "padded": padded}, ctx.quantize,
                                     f"judge centring ({form})", known={"exact": score})
        why = f"logit MSE, agreement on judge images: {fmt_scores(scores)}"
        record["centre_choice"] = {"kept": name, "why": why, "scores": scores,
                                   "other": record["cheap"] if name == "padded" else padded_recs}
        if name == "padded":
            record["cheap"] = padded_recs
        note(f"INT8 {form}: {name} centring kept ({why})")
        return kept, scores[name]


def has_centre_pads(model: Any) -> bool:
    """Whether the pads graph pass put Pad nodes into ``model`` (what padded centring adds to exact)."""
    from tledge.export.int8.quantize import centre_pad_nodes
    # (the plan's unit tests run it on stand-in numbers, which have no graph)
    return getattr(model, "graph", None) is not None and bool(centre_pad_nodes(model))
