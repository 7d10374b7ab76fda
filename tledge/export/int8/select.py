"""Score the candidates, keep the best, record the scores: the one selection rule of the INT8 export."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from tledge.console import progress
from tledge.export.int8.context import Int8Context


def best_of(ctx: Int8Context, candidates: Mapping[str, Any], quantize: Callable[[Any], Any],
            label: str = "candidates", known: Mapping[str, dict[str, float]] | None = None,
            ) -> tuple[str, Any, dict[str, dict[str, float]]]:
    """The candidate whose INT8 graph (``quantize(candidate)``) has logits closest to FP32 (lowest MSE)
    on the judge images; ties go to the first listed (the cheaper one, by convention). ``known``: scores
    already measured for some candidates (not measured again). Returns (name, candidate, {name: {mse,
    agreement}})."""
    scores: dict[str, dict[str, float]] = {}
    with progress() as prog:
        task = prog.add_task(label, total=len(candidates), info="")
        for name, cand in candidates.items():
            scores[name] = dict(known[name]) if known and name in known else ctx.score(quantize(cand))
            prog.advance(task)
    best = min(scores, key=lambda k: scores[k]["mse"])
    return best, candidates[best], scores


def fmt_scores(scores: Mapping[str, Mapping[str, float]]) -> str:
    return ", ".join(f"{k} {v['mse']:.4g} ({v['agreement']:.1%})" for k, v in scores.items())
