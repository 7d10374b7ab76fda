"""`tledge export` on a real tuned run: graphs, manifest, calibration cache, accuracy gate, Q/DQ form
checks, and the TensorRT path's behaviour without TensorRT."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tledge import card as card_mod
from tledge.cli import main
from tledge.data import scan
from tledge.errors import AccuracyError, DataError, MissingDependency, UsageError
from tledge.evalset import EvalSet, run_logits
from tledge.export import tensorrt as trtb
from tledge.export.config import METHODS
from tledge.export.int8 import calibrate as cal
from tledge.export.int8.context import FormState, Int8Context
from tledge.export.int8.gate import gate, quantizer_sensitivity
from tledge.export.pipeline import run_export
from tledge.export.int8.quantize import FORMS, activation_tensors, check_tensorrt_qdq, quantizable_nodes, quantize_model
from tledge.fsutil import read_json
from tests.conftest import copy_run, export_cfg


@pytest.fixture
def run(default_run_64: Path, tmp_path: Path) -> Path:
    return copy_run(default_run_64, tmp_path / "run")


def test_export_writes_checked_graphs_and_manifest(run: Path) -> None:
    m = run_export(run, export_cfg(fp16=True))
    for f in ("model.onnx", "model.fp16.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx", "export_manifest.json",
              "calib/calibration.json"):
        assert (run / f).is_file(), f
    assert set(m["artefacts"]) == {"fp32", "fp16", "int8-tensorrt", "int8-cpu"}
    fp32 = m["checks"]["fp32"]
    assert fp32["n"] == 1000 and fp32["top1_agreement"] >= 0.999 and fp32["max_abs_logit_diff"] < 1e-3
    assert m["checks"]["fp16"]["top1_agreement"] > 0.98
    assert m["calibration"]["source"].endswith("calibration/fashion-mnist") and m["calibration"]["images"] == 260
    for form in ("tensorrt", "cpu"):
        rep = m["checks"][f"int8-{form}"]
        ranges = m["int8"]["forms"][form]["cheap"][0]
        assert ranges["name"] == "ranges" and set(ranges["scores"]) == set(METHODS)
        assert rep["method"] == ranges["decision"].split()[-1] == min(ranges["scores"], key=lambda k: ranges["scores"][k]["mse"])
        assert rep["final"]["n"] == 1000
        assert rep["final"]["top1_agreement"] > 0.8
    trt_graph = onnx.load(str(run / "model.int8.trt.onnx"))
    cpu_graph = onnx.load(str(run / "model.int8.cpu.onnx"))
    assert check_tensorrt_qdq(trt_graph) == []
    # the check can fail: the CPU form's unsigned, asymmetric activations are rejected
    problems = check_tensorrt_qdq(cpu_graph)
    assert any("not INT8" in p for p in problems) and any("non-zero zero-point" in p for p in problems)
    assert m["engines"]["int8"]["built"] is False and m["engines"]["fp16"]["built"] is False
    props = {p.key: p.value for p in trt_graph.metadata_props}
    assert props["tledge.precision"] == "int8-tensorrt" and "tledge.classes" in props


def test_calibration_cache_hit_and_miss(run: Path) -> None:
    cfg = export_cfg(forms=("cpu",), calib={"method": "minmax"}, head_refit=False)
    a = run_export(run, cfg)
    b = run_export(run, cfg)
    assert a["calibration"]["cache"] == "miss" and b["calibration"]["cache"] == "hit"
    assert a["calibration"]["key"] == b["calibration"]["key"]
    c = run_export(run, export_cfg(forms=("cpu",), calib={"method": "minmax", "count": 100}, head_refit=False))
    assert c["calibration"]["cache"] == "miss" and c["calibration"]["key"] != a["calibration"]["key"]
    assert len(list((run / "calib").glob("stats-*.npz"))) == 1


def test_calibration_never_uses_val_images(run: Path) -> None:
    card = card_mod.read(run)
    with pytest.raises(DataError, match="calibration images are validation images"):
        run_export(run, export_cfg(calib={"source": str(Path(card["dataset"]["root"]) / "val")}))


def _sabotaged(run: Path, max_drop: float, fallback: bool = True, shrink: float = 50.0, head_refit: bool = False
               ) -> tuple:
    """Real statistics, except one early convolution's input range shrunk ``shrink`` x (as a bad calibration
    set would): the gate must find that quantizer and keep it in float. ``shrink`` 1: no sabotage.
    ``head_refit``: the plan re-fits the head (on 300 of the run's training images)."""
    import torch
    from tledge.export import onnx as onnx_io
    from tledge.model import load_classifier

    card = card_mod.read(run)
    model = load_classifier(run)
    onnx_io.export(model, card, run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    pre = card_mod.preprocess_of(card)
    cal_files = sorted((Path(__file__).resolve().parents[2] / "calibration" / "fashion-mnist").rglob("*.png"))
    x = np.stack([pre(f) for f in cal_files[:128]])
    stats = cal.collect(fp32, activation_tensors(fp32), [x[i:i + 32] for i in range(0, 128, 32)])
    victim_node = next(n for n in fp32.graph.node if n.op_type == "Conv" and "features.2/" in n.name)
    if shrink != 1.0:
        st = stats[victim_node.input[0]]
        st.min, st.max = st.min / shrink, st.max / shrink
        st.pos[:] = 0
        st.neg[:] = 0
    rep = scan(card["dataset"]["root"])
    ev = EvalSet(rep.val, pre)
    with torch.no_grad():
        ref = run_logits(lambda b: model(torch.from_numpy(b)).numpy(), ev)
    ctx = Int8Context(export_cfg(max_drop=max_drop, fallback=fallback, head_refit=head_refit, refit_count=300),
                      base=fp32, judge=x[:64], fit=x[64:], calib_batches=[x], card=card,
                      train_samples=list(rep.train) if head_refit else [], stats=stats)
    ctx.set_reference()
    return ctx, ev, ref, victim_node.input[0]


@pytest.mark.parametrize("form", ["cpu", "tensorrt"], ids=["cpu_form", "trt_form"])
def test_accuracy_gate_passes_and_falls_back(run: Path, form: str) -> None:
    ctx, ev, ref, victim = _sabotaged(run, 2.0)
    q, report = gate(ctx, FormState(form, ctx.base, method="minmax"), ev, ref)
    assert report["initial"]["drop_points"] > 2.0, "the sabotage must hurt for this test to mean anything"
    assert report["ranking"][0]["tensor"] == victim  # one pass over the judge images finds it first
    assert victim in report["kept_float"]
    assert report["final"]["drop_points"] <= 2.0
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert victim not in quantized and len(quantized) > 40
    # a generous limit passes with nothing kept in float
    ctx.cfg = export_cfg(max_drop=100.0, head_refit=False)
    _, rep2 = gate(ctx, FormState(form, ctx.base, method="minmax"), ev, ref)
    assert rep2["kept_float"] == [] and rep2["steps"] == []


def test_gate_fallback_refits_the_head_for_each_candidate(run: Path) -> None:
    """With a re-fitted head, each fallback step re-fits it on the features of the graph with those quantizers
    in float (the head fitted to the fully quantized backbone is the wrong one for them), from the head the
    plan fitted, with the plan's recipe; the kept state carries that head."""
    from tledge.export.int8.passes.head_refit import (HeadRefit, features_through, head_gemm, head_weights,
                                                       refit_head, refit_recipe, train_images,
                                                       train_teacher_logits, with_head)
    ctx, ev, ref, victim = _sabotaged(run, 2.0, head_refit=True)
    try:
        state = FormState("tensorrt", ctx.base, method="minmax")
        assert HeadRefit().run(state, ctx).decision.startswith("head re-fitted")
        gemm = head_gemm(state.model)
        w_plan, b_plan = head_weights(state.model, gemm)
        q, report = gate(ctx, state, ev, ref)
        assert report["initial"]["drop_points"] > 2.0, "the sabotage must hurt for this test to mean anything"
        assert victim in report["kept_float"] and report["final"]["drop_points"] <= 2.0
        assert report["steps"] and all(s["head_refit"] for s in report["steps"])
        assert state.float_tensors == tuple(report["kept_float"])
        # the kept head is the plan's head re-fitted on the features of the kept graph: reproduce it
        kept = state.copy(model=with_head(state.model, gemm, w_plan, b_plan))
        train = train_images(ctx)
        feats, = features_through(ctx.quantize(kept), [gemm.input[0]], train.batches(32), ctx.threads)
        epochs, kw = refit_recipe(ctx)
        w, b = refit_head(feats, train.labels, w_plan, b_plan, epochs, teacher=train_teacher_logits(ctx),
                          distill=ctx.cfg.quant.refit_distill, **kw)
        w_kept, b_kept = head_weights(state.model, gemm)
        assert np.array_equal(w_kept, w) and np.array_equal(b_kept, b)
        assert not np.array_equal(w_kept, w_plan)
    finally:
        if "train" in ctx.cache:
            ctx.cache["train"].close()


@pytest.mark.parametrize("form", ["cpu", "tensorrt"], ids=["cpu_form", "trt_form"])
def test_gate_ranking_predicts_what_removing_a_quantizer_does(run: Path, form: str) -> None:
    """Unsabotaged statistics: the quantizer the Taylor estimate ranks first lowers the squared logit
    difference to FP32 on the judge images when it is removed, and more than the one it ranks last (and it
    is measured by onnxruntime on the real Q/DQ graph, not by the torch interpretation the estimate uses)."""
    ctx, *_ = _sabotaged(run, 2.0, shrink=1.0)
    state = FormState(form, ctx.base, method="minmax")
    q = ctx.quantize(state)
    batches, refs = ctx.judge_batches(8), ctx.judge_ref_batches(8)
    ranked = quantizer_sensitivity(q, batches, refs)
    assert len(ranked) > 40 and ranked[0][1] > 0 and ranked[0][1] >= ranked[-1][1]

    def loss(m: onnx.ModelProto) -> float:
        return float(((ctx.logits(m) - ctx.judge_ref) ** 2).sum())

    base = loss(q)
    gain_top = base - loss(ctx.quantize(state, float_tensors=(ranked[0][0],)))
    gain_last = base - loss(ctx.quantize(state, float_tensors=(ranked[-1][0],)))
    assert gain_top > 0 and gain_top > gain_last, (ranked[0], gain_top, ranked[-1], gain_last)
    # the same ranking twice: fixed threads and order
    assert quantizer_sensitivity(q, batches, refs) == ranked


def test_accuracy_gate_fails_loudly_without_fallback(run: Path) -> None:
    ctx, ev, ref, _ = _sabotaged(run, 2.0, fallback=False)
    with pytest.raises(AccuracyError, match="--no-fallback"):
        gate(ctx, FormState("tensorrt", ctx.base, method="minmax"), ev, ref)


def test_weights_are_per_channel_and_symmetric(run: Path) -> None:
    from tledge.export import onnx as onnx_io
    from tledge.model import load_classifier
    onnx_io.export(load_classifier(run), card_mod.read(run), run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    stats = {n: cal.TensorStats() for n in activation_tensors(fp32)}
    for s in stats.values():
        s.update(np.linspace(-1, 3, 101, dtype=np.float32))
    q = quantize_model(fp32, stats, "tensorrt", "minmax")
    assert check_tensorrt_qdq(q) == []
    n_weight_dq = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear" and "__wscale" in n.input[1])
    assert n_weight_dq == len([n for n in quantizable_nodes(fp32, FORMS["tensorrt"]) if "Conv" in n or "Gemm" in n])


def test_cli_engine_without_tensorrt_fails_in_one_line(run: Path) -> None:
    r = CliRunner().invoke(main, ["export", str(run), "--engine", "int8"])
    assert r.exit_code != 0
    assert "TensorRT" in r.output and "JetPack" in r.output and "Traceback" not in r.output
    assert not (run / "model.int8.engine").exists()


def test_cli_int8_without_tensorrt_ends_in_graphs_and_a_note(run: Path) -> None:
    r = CliRunner().invoke(main, ["export", str(run), "--int8", "--form", "cpu", "--method", "percentile",
                                  "--max-drop", "100", "--threads", "2", "--escalate", "on", "--adaround-iters", "20",
                                  "--adaround-layers", "2", "--refit-count", "300"])
    assert r.exit_code == 0, r.output
    assert "engine is built on the device" in r.output
    assert (run / "model.int8.cpu.onnx").is_file() and not (run / "model.int8.trt.onnx").exists()
    m = read_json(run / "export_manifest.json")
    assert m["checks"]["int8-cpu"]["method"] == "percentile"
    lr = m["int8"]["forms"]["cpu"]["expensive"][0]  # --escalate on: learned rounding with the budget asked for
    assert lr["name"] == "learned_rounding" and lr["details"]["iters"] == 20
    assert lr["details"]["learned"] + lr["details"]["not_learned"] == lr["details"]["costly"] and lr["details"]["learned"] <= 2
    assert m["int8"]["forms"]["cpu"]["cheap"][2]["details"]["images"] == 300
    assert "INT8 plan, cheap: ranges -> bias_correction -> head_refit" in r.output


# ---------------------------------------------------------------- TensorRT builder logic, by capability

def test_parse_batch() -> None:
    assert trtb.parse_batch("1,8,32") == (1, 8, 32) and trtb.parse_batch("4") == (4, 4, 4)
    with pytest.raises(Exception, match="min,opt,max"):
        trtb.parse_batch("8,1,32")


def test_require_tensorrt_names_jetpack() -> None:
    if trtb.tensorrt_available()[0]:
        pytest.skip("TensorRT is present")
    with pytest.raises(MissingDependency, match="JetPack"):
        trtb.require_tensorrt()


@pytest.mark.parametrize("kw, match", [
    ({"bias_correction": "emprical"}, "unknown bias correction mode 'emprical'; choices"),
    ({"refit_distill": 1.5}, "not a weight between 0 and 1"),
    ({"refit_dropout": 1.0}, r"--refit-dropout 1.0 is not a dropout rate in \[0, 1\)"),
    ({"adaround_iters": 0}, "--adaround-iters 0 is not a positive count"),
    ({"escalate": "sometimes"}, "unknown --escalate mode 'sometimes'; choices: auto, on, off"),
    ({"target_agreement": 1.5}, r"--target-agreement 1.5 is not in \(0, 1\]"),
    ({"forms": ("gpu",)}, "unknown INT8 form 'gpu'; choices: tensorrt, cpu"),
    ({"calib": {"method": "kl"}}, "unknown calibration method 'kl'"),
])
def test_bad_int8_options_are_refused_before_any_work(run: Path, kw: dict, match: str) -> None:
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UsageError, match=match):
        run_export(run, export_cfg(**kw))
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


@pytest.mark.slow
def test_int8_graphs_do_not_depend_on_threads(default_run_64: Path, tmp_path: Path) -> None:
    """Same run and options, --threads 1 and --threads 2, every pass on (learned rounding and empirical
    bias correction included): byte-identical INT8 graphs and the same decisions."""
    import hashlib
    out = {}
    for t in (1, 2):
        run = copy_run(default_run_64, tmp_path / f"run{t}")
        r = CliRunner().invoke(main, ["export", str(run), "--int8", "--threads", str(t), "--escalate", "on", "--max-drop", "100",
                                      "--adaround-iters", "30", "--adaround-layers", "3", "--refit-count", "500"])
        assert r.exit_code == 0, r.output
        m = read_json(run / "export_manifest.json")
        decisions = {f: ([p["decision"] for p in rec["cheap"] + rec["expensive"]], rec["kept"])
                     for f, rec in m["int8"]["forms"].items()}
        out[t] = ({f: hashlib.sha256((run / f).read_bytes()).hexdigest()
                   for f in ("model.int8.trt.onnx", "model.int8.cpu.onnx")}, decisions)
    assert out[1] == out[2]


@pytest.mark.parametrize("form", ["cpu", "tensorrt"], ids=["cpu_form", "trt_form"])
def test_learned_rounding_is_skipped_when_fp32_weights_cannot_reach_the_target(run: Path, form: str) -> None:
    """The weight bound: the form's graph with activations quantized and every weight FP32 (learned rounding's
    ideal: it reconstructs each layer's FP32 output). When it misses the target agreement, learned rounding
    is not learned in --escalate auto, and is learned under --escalate on or when the bound reaches the
    target."""
    from tledge.export.int8.passes.adaround import LearnedRounding

    ctx, *_ = _sabotaged(run, 2.0, shrink=1.0)
    state = FormState(form, ctx.base, method="percentile")
    fw = ctx.quantize(state, float_weights=True)
    inits = {i.name for i in fw.graph.initializer}
    assert not [n for n in fw.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len([n for n in fw.graph.node if n.op_type == "QuantizeLinear"]) > 40  # activations still INT8
    base_w = {i.name: onnx.numpy_helper.to_array(i) for i in ctx.base.graph.initializer}
    conv = next(n for n in fw.graph.node if n.op_type == "Conv")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(next(i for i in fw.graph.initializer
                                                                  if i.name == conv.input[1])), base_w[conv.input[1]])
    bound = ctx.weight_bound(state)
    assert bound != ctx.score(ctx.quantize(state)) and 0.0 < bound["mse"] and 0.0 < bound["agreement"] <= 1.0

    small = {"adaround_iters": 5, "adaround_layers": 1, "adaround_images": 8}
    ctx.cfg = export_cfg(escalate="auto", target_agreement=1.0, **small)
    if bound["agreement"] < 1.0:
        rec = LearnedRounding().run(state.copy(), ctx)
        assert rec.decision == "not learned" and "below the 100% target" in rec.why
        assert rec.scores["weights_fp32"] == bound and "adaround" not in ctx.cache
    ctx.cfg = export_cfg(escalate="on", target_agreement=1.0, **small)
    rec = LearnedRounding().run(state.copy(), ctx)
    assert rec.decision != "not learned" and "adaround" in ctx.cache
    ctx.cache.pop("adaround")
    ctx.cfg = export_cfg(escalate="auto", target_agreement=min(bound["agreement"], 0.5), **small)
    assert LearnedRounding().run(state.copy(), ctx).decision != "not learned" and "adaround" in ctx.cache
