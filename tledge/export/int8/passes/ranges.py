"""Form pass: the activation range rule (--method auto: the one whose INT8 logits are closest to FP32 on
the judge images; never chosen on val, which only judges the result)."""
from __future__ import annotations

from tledge.export.config import METHODS, ExportConfig
from tledge.export.int8.context import FormState, Int8Context
from tledge.export.int8.plan import PassRecord
from tledge.export.int8.select import best_of, fmt_scores


class Ranges:
    name = "ranges"

    def escalates(self, cfg: ExportConfig) -> bool:
        return False

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        return True, "always"

    def run(self, state: FormState, ctx: Int8Context) -> PassRecord:
        r = ctx.replayed(state.form)
        if r is not None:
            state.method = r.method
            return PassRecord(self.name, state.form, f"method {state.method}", f"replayed from {ctx.replay.source}")
        methods = METHODS if ctx.cfg.calib.method == "auto" else (ctx.cfg.calib.method,)
        if len(methods) == 1:
            state.method = methods[0]
            return PassRecord(self.name, state.form, f"method {state.method}", "--method")
        cands = {m: state.copy(method=m) for m in methods}
        best, _, scores = best_of(ctx, cands, ctx.quantize, f"ranges ({state.form})")
        state.method = best
        return PassRecord(self.name, state.form, f"method {best}", "closest to FP32 on the judge images: "
                          + fmt_scores(scores), scores=scores)
