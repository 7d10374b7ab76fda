"""`tledge export` on a real tuned run: graphs, manifest, calibration cache, accuracy gate, Q/DQ form
checks, and the TensorRT path's behaviour without TensorRT."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tledge import card as card_mod
from tledge.cli import main
from tledge.data import scan
from tledge.errors import AccuracyError, DataError, MissingDependency, UsageError
from tledge.evalset import EvalSet, run_logits
from tledge.export.int8 import calibrate as cal
from tledge.export import tensorrt as trtb
from tledge.export.pipeline import ExportConfig, _ort_logits, gate_int8, run_export
from tledge.export.int8.quantize import FORMS, activation_tensors, check_tensorrt_qdq, quantizable_nodes, quantize_model
from tledge.fsutil import read_json
from tests.conftest import copy_run


@pytest.fixture
def run(default_run_64: Path, tmp_path: Path) -> Path:
    return copy_run(default_run_64, tmp_path / "run")


def test_export_writes_checked_graphs_and_manifest(run: Path) -> None:
    m = run_export(run, ExportConfig(int8=True, fp16=True, max_drop=100.0, threads=2, adaround_budget_s=5.0))
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
        assert rep["method"] in cal.METHODS and set(rep["method_scores"]) == set(cal.METHODS)
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
    cfg = ExportConfig(int8=True, forms=("cpu",), method="minmax", max_drop=100.0, threads=2, adaround=False)
    a = run_export(run, cfg)
    b = run_export(run, cfg)
    assert a["calibration"]["cache"] == "miss" and b["calibration"]["cache"] == "hit"
    assert a["calibration"]["key"] == b["calibration"]["key"]
    c = run_export(run, ExportConfig(**{**cfg.__dict__, "calib_count": 100}))
    assert c["calibration"]["cache"] == "miss" and c["calibration"]["key"] != a["calibration"]["key"]
    assert len(list((run / "calib").glob("stats-*.npz"))) == 1


def test_calibration_never_uses_val_images(run: Path) -> None:
    card = card_mod.read(run)
    with pytest.raises(DataError, match="calibration images are validation images"):
        run_export(run, ExportConfig(int8=True, calib=str(Path(card["dataset"]["root"]) / "val"), threads=2))


def _sabotaged(run: Path) -> tuple:
    """Real statistics, except one early convolution's input range shrunk 50x (as a bad calibration set
    would): the gate must find that layer and keep it in float."""
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
    st = stats[victim_node.input[0]]
    st.min, st.max = st.min / 50, st.max / 50
    st.pos[:] = 0
    st.neg[:] = 0
    rep = scan(card["dataset"]["root"])
    ev = EvalSet(rep.val, pre)
    with torch.no_grad():
        ref = run_logits(lambda b: model(torch.from_numpy(b)).numpy(), ev)
    probe = [x[:64]]
    return fp32, stats, ev, ref, probe, _ort_logits(fp32, probe, 2), victim_node.name


def test_accuracy_gate_passes_and_falls_back(run: Path) -> None:
    fp32, stats, ev, ref, probe, probe_ref, victim = _sabotaged(run)
    cfg = ExportConfig(int8=True, max_drop=2.0, threads=2)
    q, report = gate_int8(fp32, stats, "cpu", "minmax", cfg, ev, ref, probe, probe_ref)
    assert report["initial"]["drop_points"] > 2.0, "the sabotage must hurt for this test to mean anything"
    assert victim in report["kept_float"]
    assert report["final"]["drop_points"] <= 2.0
    quantized = {n.name for n in q.graph.node if n.op_type == "Conv" and any(i.endswith("__dq") for i in n.input)}
    assert victim not in quantized and len(quantized) > 40
    # a generous limit passes with nothing kept in float
    _, rep2 = gate_int8(fp32, stats, "cpu", "minmax", ExportConfig(max_drop=100.0, threads=2), ev, ref, probe, probe_ref)
    assert rep2["kept_float"] == [] and rep2["steps"] == []


def test_accuracy_gate_fails_loudly_without_fallback(run: Path) -> None:
    fp32, stats, ev, ref, probe, probe_ref, _ = _sabotaged(run)
    with pytest.raises(AccuracyError, match="--no-fallback"):
        gate_int8(fp32, stats, "tensorrt", "minmax", ExportConfig(max_drop=2.0, fallback=False, threads=2),
                  ev, ref, probe, probe_ref)


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
                                  "--max-drop", "100", "--threads", "2", "--adaround-budget", "3"])
    assert r.exit_code == 0, r.output
    assert "engine is built on the device" in r.output
    assert (run / "model.int8.cpu.onnx").is_file() and not (run / "model.int8.trt.onnx").exists()
    m = read_json(run / "export_manifest.json")
    assert m["checks"]["int8-cpu"]["method"] == "percentile"
    ada = m["int8"]["techniques"]["adaround"]  # learned rounding is on by default, with the budget asked for
    assert ada["budget_s"] == 3.0 and ada["learned"] + ada["not_reached"] == ada["costly"]
    assert "learned weight rounding:" in r.output


# ---------------------------------------------------------------- TensorRT builder logic, by capability

def _fake_trt(*, strongly: bool, explicit_batch: bool, flags: tuple[str, ...]) -> SimpleNamespace:
    ndcf = SimpleNamespace(**({"STRONGLY_TYPED": 1} if strongly else {}),
                           **({"EXPLICIT_BATCH": 0} if explicit_batch else {}))
    return SimpleNamespace(NetworkDefinitionCreationFlag=ndcf, BuilderFlag=SimpleNamespace(**{f: f for f in flags}))


def test_trt_8x_sets_explicit_batch_and_precision_flags() -> None:
    trt = _fake_trt(strongly=False, explicit_batch=True, flags=("FP16", "INT8"))
    assert trtb.network_flags(trt) == (1, False)
    assert trtb.precision_flags(trt, "int8", False) == ["INT8"]
    assert trtb.precision_flags(trt, "fp16", False) == ["FP16"]


@pytest.mark.parametrize("flags", [("FP16", "INT8"), ()])  # 10.x keeps the flags, 11.x has none
def test_trt_10_and_11_are_strongly_typed_without_flags(flags: tuple[str, ...]) -> None:
    trt = _fake_trt(strongly=True, explicit_batch=bool(flags), flags=flags)
    fl, strongly = trtb.network_flags(trt)
    assert strongly and fl == 1 << 1
    assert trtb.precision_flags(trt, "int8", strongly) == []


def test_trt_without_either_capability_is_refused() -> None:
    with pytest.raises(trtb.EngineBuildError, match="8.5 or newer"):
        trtb.precision_flags(_fake_trt(strongly=False, explicit_batch=True, flags=()), "int8", False)


def test_parse_batch() -> None:
    assert trtb.parse_batch("1,8,32") == (1, 8, 32) and trtb.parse_batch("4") == (4, 4, 4)
    with pytest.raises(Exception, match="min,opt,max"):
        trtb.parse_batch("8,1,32")


def test_require_tensorrt_names_jetpack() -> None:
    if trtb.tensorrt_available()[0]:
        pytest.skip("TensorRT is present")
    with pytest.raises(MissingDependency, match="JetPack"):
        trtb.require_tensorrt()


def test_engine_mismatch_messages() -> None:
    from tledge.deploy.tledge_runtime.engine import compatibility_problems
    side = {"fingerprint": {"tensorrt": "8.6.2", "gpu": "Orin", "compute_capability": "8.7"}}
    here = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert compatibility_problems(side, here) == ["built with TensorRT 8.6.2, this machine has 10.3.0"]
    assert compatibility_problems(side, {**here, "tensorrt": "8.6.2"}) == []
    from tledge.runtimes.tensorrt import TrtRunner
    with pytest.raises(Exception, match="TensorRT"):  # without TensorRT: the one-line missing-dependency error
        TrtRunner("model.int8.engine").activate()
    assert "compute capability 8.7" in compatibility_problems(side, {**here, "tensorrt": "8.6.2", "compute_capability": "7.2"})[0]


@pytest.mark.parametrize("cfg, match", [
    (ExportConfig(int8=True, bias_correction_mode="emprical"), "unknown bias correction mode 'emprical'; choices"),
    (ExportConfig(int8=True, refit_distill=1.5), "not a weight between 0 and 1"),
    (ExportConfig(int8=True, adaround_budget_s=0), "--adaround-budget 0 is not a positive number of seconds"),
])
def test_bad_int8_options_are_refused_before_any_work(run: Path, cfg: ExportConfig, match: str) -> None:
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UsageError, match=match):
        run_export(run, cfg)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
