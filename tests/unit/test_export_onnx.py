"""Export parity for every registered backbone (small input, random weights), metadata, FP16, and the
external-data path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tledge import backbones
from tledge.export import onnx as onnx_io
from tledge.export.fp16 import to_fp16
from tledge.model import build_classifier
from tledge.runtimes.onnxruntime import OrtRunner


def fake_card(name: str, size: int = 64, classes: int = 3) -> dict:
    spec = backbones.get(name)
    size = max(size, spec.min_size)
    size += -size % spec.size_multiple
    return {"backbone": {"name": name}, "head": {"kind": "linear", "in_features": spec.feature_dim},
            "classes": [f"c{i}" for i in range(classes)], "preprocess": spec.preprocess.scaled(size).to_dict(),
            "tledge_version": "test"}


@pytest.mark.parametrize("name", backbones.names())
def test_export_parity_every_backbone(name: str, tmp_path: Path) -> None:
    card = fake_card(name, 80 if name == "inception_v3" else 64)
    torch.manual_seed(0)
    model = build_classifier(card).eval()
    files = onnx_io.export(model, card, tmp_path / "m.onnx")
    size = card["preprocess"]["crop"]
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)  # batch 3 != export's 2
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    with OrtRunner(files[0]) as r:
        got = r.infer(x)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    meta = onnx_io.read_metadata(files[0])
    assert meta["classes"] == card["classes"] and meta["preprocess"]["crop"] == size and meta["output"] == "logits"
    m = onnx.load(str(files[0]), load_external_data=False)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(n.op_type == "Constant" for n in m.graph.node)


def test_fp16_graph_runs_and_stays_close(tmp_path: Path) -> None:
    card = fake_card("mobilenet_v2")
    model = build_classifier(card).eval()
    onnx_io.export(model, card, tmp_path / "m.onnx")
    half, info = to_fp16(onnx.load(str(tmp_path / "m.onnx")))
    assert info["weights_clipped_to_fp16_range"] == 0
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
    assert not any(i.data_type == onnx.TensorProto.FLOAT for i in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx_io.save_model(half, tmp_path / "h.onnx")
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with OrtRunner(tmp_path / "m.onnx") as a, OrtRunner(tmp_path / "h.onnx") as b:
        ya, yb = a.infer(x), b.infer(x)
    assert yb.dtype == np.float32
    np.testing.assert_allclose(yb, ya, atol=0.05 * np.abs(ya).max() + 1e-3)


def test_large_models_keep_weights_in_one_data_file(tmp_path: Path) -> None:
    card = fake_card("resnet18")
    model = build_classifier(card).eval()
    onnx_io.export(model, card, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    old = onnx_io.EXTERNAL_DATA_LIMIT
    try:
        onnx_io.EXTERNAL_DATA_LIMIT = 1000  # force the >2 GB path on a small model
        files = onnx_io.save_model(m, tmp_path / "big" / "model.onnx")
    finally:
        onnx_io.EXTERNAL_DATA_LIMIT = old
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "big" / "model.onnx").stat().st_size < 200_000
    x = np.zeros((1, 3, 64, 64), np.float32)
    with OrtRunner(tmp_path / "m.onnx") as a, OrtRunner(files[0]) as b:
        np.testing.assert_allclose(a.infer(x), b.infer(x), atol=1e-6)


def test_fold_shapes_computes_runtime_padding_once_and_keeps_outputs(tmp_path: Path) -> None:
    """EfficientNet-Lite's TF-style "same" padding is exported as Shape/Cast/... chains before every Pad;
    the folded graph (what INT8 quantizes) has none of the casts left and the same outputs."""
    card = fake_card("efficientnet_lite0", 64)
    torch.manual_seed(0)
    onnx_io.export(build_classifier(card).eval(), card, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    f = onnx_io.fold_shapes(m)
    ops = [n.op_type for n in f.graph.node]
    assert len(f.graph.node) < len(m.graph.node) and "Cast" in [n.op_type for n in m.graph.node]
    assert "Cast" not in ops and "ConstantOfShape" not in ops
    assert {o.domain for o in f.opset_import} <= {"", "ai.onnx"} and f.metadata_props == m.metadata_props
    onnx.checker.check_model(f)
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    onnx.save(f, str(tmp_path / "f.onnx"))
    with OrtRunner(tmp_path / "m.onnx", "cpu", 1) as a, OrtRunner(tmp_path / "f.onnx", "cpu", 1) as b:
        np.testing.assert_allclose(b.infer(x), a.infer(x), rtol=1e-5, atol=1e-5)


def test_qat_interpreter_runs_efficientnet_lite_shape_arithmetic(tmp_path: Path) -> None:
    """QAT's torch interpreter computes EfficientNet-Lite's graph, folded or not: the Shape -> Gather ->
    Unsqueeze -> Slice -> Transpose chains of its run-time padding (the batch is dynamic, so folding keeps
    them) give onnxruntime's logits, at a batch size other than the export's."""
    from tledge.export.int8.passes.qat import build
    card = fake_card("efficientnet_lite0", 64)
    torch.manual_seed(0)
    onnx_io.export(build_classifier(card).eval(), card, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    for g in (m, onnx_io.fold_shapes(m)):
        assert {"Shape", "Gather", "Slice", "Transpose"} <= {n.op_type for n in g.graph.node}
        onnx.save(g, str(tmp_path / "g.onnx"))
        with OrtRunner(tmp_path / "g.onnx", "cpu", 1) as r, torch.no_grad():
            np.testing.assert_allclose(build(g).eval()(torch.from_numpy(x)).numpy(), r.infer(x), rtol=1e-4, atol=1e-4)
