"""The GPU and TensorRT half for real: these run where a CUDA GPU (and TensorRT) exist, and skip themselves
elsewhere (conftest's markers). benchmarks/gpu_check.sh runs them on a lent GPU machine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.mark.gpu
def test_cuda_layer_round_trip_events_and_graph_replay() -> None:
    from tledge.deploy.tledge_runtime import cuda

    ok, why = cuda.available()
    if not ok:
        pytest.skip(f"tledge_runtime's CUDA layer cannot load: {why}")
    info = cuda.device_info()
    assert info["sm_count"] > 0 and "." in info["compute_capability"]
    n = 1 << 20
    host, out = cuda.HostBuffer((n,), np.float32), cuda.HostBuffer((n,), np.float32)
    host.array[:] = np.arange(n, dtype=np.float32)
    d, s = cuda.DeviceBuffer(n * 4), cuda.Stream()
    e0, e1 = cuda.Event(), cuda.Event()
    e0.record(s)
    s.copy_in(d, host.array)
    s.copy_out(out.array, d)
    e1.record(s)
    s.synchronize()
    assert np.array_equal(out.array, host.array) and cuda.Event.elapsed_ms(e0, e1) > 0
    g = cuda.Graph(s)
    g.begin()
    s.copy_in(d, host.array)
    s.copy_out(out.array, d)
    g.end()
    host.array[:] = 3.0
    g.launch()
    s.synchronize()
    assert np.all(out.array == 3.0)
    for obj in (g, e0, e1, host, out, d, s):
        obj.close()


def _tiny_onnx(path: Path) -> None:
    import torch
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engine_matches_onnxruntime_for_any_batch(tmp_path: Path, cuda_graph: bool) -> None:
    import onnxruntime as ort

    from tledge.deploy.tledge_runtime import engine as rt

    onnx_path = tmp_path / "tiny.onnx"
    _tiny_onnx(onnx_path)
    side = rt.build(onnx_path, tmp_path / "tiny.fp16.engine", "fp16", batch=(2, 4, 8), workspace_mib=256,
                    timing_cache=tmp_path / "timing.cache")
    assert side["recipe_sha256"] and side["fingerprint"].get("sm_count")
    x = np.random.default_rng(0).standard_normal((11, 3, 16, 16)).astype(np.float32)  # 8 + 3, and 1 < min
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    eng = rt.TrtEngine(tmp_path / "tiny.fp16.engine", cuda_graph=cuda_graph)
    try:
        for _ in range(3):
            y = eng.infer(x)
        np.testing.assert_allclose(y, ref, atol=2e-2, rtol=2e-2)
        np.testing.assert_allclose(eng.infer(x[:1]), ref[:1], atol=2e-2, rtol=2e-2)
        assert all(ms > 0 for ms in eng.device_ms)
    finally:
        eng.close()
