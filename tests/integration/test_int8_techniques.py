"""The INT8 accuracy techniques: equalization keeps the FP32 function, bias correction removes the mean
output shift, learned rounding lowers the reconstruction error, every technique switches off, and the
transformed graphs stay valid TensorRT Q/DQ graphs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tledge import card as card_mod
from tledge.export.int8 import calibrate as cal
from tledge.export import improve
from tledge.export import onnx as onnx_io
from tledge.export.pipeline import ExportConfig, _ort_logits, run_export
from tledge.export.int8.quantize import activation_tensors, check_tensorrt_qdq, quantize_model
from tledge.fsutil import read_json
from tledge.model import build_classifier, load_classifier
from tests.conftest import ROOT, copy_run
from tests.unit.test_export_onnx import fake_card


def _calib(pre, n: int = 64) -> np.ndarray:
    files = sorted((ROOT / "calibration" / "fashion-mnist").rglob("*.png"))[::4][:n]
    return np.stack([pre(f) for f in files])


def test_equalization_keeps_fp32_outputs_and_equalizes_ranges(tmp_path: Path) -> None:
    card = fake_card("resnet18", 64)
    torch.manual_seed(0)
    model = build_classifier(card).eval()
    onnx_io.export(model, card, tmp_path / "m.onnx")
    fp32 = onnx.load(str(tmp_path / "m.onnx"))
    eq, info = improve.equalize(fp32)
    assert info["pairs"] >= 8  # conv-ReLU-conv inside every basic block
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    a, b = _ort_logits(fp32, [x], 1), _ort_logits(eq, [x], 1)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # ranges of the first pair's shared channels are now equal (sqrt rule)
    a_node, b_node, _ = improve.equalizable_pairs(eq)[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in eq.graph.initializer}
    r1 = np.abs(inits[a_node.input[1]]).reshape(inits[a_node.input[1]].shape[0], -1).max(1)
    w2 = inits[b_node.input[1]]
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)


def test_equalization_skips_relu6_pairs(default_run_64: Path, tmp_path: Path) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    onnx_io.export(load_classifier(run), card_mod.read(run), run / "model.onnx")
    _, info = improve.equalize(onnx.load(str(run / "model.onnx")))
    assert info["skipped_relu6_pairs"] > 20 and info["pairs"] < 5  # mobilenet_v2: ReLU6 almost everywhere


def test_bias_correction_removes_each_layers_mean_output_error(default_run_64: Path, tmp_path: Path) -> None:
    """With INT8 weights, every Conv/Gemm output's per-channel mean over the calibration images moves back
    to the FP32 one (padding borders included)."""
    import torch.nn.functional as F
    from onnx import numpy_helper

    from tledge.export.int8.quantize import weight_axis, quantize_weight

    run = copy_run(default_run_64, tmp_path / "run")
    card = card_mod.read(run)
    onnx_io.export(load_classifier(run), card, run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    x = _calib(card_mod.preprocess_of(card))
    bc, info = improve.bias_correct(fp32, improve.channel_means(fp32, [x]))
    assert info["layers"] == 53
    nodes = improve.weighted_nodes(fp32)
    io = improve.layer_io(fp32, nodes, [x])
    old = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in bc.graph.initializer}
    before = after = 0.0
    for n in nodes:
        xin, y = (torch.from_numpy(a) for a in io[n.name])
        w = old[n.input[1]]
        q, sc = quantize_weight(w, weight_axis(n))
        shape = [1] * w.ndim
        shape[weight_axis(n)] = -1
        wq = torch.from_numpy(q.astype(np.float32) * sc.reshape(shape))
        if n.op_type == "Conv":
            at = {a.name: list(a.ints) if a.ints else a.i for a in n.attribute}
            p = at.get("pads", [0, 0, 0, 0])
            xp = F.pad(xin, (p[1], p[3], p[0], p[2]))

            def run_layer(b):
                return F.conv2d(xp, wq, torch.from_numpy(b.copy()), at.get("strides", [1, 1]), 0, at.get("dilations", [1, 1]),
                                at.get("group", 1)).mean(dim=(0, 2, 3))
            ref = y.mean(dim=(0, 2, 3))
        else:
            def run_layer(b):
                return F.linear(xin, wq, torch.from_numpy(b.copy())).mean(0)
            ref = y.mean(0)
        before += float((run_layer(old[n.input[2]]) - ref).abs().mean())
        after += float((run_layer(new[n.input[2]]) - ref).abs().mean())
    assert after < 0.05 * before


@pytest.mark.parametrize("form", ["tensorrt", "cpu"], ids=["trt_form", "cpu_form"])  # no "tensorrt" keyword:
def test_empirical_bias_correction_removes_the_int8_networks_mean_shift(default_run_64: Path, tmp_path: Path,
                                                                       form: str) -> None:
    """Measured in the quantized network itself (activations quantized too): every layer's per-channel
    output shift against FP32 on the calibration images falls, and so does the logits' mean error."""
    run = copy_run(default_run_64, tmp_path / "run")
    card = card_mod.read(run)
    onnx_io.export(load_classifier(run), card, run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    x = _calib(card_mod.preprocess_of(card))
    batches = [x[:32], x[32:]]
    stats = cal.collect(fp32, activation_tensors(fp32), batches)

    def quantize(m):
        return quantize_model(m, stats, form, "mse")

    corrected, info = improve.empirical_bias_correct(fp32, quantize, batches)
    assert info["layers"] == 53 and info["mean_abs_shift"] > 0
    before = improve.layer_shifts(fp32, quantize(fp32), batches)
    after = improve.layer_shifts(fp32, quantize(corrected), batches)
    assert np.mean(list(after.values())) < 0.3 * np.mean(list(before.values()))
    ref = _ort_logits(fp32, batches, 1)
    shift_before = np.abs((_ort_logits(quantize(fp32), batches, 1) - ref).mean(0)).mean()
    shift_after = np.abs((_ort_logits(quantize(corrected), batches, 1) - ref).mean(0)).mean()
    # logits through onnxruntime's fused integer kernels (the correction was fitted on the Q/DQ graph as written)
    assert shift_after < 0.5 * shift_before
    # the FP32 network itself only changed in its biases
    names = {i.name for i in fp32.graph.initializer if i.name not in
             {n.input[2] for n in improve.weighted_nodes(fp32)}}
    a = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer if i.name in names}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in corrected.graph.initializer if i.name in names}
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _small_mobilenet(tmp_path: Path) -> tuple[onnx.ModelProto, np.ndarray]:
    """A 64 px MobileNetV3-small graph (random weights, seeded) and 16 random inputs for it."""
    card = fake_card("mobilenet_v3_small", 64)
    torch.manual_seed(0)
    onnx_io.export(build_classifier(card).eval(), card, tmp_path / "m.onnx")
    return onnx.load(str(tmp_path / "m.onnx")), np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)


def test_learned_rounding_lowers_reconstruction_error(tmp_path: Path) -> None:
    fp32, x = _small_mobilenet(tmp_path)
    overrides, info = improve.adaround(fp32, [x[:8], x[8:]], budget_s=5.0, min_iters=30, max_iters=60)
    assert info["recon_error_learned"] < info["recon_error_nearest"] and info["improved"] > 0
    assert all(v.dtype == np.int8 for v in overrides.values())
    stats = cal.collect(fp32, activation_tensors(fp32), [x])
    q = quantize_model(fp32, stats, "tensorrt", "mse", weight_overrides=overrides)
    assert check_tensorrt_qdq(q) == []
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    name, want = next(iter(overrides.items()))
    got = next(v for k, v in stored.items() if k.startswith(name + "__") and k.endswith("__q"))
    np.testing.assert_array_equal(got, want)


def test_learned_rounding_goes_where_rounding_costs_within_budget(tmp_path: Path) -> None:
    fp32, x = _small_mobilenet(tmp_path)
    batches = [x[:8], x[8:]]
    # a tiny memory cap: layers learned in many groups, one network pass each, scored on fewer images
    overrides, info = improve.adaround(fp32, batches, budget_s=5.0, min_iters=20, max_iters=30, memory_mib=0.01)
    costs = [r["rel_error_nearest"] for r in info["per_layer"]]
    assert 0 < info["costly"] < info["layers"] and info["learned"] == info["costly"] and info["scoring_images"] < 16
    assert info["data_passes"] > 1
    assert costs == sorted(costs, reverse=True)  # worst layers first
    assert all(c >= info["min_rel_error"] for c in costs)
    assert {r["layer"] for r in info["per_layer"] if r["kept"]} == {
        n.name for n in improve.weighted_nodes(fp32) if n.input[1] in overrides}
    # layers below the threshold keep nearest rounding: a threshold no layer reaches learns nothing
    none, info = improve.adaround(fp32, batches, budget_s=5.0, min_rel_error=1e9)
    assert none == {} and info["costly"] == 0 and info["learned"] == 0 and info["layers"] > info["costly"]
    # a budget spent before the first layer: nothing learned, every costly layer reported as not reached
    none, info = improve.adaround(fp32, batches, budget_s=1e-3)
    assert none == {} and info["learned"] == 0 and info["not_reached"] == info["costly"] > 0


@pytest.mark.slow
def test_every_technique_switches_off_and_graphs_stay_valid(default_run_64: Path, tmp_path: Path) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    on = run_export(run, ExportConfig(int8=True, max_drop=100.0, threads=2, adaround_budget_s=5.0))
    assert set(on["int8"]["techniques"]) == {"cle", "bias_correction", "head_refit", "adaround"}
    assert on["int8"]["techniques"]["head_refit"]["applied"] and on["int8"]["techniques"]["head_refit"]["images"] == 2000
    bc, ada = on["int8"]["techniques"]["bias_correction"], on["int8"]["techniques"]["adaround"]
    for form in ("tensorrt", "cpu"):  # auto: both candidates scored on held-out calibration images
        assert bc[f"chosen_{form}"] in ("analytic", "empirical") and set(bc[f"scores_{form}"]) == {"analytic", "empirical"}
        if ada["improved"]:  # learned rounding judged per form against nearest on the same held-out images
            s = ada[f"scores_{form}"]
            assert ada[f"kept_{form}"] == (s["learned"] < s["nearest"])
    assert ada["probe_held_out"] and bc["probe_held_out"]
    assert check_tensorrt_qdq(onnx.load(str(run / "model.int8.trt.onnx"))) == []
    analytic = run_export(run, ExportConfig(int8=True, max_drop=100.0, threads=2, head_refit=False, adaround=False,
                                            bias_correction_mode="analytic"))
    bc = analytic["int8"]["techniques"]["bias_correction"]
    assert bc["chosen_tensorrt"] == bc["chosen_cpu"] == "analytic" and "empirical_cpu" not in bc
    assert check_tensorrt_qdq(onnx.load(str(run / "model.int8.trt.onnx"))) == []
    off = run_export(run, ExportConfig(int8=True, max_drop=100.0, threads=2, cle=False, bias_correction=False,
                                       head_refit=False, adaround=False))
    assert off["int8"]["techniques"] == {}
    assert check_tensorrt_qdq(onnx.load(str(run / "model.int8.trt.onnx"))) == []
    assert read_json(run / "export_manifest.json")["config"]["cle"] is False
