"""Graph pass: onnxruntime's basic-level folding of the FP32 graph, as ``quant_pre_process`` does (shape
arithmetic such as EfficientNet-Lite's run-time padding is computed once, not on every inference). Kept
only if the FP32 logits stay within float tolerance."""
from __future__ import annotations

from tledge.console import warn
from tledge.export import onnx as onnx_io
from tledge.export.config import ExportConfig
from tledge.export.int8.context import Int8Context
from tledge.export.int8.plan import PassRecord


class FoldShapes:
    name = "fold"

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        return True, "always: folding is exact or not kept"

    def run(self, ctx: Int8Context) -> PassRecord:
        before = len(ctx.base.graph.node)
        folded = onnx_io.fold_shapes(ctx.base)
        diff, same = ctx.fp32_diff(folded)
        if not same:
            warn(f"onnxruntime's constant folding changed the FP32 outputs (max |logit diff| {diff:.3g}); "
                 "quantizing the graph as exported")
            return PassRecord(self.name, "graph", "not applied", f"FP32 logits moved by {diff:.3g}",
                              details={"fp32_max_abs_logit_diff": diff})
        ctx.base = folded
        return PassRecord(self.name, "graph", f"{before} -> {len(folded.graph.node)} nodes",
                          details={"nodes_before": before, "nodes_after": len(folded.graph.node),
                                   "fp32_max_abs_logit_diff": diff})
