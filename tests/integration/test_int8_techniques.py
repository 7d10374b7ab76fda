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
from tledge.export import onnx as onnx_io
from tledge.export import ort
from tledge.export.graph import weighted_nodes
from tledge.export.int8 import calibrate as cal
from tledge.export.int8.passes import adaround as ada_mod
from tledge.export.int8.passes import bias_correction as bc_mod
from tledge.export.int8.passes import cle
from tledge.export.pipeline import run_export
from tledge.export.int8.quantize import activation_tensors, check_tensorrt_qdq, quantize_model, quantized_tensors
from tledge.fsutil import read_json
from tledge.model import build_classifier, load_classifier
from tests.conftest import ROOT, copy_run, export_cfg
from tests.unit.test_export_onnx import fake_card


def _calib(pre, n: int = 64) -> np.ndarray:
    files = sorted((ROOT / "calibration" / "fashion-mnist").rglob("*.png"))[::4][:n]
    return np.stack([pre(f) for f in files])


def _demo_graph_and_stats(default_run_64: Path, tmp_path: Path) -> tuple[onnx.ModelProto, np.ndarray, dict]:
    """The 64 px demo run's FP32 graph, 64 calibration images and their statistics (two batches)."""
    run = copy_run(default_run_64, tmp_path / "run")
    card = card_mod.read(run)
    onnx_io.export(load_classifier(run), card, run / "model.onnx")
    fp32 = onnx.load(str(run / "model.onnx"))
    x = _calib(card_mod.preprocess_of(card))
    return fp32, x, cal.collect(fp32, activation_tensors(fp32), [x[:32], x[32:]])


def test_equalization_keeps_fp32_outputs_and_equalizes_ranges(tmp_path: Path) -> None:
    card = fake_card("resnet18", 64)
    torch.manual_seed(0)
    model = build_classifier(card).eval()
    onnx_io.export(model, card, tmp_path / "m.onnx")
    fp32 = onnx.load(str(tmp_path / "m.onnx"))
    eq, info = cle.equalize(fp32)
    assert info["pairs"] >= 8  # conv-ReLU-conv inside every basic block
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    a, b = ort.logits(fp32, [x], 1), ort.logits(eq, [x], 1)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    # ranges of the first pair's shared channels are now equal (sqrt rule)
    a_node, b_node, _ = cle.equalizable_pairs(eq)[0]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in eq.graph.initializer}
    r1 = np.abs(inits[a_node.input[1]]).reshape(inits[a_node.input[1]].shape[0], -1).max(1)
    w2 = inits[b_node.input[1]]
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)


def test_equalization_skips_relu6_pairs(default_run_64: Path, tmp_path: Path) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    onnx_io.export(load_classifier(run), card_mod.read(run), run / "model.onnx")
    _, info = cle.equalize(onnx.load(str(run / "model.onnx")))
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
    means = bc_mod.channel_means(fp32, [x])
    bc, info = bc_mod.bias_correct(fp32, means)
    assert info["layers"] == 53
    # in batches with a progress callback (the export's bar): every image counted once, the same means
    seen: list[int] = []
    half = len(x) // 2
    again = bc_mod.channel_means(fp32, [x[:half], x[half:]], advance=seen.append)
    assert seen == [half, len(x) - half] and again.keys() == means.keys()
    for k in means:
        np.testing.assert_allclose(again[k], means[k], rtol=1e-5, atol=1e-6)
    nodes = weighted_nodes(fp32)
    io = ada_mod.layer_io(fp32, nodes, [x])
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


@pytest.mark.parametrize("form,centre", [("tensorrt", "off"), ("tensorrt", "padded"), ("cpu", "off")],
                         ids=["trt_form", "trt_form_centred", "cpu_form"])  # no "tensorrt" keyword:
def test_empirical_bias_correction_removes_the_int8_networks_mean_shift(default_run_64: Path, tmp_path: Path,
                                                                       form: str, centre: str) -> None:
    """Measured in the quantized network itself (activations quantized too): every layer's per-channel
    output shift against FP32 on the calibration images falls, and so does the logits' mean error."""
    fp32, x, stats = _demo_graph_and_stats(default_run_64, tmp_path)
    batches = [x[:32], x[32:]]
    if centre == "padded":  # as the export does: the pads graph pass, then the statistics
        from tledge.export.int8.passes.pads import pad_explicitly
        fp32 = pad_explicitly(fp32)[0]
        stats = cal.collect(fp32, activation_tensors(fp32), batches)

    def quantize(m):
        return quantize_model(m, stats, form, "mse", centre=centre)

    # the corrections at full depth: every layer's shift falls, and so does the logits' mean error
    shifts = bc_mod.empirical_shifts(fp32, quantize(fp32), x)
    nodes = weighted_nodes(fp32)
    assert len(shifts) == len(nodes) == 53
    full = bc_mod.apply_shifts(fp32, shifts, nodes)
    before = bc_mod.layer_shifts(fp32, quantize(fp32), batches)
    after = bc_mod.layer_shifts(fp32, quantize(full), batches)
    assert np.mean(list(after.values())) < 0.3 * np.mean(list(before.values()))
    ref = ort.logits(fp32, batches, 1)
    shift_before = np.abs((ort.logits(quantize(fp32), batches, 1) - ref).mean(0)).mean()
    shift_after = np.abs((ort.logits(quantize(full), batches, 1) - ref).mean(0)).mean()
    assert shift_after < 0.5 * shift_before
    # the pass keeps the depth whose logits are closest to FP32 on the images, none included
    corrected, info = bc_mod.empirical_bias_correct(fp32, quantize, x)
    mse = {int(k): v for k, v in info["depth_logit_mse"].items()}
    assert sorted(mse) == [0, 13, 26, 40, 53] and info["of_layers"] == 53 and info["passes"] == 1
    assert info["layers"] == min(mse, key=lambda k: (mse[k], k)) and mse[info["layers"]] <= mse[0]
    z = ort.logits(quantize(corrected), [x[:32], x[32:]], None)
    assert float(np.mean((z.astype(np.float64) - ort.logits(fp32, [x[:32], x[32:]], None)) ** 2)) == \
        pytest.approx(mse[info["layers"]], rel=1e-4)
    # the FP32 network itself only changed in its biases
    names = {i.name for i in fp32.graph.initializer if i.name not in
             {n.input[2] for n in weighted_nodes(fp32)}}
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
    overrides, info = ada_mod.adaround(fp32, [x[:8], x[8:]], iters=60)
    assert info["recon_error_learned"] < info["recon_error_nearest"] and info["improved"] > 0
    assert all(r["iters"] == 60 for r in info["per_layer"])  # the budget is iterations, not seconds
    assert all(v.dtype == np.int8 for v in overrides.values())
    stats = cal.collect(fp32, activation_tensors(fp32), [x])
    q = quantize_model(fp32, stats, "tensorrt", "mse", weight_overrides=overrides)
    assert check_tensorrt_qdq(q) == []
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    name, want = next(iter(overrides.items()))
    got = next(v for k, v in stored.items() if k.startswith(name + "__") and k.endswith("__q"))
    np.testing.assert_array_equal(got, want)
    # the same inputs give the same rounding, whatever torch's thread count outside
    torch.set_num_threads(1)
    again, _ = ada_mod.adaround(fp32, [x[:8], x[8:]], iters=60)
    torch.set_num_threads(2)
    assert again.keys() == overrides.keys() and all(np.array_equal(again[k], overrides[k]) for k in again)


def test_conv_windows_reproduce_the_full_convolution(tmp_path: Path) -> None:
    """Learning on output windows: the padded input window through the unpadded conv gives exactly the
    full convolution's outputs in that window, for every conv layer of the graph."""
    fp32, x = _small_mobilenet(tmp_path)
    inits = {i.name: i for i in fp32.graph.initializer}
    convs = [n for n in weighted_nodes(fp32) if n.op_type == "Conv"]
    io = ada_mod.layer_io(fp32, convs, [x[:4]])
    g = torch.Generator().manual_seed(0)
    for n in convs:
        xa, ya = (torch.from_numpy(np.ascontiguousarray(a)) for a in io[n.name])
        w = torch.from_numpy(onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32))
        sample, fwd = ada_mod.window_sampler(n, inits, xa, ya, 5, g)
        for _ in range(3):
            xs, ys = sample(torch.arange(4))
            torch.testing.assert_close(fwd(xs, w), ys, rtol=1e-4, atol=1e-4)
    assert len(convs) > 10



def test_learned_rounding_goes_where_rounding_costs_within_its_layer_budget(tmp_path: Path) -> None:
    fp32, x = _small_mobilenet(tmp_path)
    batches = [x[:8], x[8:]]
    # a tiny memory cap: layers learned in many groups, one network pass each, scored on fewer images
    overrides, info = ada_mod.adaround(fp32, batches, iters=20, memory_mib=0.01)
    costs = [r["rel_error_nearest"] for r in info["per_layer"]]
    assert 0 < info["costly"] < info["layers"] and info["learned"] == info["costly"] and info["scoring_images"] < 16
    assert info["data_passes"] > 1
    assert costs == sorted(costs, reverse=True)  # worst layers first
    assert all(c >= info["min_rel_error"] for c in costs)
    assert {r["layer"] for r in info["per_layer"] if r["kept"]} == {
        n.name for n in weighted_nodes(fp32) if n.input[1] in overrides}
    # a layer budget: only the costliest are learned, the rest are reported
    few, info2 = ada_mod.adaround(fp32, batches, iters=20, max_layers=3, memory_mib=0.01)
    assert info2["learned"] == 3 and info2["not_learned"] == info2["costly"] - 3
    assert [r["layer"] for r in info2["per_layer"]] == [r["layer"] for r in info["per_layer"][:3]]
    # layers below the threshold keep nearest rounding: a threshold no layer reaches learns nothing
    none, info = ada_mod.adaround(fp32, batches, iters=20, min_rel_error=1e9)
    assert none == {} and info["costly"] == 0 and info["learned"] == 0 and info["layers"] > info["costly"]


def test_learned_rounding_does_not_depend_on_the_pads_pass(default_run_64: Path, tmp_path: Path) -> None:
    """Learned rounding depends on the FP32 function, not on how the graph spells its padding: on mobilenet_v2
    with the ``pads`` graph pass's Pad nodes it learns what it learns without them. (It did not: the Pads' larger
    layer inputs left fewer images for the layer ranking within the memory cap, 18 instead of 19 at 112 px, which
    reordered two layers and with them the random windows. The cap here is set so that the padded graph's
    inputs would fit 10 images and the plain graph's more.)"""
    from tledge.export.int8.passes.pads import pad_explicitly
    fp32, x, _ = _demo_graph_and_stats(default_run_64, tmp_path)
    padded, convs = pad_explicitly(fp32)
    assert len(convs) == 17
    batches = [x[:8], x[8:16]]

    def bytes_per_image(m: onnx.ModelProto) -> int:
        io = ada_mod.layer_io(m, weighted_nodes(m), [x[:1]])
        return sum(a.nbytes + b.nbytes for a, b in io.values())
    plain_b, padded_b = bytes_per_image(fp32), bytes_per_image(padded)
    cap = 10 * padded_b
    assert cap // plain_b > 10
    plain, info = ada_mod.adaround(fp32, batches, iters=20, max_layers=6, memory_mib=cap / 2 ** 20)
    with_pads, info_p = ada_mod.adaround(padded, batches, iters=20, max_layers=6, memory_mib=cap / 2 ** 20)
    assert info["learned"] == 6 and plain and info["scoring_images"] == cap // plain_b
    assert info_p == info
    assert with_pads.keys() == plain.keys() and all(np.array_equal(with_pads[k], plain[k]) for k in plain)


@pytest.mark.slow
def test_export_centre_padded_exact_and_auto(
        default_run_64: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tledge export --int8 --centre padded`: the pads graph pass runs before calibration and is recorded, the
    TensorRT form's depthwise inputs are centred through Pad nodes that sit between the Clip and the quantizer.
    With --centre exact (the default) and the kept recipe below --target-agreement, the log and the record say
    how many more quantizers padded would centre. With --centre auto (the default) and exact below the target,
    both are scored on the judge images and the closer one kept."""
    from tledge.export import artefacts
    from tledge.export.int8.quantize import activation_quantizers, centred_offsets
    run = copy_run(default_run_64, tmp_path / "run")
    m = run_export(run, export_cfg(centre="padded"))
    pads = m["int8"]["graph"][2]
    assert pads["name"] == "pads" and pads["details"]["pad_nodes"] == 17
    trt = m["int8"]["forms"]["tensorrt"]["centre"]
    assert (trt["mode"], trt["pad_nodes"], trt["centred"]) == ("padded", 17, 34)
    q = onnx.load(str(run / artefacts.int8_file("tensorrt")))
    assert check_tensorrt_qdq(q) == []
    producer = {o: n for n in q.graph.node for o in n.output}
    offsets = centred_offsets(q)
    padded_q = [n for n in activation_quantizers(q) if n.input[0] in producer and producer[n.input[0]].op_type == "Pad"]
    assert len(padded_q) == 17 and all(n.input[0] in offsets for n in padded_q)
    assert all(producer[producer[n.input[0]].input[0]].op_type == "Clip" for n in padded_q)
    run2 = copy_run(default_run_64, tmp_path / "run2")
    capsys.readouterr()
    m2 = run_export(run2, export_cfg(centre="exact", target_agreement=1.0))
    notes = capsys.readouterr().err.splitlines()
    trt2 = m2["int8"]["forms"]["tensorrt"]["centre"]
    assert (trt2["mode"], trt2["pad_nodes"], trt2["padded_would_add"]) == ("exact", 0, 17)
    assert any("--centre padded would centre 17 more quantizers" in n for n in notes)
    assert "padded_would_add" not in m2["int8"]["forms"]["cpu"]["centre"]
    # --centre auto (the default): exact misses the target (1.0 here), so the cheap recipe runs padded too and the
    # one closer to FP32 on the judge images is kept; the graph is that one's
    m3 = run_export(copy_run(default_run_64, tmp_path / "run3"), export_cfg(target_agreement=1.0))
    choice, trt3 = m3["int8"]["forms"]["tensorrt"]["centre_choice"], m3["int8"]["forms"]["tensorrt"]["centre"]
    assert set(choice["scores"]) == {"exact", "padded"}
    assert choice["kept"] == min(choice["scores"], key=lambda k: choice["scores"][k]["mse"]) == trt3["mode"]
    assert trt3["pad_nodes"] == {"exact": 0, "padded": 17}[trt3["mode"]] and trt3["asked"] == "auto"
    assert m3["int8"]["forms"]["tensorrt"]["check"]["mse"] == choice["scores"][choice["kept"]]["mse"]
    assert "padded_would_add" not in trt3


@pytest.mark.slow
def test_plan_records_every_pass_and_switches_off(default_run_64: Path, tmp_path: Path) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    on = run_export(run, export_cfg(escalate="on", adaround_iters=40, adaround_layers=4))
    assert [r["name"] for r in on["int8"]["graph"]] == ["fold", "cle", "pads", "calibrate"]
    assert on["int8"]["graph"][2]["details"]["pad_nodes"] == 17  # --centre auto (the default)
    trt = on["int8"]["forms"]["tensorrt"]
    assert trt["centre_choice"]["kept"] == trt["centre"]["mode"]
    assert "centre_choice" not in on["int8"]["forms"]["cpu"]  # the CPU form has a zero-point: nothing to choose
    for form in ("tensorrt", "cpu"):
        rec = on["int8"]["forms"][form]
        assert [r["name"] for r in rec["cheap"]] == ["ranges", "bias_correction", "head_refit"]
        assert [r["name"] for r in rec["expensive"]] == ["learned_rounding", "bias_correction", "head_refit"]
        assert rec["check"]["escalate"] and rec["check"]["why"] == "--escalate on"
        assert rec["kept"] in ("cheap", "expensive") and set(rec["scores"]) == {"cheap", "expensive"}
        best = min(rec["scores"], key=lambda k: rec["scores"][k]["mse"])
        assert rec["kept"] == best  # the record is the decision
        for bc in (rec["cheap"][1], rec["expensive"][1]):  # both judged in the cheap recipe already
            assert bc["decision"] in ("analytic", "empirical") and set(bc["scores"]) == {"analytic", "empirical"}
        lr = rec["expensive"][0]
        assert lr["details"]["iters"] == 40 and lr["details"]["learned"] <= 4
        assert lr["decision"] in ("nearest rounding", "learned rounding") or lr["why"] == "no layer improved"
        assert rec["cheap"][2]["details"]["images"] == 2000
    assert check_tensorrt_qdq(onnx.load(str(run / "model.int8.trt.onnx"))) == []
    analytic = run_export(run, export_cfg(head_refit=False, bias_correction="analytic", escalate="on",
                                          adaround=False))
    for form in ("tensorrt", "cpu"):
        rec = analytic["int8"]["forms"][form]
        assert rec["cheap"][1]["decision"] == "analytic" and rec["cheap"][2]["decision"] == "skipped"
        assert not rec["check"]["escalate"] and rec["check"]["why"] == "no expensive pass is enabled"
    off = run_export(run, export_cfg(cle=False, bias_correction="off", head_refit=False))
    assert [r["decision"] for r in off["int8"]["graph"] if r["name"] == "cle"] == ["skipped"]
    for form in ("tensorrt", "cpu"):
        rec = off["int8"]["forms"][form]
        assert [r["decision"] for r in rec["cheap"][1:]] == ["skipped", "skipped"] and rec["kept"] == "cheap"
    assert check_tensorrt_qdq(onnx.load(str(run / "model.int8.trt.onnx"))) == []
    assert read_json(run / "export_manifest.json")["config"]["quant"]["cle"] is False


def _without_activation_qdq(q: onnx.ModelProto) -> onnx.ModelProto:
    """``q`` with every activation Q/DQ pair removed (readers read the tensor itself): what is left of a graph made
    with float weights is the float function it computes."""
    from tledge.export.int8.quantize import activation_quantizers
    m = onnx.ModelProto()
    m.CopyFrom(q)
    qs = activation_quantizers(m)
    dq_of = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    alias, drop = {}, set()
    for n in qs:
        alias[dq_of[n.output[0]].output[0]] = n.input[0]
        drop |= {n.name, dq_of[n.output[0]].name}
    keep = [n for n in m.graph.node if n.name not in drop]
    for n in keep:
        n.input[:] = [alias.get(i, i) for i in n.input]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_centred_quantizers_compute_the_same_function_on_all_255_levels(default_run_64: Path, tmp_path: Path) -> None:
    """Centring the TensorRT form's quantizers on ReLU6 outputs (quantize.centred_tensors) moves constants between
    biases (and, padded, into the Pad nodes the ``pads`` graph pass puts in front of the quantizers of padded
    convolutions) so the float function is unchanged; the centred quantizers then use both halves of the INT8
    range, the graph stays valid TensorRT Q/DQ with every Conv reading a DequantizeLinear, and the INT8 logits
    come closer to FP32."""
    from tledge.export.int8.passes.pads import pad_explicitly
    from tledge.export.int8.quantize import activation_quantizers, centred_offsets
    fp32, x, stats = _demo_graph_and_stats(default_run_64, tmp_path)
    batches = [x[:32], x[32:]]
    ref = ort.logits(fp32, batches, 1)
    padded, convs = pad_explicitly(fp32)
    assert len(convs) == 17  # mobilenet_v2's depthwise convs that read a ReLU6 (the first reads the stem's)
    np.testing.assert_allclose(ort.logits(padded, batches, 1), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    padded_stats = cal.collect(padded, activation_tensors(padded), batches)
    mse = {}
    for mode in ("off", "exact", "padded"):
        g, st = (padded, padded_stats) if mode == "padded" else (fp32, stats)
        q = quantize_model(g, st, "tensorrt", "percentile", centre=mode)
        assert check_tensorrt_qdq(q) == []
        offsets = centred_offsets(q)
        centred = [n.input[0] for n in activation_quantizers(q) if n.input[0] in offsets]
        n_pad = sum(n.op_type == "Pad" for n in q.graph.node)
        # mobilenet_v2: 17 ReLU6 outputs read by a 1x1 projection (exact), 17 more by a padded depthwise conv
        assert (len(centred), n_pad) == {"off": (0, 0), "exact": (17, 0), "padded": (34, 17)}[mode]
        producer = {o: n for n in q.graph.node for o in n.output}
        for n in q.graph.node:
            if n.op_type == "Conv":  # TensorRT's INT8 convolution pattern: DQ -> Conv, nothing in between
                assert producer[n.input[0]].op_type == "DequantizeLinear", n.name
            if n.op_type == "Pad":   # in front of the quantizer, padding with the centred value of FP32's zero
                assert producer[n.input[0]].op_type == "Clip"
                value = next(i for i in q.graph.initializer if i.name == n.input[2])
                assert float(onnx.numpy_helper.to_array(value)) == pytest.approx(-offsets[n.output[0]])
        # the float function is unchanged: the same graph with float weights and no activation quantizers is FP32
        flat = _without_activation_qdq(quantize_model(g, st, "tensorrt", "percentile", centre=mode,
                                                      float_weights=True))
        np.testing.assert_allclose(ort.logits(flat, batches, 1, optimize=False), ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())
        # a centred quantizer maps FP32's zeros to -127 and its range's top towards +127
        qnodes = [n for n in activation_quantizers(q) if n.input[0] in offsets]
        if qnodes:
            sess, inp = ort.probe_session(q, [n.output[0] for n in qnodes], 1)
            vals = sess.run([n.output[0] for n in qnodes], {inp: x})
            assert all(int(v.min()) == -127 for v in vals)
            assert np.median([int(v.max()) for v in vals]) > 100
        mse[mode] = float(np.mean((ort.logits(q, batches, 1) - ref) ** 2))
    assert mse["padded"] < mse["off"]
    # the CPU form has a zero-point: nothing to centre, and its convolutions pad themselves again: the very graph
    # quantized without the pads pass (the Pads' readers read the Clip outputs again, with their statistics)
    a = quantize_model(padded, padded_stats, "cpu", "percentile", centre="padded")
    b = quantize_model(padded, padded_stats, "cpu", "percentile", centre="off")
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    c = quantize_model(fp32, stats, "cpu", "percentile", centre="exact")
    assert a.SerializeToString(deterministic=True) == c.SerializeToString(deterministic=True)
    exact = quantize_model(padded, padded_stats, "tensorrt", "percentile", centre="exact")
    assert exact.SerializeToString(deterministic=True) == \
        quantize_model(fp32, stats, "tensorrt", "percentile", centre="exact").SerializeToString(deterministic=True)
    assert not any(n.op_type == "Pad" for n in a.graph.node)
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in c.graph.node)
    assert sorted(n.input[0] for n in activation_quantizers(a)) == sorted(quantized_tensors(padded, "cpu"))

    def conv_pads(m):
        return {n.name: [list(x.ints) for x in n.attribute if x.name == "pads"] for n in m.graph.node
                if n.op_type == "Conv"}
    assert conv_pads(a) == conv_pads(c)
    # --centre off in the TensorRT form: the same, nothing pads with anything but 0
    off = quantize_model(padded, padded_stats, "tensorrt", "percentile")
    assert not any(n.op_type == "Pad" for n in off.graph.node)
    # a padded input the gate keeps in float is not centred: its convolution pads itself again, the others keep theirs
    first = next(n for n in padded.graph.node if n.op_type == "Pad")
    kept = quantize_model(padded, padded_stats, "tensorrt", "percentile", centre="padded",
                          exclude_tensors={first.output[0]})
    assert sum(n.op_type == "Pad" for n in kept.graph.node) == 16 and first.output[0] not in centred_offsets(kept)
    conv = next(n for n in kept.graph.node if n.name == convs[0])
    assert conv.input[0] == first.input[0]  # the Clip's output, read in float
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 1, 1, 1]]
    np.testing.assert_allclose(ort.logits(_without_activation_qdq(quantize_model(
        padded, padded_stats, "tensorrt", "percentile", centre="padded", exclude_tensors={first.output[0]},
        float_weights=True)), batches, 1, optimize=False), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # QAT's uncentre gives back the float graph's biases, the depthwise convs' behind the new Pads included
    from onnx import numpy_helper

    from tledge.export.int8.passes.qat import build, trained_tensors, uncentre
    q = quantize_model(padded, padded_stats, "tensorrt", "percentile", centre="padded")
    trained = trained_tensors(build(q), padded)
    uncentre(q, trained, padded)
    inits = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer}
    biases = [n.input[2] for n in padded.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    for b in biases:
        np.testing.assert_allclose(trained[b], inits[b], rtol=1e-5, atol=1e-5 * np.abs(inits[b]).max(), err_msg=b)


def test_centring_pads_with_minus_s_in_the_exporters_own_pad_nodes(tmp_path: Path) -> None:
    """EfficientNet-Lite pads in the graph ("same" padding: a constant-zero Pad node, fed by the ReLU6 and by a
    Shape chain, before each depthwise conv). Centring those quantizers needs no node: the Pad pads with -s
    instead of 0, so --centre exact centres the depthwise inputs too, and the float function stays FP32's."""
    from tledge.export.int8.quantize import activation_quantizers, centred_offsets
    from tledge import backbones
    card = fake_card("efficientnet_lite0", 64)
    torch.manual_seed(0)
    # ImageNet weights: a randomly initialised one gives the same logits for any input (no check could fail)
    model = build_classifier(card).eval()
    imagenet, _ = backbones.build_backbone(backbones.get("efficientnet_lite0"), "imagenet")
    model.backbone.load_state_dict(imagenet.state_dict())
    onnx_io.export(model, card, tmp_path / "m.onnx")
    fp32 = onnx_io.fold_shapes(onnx.load(str(tmp_path / "m.onnx")))
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    batches = [x[:8], x[8:]]
    stats = cal.collect(fp32, activation_tensors(fp32), batches)
    ref = ort.logits(fp32, batches, 1)
    producer = {o: n for n in fp32.graph.node for o in n.output}
    pads = [n for n in fp32.graph.node if n.op_type == "Pad" and producer.get(n.input[0]) is not None
            and producer[n.input[0]].op_type == "Clip"]
    assert len(pads) == 16  # the depthwise convs of blocks 0-15 (the stem's Pad reads the input)
    for mode in ("off", "exact", "padded"):
        q = quantize_model(fp32, stats, "tensorrt", "percentile", centre=mode)
        assert check_tensorrt_qdq(q) == []
        offsets = centred_offsets(q)
        q_producer = {o: n for n in q.graph.node for o in n.output}
        centred = [n.input[0] for n in activation_quantizers(q) if n.input[0] in offsets]
        by_pad = [t for t in centred if q_producer[t].op_type == "Pad"]
        assert len(by_pad) == (0 if mode == "off" else 16)
        assert sum(n.op_type == "Pad" for n in q.graph.node) == sum(n.op_type == "Pad" for n in fp32.graph.node)
        for t in by_pad:  # pads with -s, the centred value of FP32's zero
            value = next(i for i in q.graph.initializer if i.name == q_producer[t].input[2])
            assert float(onnx.numpy_helper.to_array(value)) == pytest.approx(-offsets[t])
        flat = _without_activation_qdq(quantize_model(fp32, stats, "tensorrt", "percentile", centre=mode,
                                                      float_weights=True))
        np.testing.assert_allclose(ort.logits(flat, batches, 1, optimize=False), ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())
        if by_pad:  # FP32's zeros (the padding among them) quantize to -127
            sess, inp = ort.probe_session(q, [f"{t}__q" for t in by_pad], 1)
            assert all(int(v.min()) == -127 for v in sess.run([f"{t}__q" for t in by_pad], {inp: x[:4]}))
    # QAT trains the centred graph; passes.qat.uncentre turns its biases back into the float graph's: untrained,
    # exactly FP32's (each centred tensor's reader corrected once, though its Clip output is centred too)
    from onnx import numpy_helper

    from tledge.export.int8.passes.qat import build, trained_tensors, uncentre
    q = quantize_model(fp32, stats, "tensorrt", "percentile", centre="exact")
    trained = trained_tensors(build(q), fp32)
    uncentre(q, trained, fp32)
    inits = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    biases = [n.input[2] for n in fp32.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert len(biases) == 49
    for b in biases:
        np.testing.assert_allclose(trained[b], inits[b], rtol=1e-5, atol=1e-5 * np.abs(inits[b]).max(), err_msg=b)
