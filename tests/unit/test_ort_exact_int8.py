"""INT8 graphs give the same integers on every x86 CPU: onnxruntime's fast u8s8 kernels saturate 16-bit
pair sums on CPUs without VNNI (AVX2, e.g. AMD EPYC Zen 3), which changed tledge's accuracy figures and
pass decisions with the machine. tledge's sessions ask for the exact kernels (EXACT_INT8)."""
from __future__ import annotations

import numpy as np

C = 64  # input channels: 64 products of 255 * 127 overflow any 16-bit pair sum


def _saturating_conv() -> object:
    """DQ -> 1x1 Conv -> Q -> DQ with uint8 activations of 255 and int8 weights of 127: onnxruntime fuses
    it into QLinearConv, where a saturating kernel gives about half the exact sum."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"])]
    inits = [nh.from_array(np.array(1.0, np.float32), "sx"), nh.from_array(np.array(0, np.uint8), "zx"),
             nh.from_array(np.full((8, C, 1, 1), 127, np.int8), "w"), nh.from_array(np.ones(8, np.float32), "sw"),
             nh.from_array(np.zeros(8, np.int8), "zw"), nh.from_array(np.array(10000.0, np.float32), "sy"),
             nh.from_array(np.array(0, np.uint8), "zy")]
    g = helper.make_graph(nodes, "saturation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 4, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


EXACT = round(255 * 127 * C / 10000) * 10000.0


def test_export_sessions_compute_int8_exactly() -> None:
    from tledge.export import ort

    x = np.full((1, C, 4, 4), 255, np.float32)
    y = ort.logits(_saturating_conv(), [x])  # fused (optimize=True), as the checks and passes run INT8 graphs
    assert np.all(y == EXACT), f"got {np.unique(y)}, exact {EXACT}"


def test_runner_and_device_runtime_compute_int8_exactly(tmp_path) -> None:
    import onnx

    from tledge.deploy.tledge_runtime.__main__ import OrtModel
    from tledge.runtimes.onnxruntime import OrtRunner

    p = tmp_path / "sat.onnx"
    onnx.save(_saturating_conv(), p)
    x = np.full((1, C, 4, 4), 255, np.float32)
    with OrtRunner(p, threads=1) as r:
        assert np.all(r.infer(x) == EXACT)
    assert np.all(OrtModel(p, threads=1).infer(x) == EXACT)


def test_the_minimal_case_is_a_real_probe() -> None:
    """Documents what the option changes: without it the result is either exact (VNNI/AMX CPUs) or about
    half of it (saturated); anything else would mean the probe graph does not test what it claims."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "0")
    s = ort.InferenceSession(_saturating_conv().SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": np.full((1, C, 4, 4), 255, np.float32)})[0]
    saturated = round(32767 * (C // 2) / 10000) * 10000.0
    assert np.all(y == EXACT) or np.all(y == saturated), np.unique(y)
