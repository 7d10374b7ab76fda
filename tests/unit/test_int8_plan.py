"""The INT8 plan's logic without ONNX: when the expensive recipe runs, what is recorded, which recipe is
kept; the judge/fit split; option validation; the calibration histogram's binning."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from tledge.errors import UsageError
from tledge.export.config import ExportConfig, Int8Config
from tledge.export.int8.calibrate import TensorStats
from tledge.export.int8.context import FormState
from tledge.export.int8.plan import PassRecord, Plan
from tledge.export.int8.samples import judge_split


class FakePass:
    """Sets ``state.model`` to a number: the judge score of a state is that number (lower = closer)."""

    def __init__(self, name: str, value: float, escalates: bool = False, on: bool = True) -> None:
        self.name, self.value, self._esc, self.on = name, value, escalates, on

    def enabled(self, cfg: ExportConfig) -> tuple[bool, str]:
        return self.on, "test"

    def escalates(self, cfg: ExportConfig) -> bool:
        return self._esc

    def run(self, state: FormState, ctx: Any) -> PassRecord:
        state.model = self.value
        return PassRecord(self.name, state.form, f"set {self.value}")


class FakeCtx:
    def __init__(self, cfg: ExportConfig, agreement_of: dict[float, float], replay: Any = None) -> None:
        self.cfg, self.base, self.agreement_of, self.replay = cfg, 0.0, agreement_of, replay
        self.scored: list[float] = []

    def replayed(self, form: str) -> Any:
        return self.replay.forms[form] if self.replay is not None else None

    def quantize(self, state: FormState) -> float:
        return state.model

    def score(self, model: float) -> dict[str, float]:
        self.scored.append(model)
        return {"mse": model, "agreement": self.agreement_of[model]}


def _plan(expensive_value: float = 0.5, escalates: bool = True) -> Plan:
    return Plan(graph=[], cheap=[FakePass("ranges", 1.0)],
                expensive=[FakePass("learned_rounding", expensive_value, escalates=escalates)])


@pytest.mark.parametrize("mode, agreement, target, runs", [
    ("auto", 0.90, 0.96, True), ("auto", 0.97, 0.96, False), ("on", 0.99, 0.96, True), ("off", 0.5, 0.96, False),
])
def test_expensive_recipe_runs_only_when_asked_or_the_target_is_missed(mode: str, agreement: float, target: float,
                                                                      runs: bool) -> None:
    cfg = ExportConfig(int8=True, quant=Int8Config(escalate=mode, target_agreement=target))
    ctx = FakeCtx(cfg, {1.0: agreement, 0.5: 0.99})
    state, rec = _plan().run_form("tensorrt", ctx)
    assert rec["check"]["escalate"] is runs and rec["check"]["agreement"] == agreement
    assert ("expensive" in rec) is runs
    assert rec["kept"] == ("expensive" if runs else "cheap") and state.model == (0.5 if runs else 1.0)
    assert rec["check"]["why"]  # the log and the manifest say why


def test_cheaper_recipe_is_kept_when_the_expensive_one_is_not_closer() -> None:
    cfg = ExportConfig(int8=True, quant=Int8Config(escalate="on"))
    state, rec = _plan(expensive_value=1.0).run_form("cpu", FakeCtx(cfg, {1.0: 0.9}))
    assert rec["kept"] == "cheap" and set(rec["scores"]) == {"cheap", "expensive"}  # a tie goes to the cheap one


def test_no_escalation_when_no_expensive_pass_adds_anything() -> None:
    cfg = ExportConfig(int8=True, quant=Int8Config(escalate="on"))
    _, rec = _plan(escalates=False).run_form("cpu", FakeCtx(cfg, {1.0: 0.5}))
    assert not rec["check"]["escalate"] and rec["check"]["why"] == "no expensive pass is enabled"


def test_default_plan_describes_every_pass() -> None:
    d = Plan.default().describe(ExportConfig(int8=True, quant=Int8Config(adaround=False)))
    assert [p["pass"] for p in d["graph"]] == ["fold", "cle", "pads", "calibrate"]
    assert {p["pass"]: p["enabled"] for p in d["graph"]}["pads"] is True    # --centre auto (the default), padded
    exact = Plan.default().describe(ExportConfig(int8=True, quant=Int8Config(centre="exact")))
    assert {p["pass"]: p["enabled"] for p in exact["graph"]}["pads"] is False
    assert [p["pass"] for p in d["cheap"]] == ["ranges", "bias_correction", "head_refit"]
    assert {p["pass"]: p["enabled"] for p in d["expensive"]}["learned_rounding"] is False


@pytest.mark.parametrize("n, judge", [(260, 128), (100, 128), (7, 128), (1, 4)])
def test_judge_and_fit_images_are_disjoint_and_fixed(n: int, judge: int) -> None:
    j, f = judge_split(n, judge)
    assert len(j) == min(judge, n // 2) or n < 2
    if n >= 2:
        assert set(j).isdisjoint(f) and len(j) + len(f) == n
    j2, f2 = judge_split(n, judge)
    assert np.array_equal(j, j2) and np.array_equal(f, f2)


@pytest.mark.parametrize("change, match", [
    ({"adaround_layers": 0}, "--adaround-layers 0"), ({"refit_count": 0}, "--refit-count 0"),
    ({"bias_correction": "both"}, "unknown bias correction mode 'both'"),
    ({"centre": "all"}, "unknown --centre mode 'all'"),
])
def test_bad_options_are_refused(change: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ExportConfig(int8=True, quant=replace(Int8Config(), **change)).validate()


def test_histogram_bins_match_numpy_and_leave_out_zeros() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32), np.zeros(500, np.float32)])
    st = TensorStats()
    st.update(x)
    pos = np.histogram(x[x > 0], st.bins, (0.0, st.hmax))[0]
    neg = np.histogram(-x[x < 0], st.bins, (0.0, st.hmax))[0]
    # a value exactly on a bin edge may fall on either side; elsewhere the counts are numpy's
    assert np.abs(st.pos - pos).sum() <= 2 and np.abs(st.neg - neg).sum() <= 2
    assert st.pos.sum() + st.neg.sum() == 10000


@pytest.mark.parametrize("escalate, kept", [(True, "cheap"), (True, "expensive"), (False, "cheap")])
def test_a_replay_escalates_and_keeps_as_recorded(escalate: bool, kept: str) -> None:
    """--replay: whether the expensive recipe runs and which recipe is kept come from the record, not from the
    judge images (here the cheap recipe meets the target and the expensive one scores better: a fresh export
    would not escalate, and escalating would keep the expensive recipe)."""
    from tledge.export.int8.replay import FormDecisions, Replay
    d = FormDecisions(method="minmax", bias={}, bias_layers={}, escalate=escalate, rounding="nearest rounding",
                      kept=kept, kept_float=())
    ctx = FakeCtx(ExportConfig(int8=True), {1.0: 0.99, 0.5: 0.999}, Replay("m.json", {"cpu": d}))
    state, record = _plan().run_form("cpu", ctx)
    assert record["check"]["escalate"] is escalate and "replayed from m.json" in record["check"]["why"]
    assert record["kept"] == kept and ("expensive" in record) is escalate
    assert state.model == (0.5 if kept == "expensive" else 1.0)
    assert ctx.scored == [1.0]  # the cheap recipe's check only (recorded): no recipe was judged


@pytest.mark.parametrize("kept, escalate", [("cheapest", True), ("expensive", False)])
def test_a_replayed_manifest_with_an_impossible_recipe_is_refused(kept: str, escalate: bool) -> None:
    from tledge.errors import UsageError
    from tledge.export.int8.replay import _form
    rec = {"cheap": [{"name": "ranges", "decision": "method minmax"}], "check": {"escalate": escalate}, "kept": kept}
    with pytest.raises(UsageError, match="incomplete"):
        _form(rec, {}, "m.json")
