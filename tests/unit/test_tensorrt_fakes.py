"""The TensorRT and GPU half without a GPU: fakes that follow each TensorRT version's real Python API
(enum values of NvInfer.h / python/src/infer/pyCore.cpp: 8.6 for JetPack 5-6.0, 10.3 for JetPack 6.1+,
11.1 without precision flags, calibrators or DLA), and the decisions around them: flags, DLA refusals,
stale engines, batch chunking, CUDA-graph fallback, errors contained as TledgeError, provider fallback.
The same code paths run for real under the `tensorrt`/`gpu` markers where a GPU exists (gpu_check.sh)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tledge.deploy.tledge_runtime import cuda
from tledge.deploy.tledge_runtime import engine as rt
from tledge.errors import GpuError, MissingDependency, TledgeError
from tledge.export import tensorrt as trtb


def fake_trt(version: str) -> SimpleNamespace:
    """The parts of the tensorrt module tledge probes, with the version's real enum values."""
    major = int(version.split(".")[0])
    if major == 8:    # NetworkDefinitionCreationFlag: kEXPLICIT_BATCH = 0, kEXPLICIT_PRECISION = 1 (deprecated)
        ndcf = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1}
        flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "STRICT_TYPES": 4, "REFIT": 5}
    elif major == 10:  # kEXPLICIT_BATCH = 0 (deprecated, ignored), kSTRONGLY_TYPED = 1, kPREFER_JIT/AOT_PYTHON_PLUGINS
        ndcf = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}
        flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4}
    else:              # 11.x: always strongly typed; kSTRONGLY_TYPED = 0 kept, deprecated and ignored; no FP16/INT8
        ndcf = {"STRONGLY_TYPED": 0}
        flags = {"DEBUG": 0, "GPU_FALLBACK": 1, "REFIT": 2}
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**ndcf),
                           BuilderFlag=SimpleNamespace(**{k: f"BuilderFlag.{k}" for k in flags}),
                           float32="DataType.FLOAT", float16="DataType.HALF")


@pytest.mark.parametrize("version, flags, strongly", [("8.6.2", 1 << 0, False), ("10.3.0", 1 << 1, True),
                                                      ("11.1.0", 1 << 0, True)])
def test_network_flags_per_version(version: str, flags: int, strongly: bool) -> None:
    assert rt.network_flags(fake_trt(version)) == (flags, strongly)


def test_precision_flags_per_version() -> None:
    t8 = fake_trt("8.6.2")
    assert rt.precision_flags(t8, "int8", False) == ["BuilderFlag.INT8"]
    assert rt.precision_flags(t8, "fp16", False) == ["BuilderFlag.FP16"]
    # INT8 on DLA with 8.x also sets FP16, so the layers the Q/DQ graph leaves in float can stay on DLA
    assert rt.precision_flags_for_dla(t8, "int8", False, 0) == ["BuilderFlag.INT8", "BuilderFlag.FP16"]
    assert rt.precision_flags_for_dla(t8, "int8", False, None) == ["BuilderFlag.INT8"]
    for v in ("10.3.0", "11.1.0"):
        assert rt.precision_flags_for_dla(fake_trt(v), "int8", True, 0) == []
    with pytest.raises(trtb.EngineBuildError, match="8.5 or newer"):
        trtb.precision_flags(SimpleNamespace(BuilderFlag=SimpleNamespace()), "int8", False)


@pytest.mark.parametrize("version, batch, cores, core, match", [
    ("11.1.0", (4, 4, 4), 2, 0, "has no DLA support"),
    ("10.3.0", (1, 8, 32), 2, 0, "DLA needs a static batch"),
    ("10.3.0", (4, 4, 4), 0, 0, "this device has no DLA"),
    ("8.6.2", (4, 4, 4), 2, 2, "does not exist: this device has DLA cores 0..1"),
])
def test_dla_refusals(version: str, batch: tuple, cores: int, core: int, match: str) -> None:
    with pytest.raises(rt.EngineError, match=match):
        rt.check_dla(fake_trt(version), batch, core, cores)


def test_dla_accepted_where_it_exists() -> None:
    rt.check_dla(fake_trt("11.4.1"), (4, 4, 4), 0, 2)
    rt.check_dla(fake_trt("8.6.2"), (1, 1, 1), 1, 2)
    rt.check_dla(fake_trt("11.1.0"), (1, 8, 32), None, 0)  # no DLA asked: nothing to refuse


def test_fingerprint_tells_orin_nano_from_agx_orin() -> None:
    nano = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "sm_count": 8, "l4t": "36.4"}
    agx = {**nano, "sm_count": 16}
    assert rt.fingerprint_key(nano) != rt.fingerprint_key(agx)
    assert rt.compatibility_problems({"fingerprint": nano}, agx) == ["built for SM count 8, this machine has 16"]
    side = {"fingerprint": {"tensorrt": "8.6.2", "gpu": "Orin", "compute_capability": "8.7"}}
    here = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    assert rt.compatibility_problems(side, here) == ["built with TensorRT 8.6.2, this machine has 10.3.0"]
    assert "compute capability 8.7" in rt.compatibility_problems(
        side, {**here, "tensorrt": "8.6.2", "compute_capability": "7.2"})[0]


def test_recipe_changes_with_every_build_option() -> None:
    t = fake_trt("10.3.0")
    base = rt.recipe_sha256(rt.recipe(t, "int8", True, (1, 8, 32), 1024, None))
    others = [rt.recipe(t, "fp16", True, (1, 8, 32), 1024, None), rt.recipe(t, "int8", True, (1, 1, 8), 1024, None),
              rt.recipe(t, "int8", True, (1, 8, 32), 2048, None), rt.recipe(fake_trt("10.3.1"), "int8", True,
                                                                             (1, 8, 32), 1024, None)]
    assert len({base, *map(rt.recipe_sha256, others)}) == 5


def _sidecar(tmp_path: Path, onnx_sha: str, batch: list[int], recipe_sha: str, fp: dict) -> Path:
    import json
    dest = tmp_path / "model.int8.engine"
    dest.write_bytes(b"engine bytes")
    side = {"onnx_sha256": onnx_sha, "profile": dict(zip(("min", "opt", "max"), batch)), "dla_core": None,
            "recipe_sha256": recipe_sha, "engine_sha256": rt.sha256(dest), "fingerprint": fp}
    Path(str(dest) + ".json").write_text(json.dumps(side))
    return dest


def test_stale_engines_are_rebuilt_not_loaded(tmp_path: Path) -> None:
    """`build --batch 1,1,8` then `predict` (default batch profile 1,8,32): before, the 1,1,8 engine was
    loaded and batch 16 ended in a traceback; now its profile does not match and it is rebuilt."""
    from tledge.deploy.tledge_runtime.__main__ import engine_status, wanted_recipe

    t = fake_trt("10.3.0")
    fp = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "sm_count": 16}
    manifest = {"files": {"model.int8.trt.onnx": "abc"}}
    want = wanted_recipe(t, "int8", (1, 8, 32), 1024, None)
    dest = _sidecar(tmp_path, "abc", [1, 1, 8], wanted_recipe(t, "int8", (1, 1, 8), 1024, None), fp)
    assert engine_status(dest, manifest, "int8", (1, 8, 32), None, fp, want) == (
        False, "it was built with another batch profile or DLA setting")
    dest = _sidecar(tmp_path, "abc", [1, 8, 32], want, fp)
    assert engine_status(dest, manifest, "int8", (1, 8, 32), None, fp, want)[0]
    assert "another build recipe" in engine_status(dest, manifest, "int8", (1, 8, 32), None, fp,
                                                   wanted_recipe(t, "int8", (1, 8, 32), 4096, None))[1]
    assert "another graph" in engine_status(dest, {"files": {"model.int8.trt.onnx": "new"}}, "int8", (1, 8, 32),
                                            None, fp, want)[1]
    assert "SM count" in engine_status(dest, manifest, "int8", (1, 8, 32), None, {**fp, "sm_count": 8}, want)[1]
    dest.write_bytes(b"another engine")
    assert "differs from the one its sidecar describes" in engine_status(dest, manifest, "int8", (1, 8, 32), None,
                                                                       fp, want)[1]


class FakeStream:
    def __init__(self) -> None:
        self.handle = SimpleNamespace(value=1)
        self.device: dict[int, np.ndarray] = {}

    def copy_in(self, dst: object, src: np.ndarray) -> None:
        self.device[id(dst)] = np.array(src)

    def copy_out(self, dst: np.ndarray, src: object) -> None:
        dst[:] = self.device[id(src)][: len(dst)]

    def synchronize(self) -> None:
        pass


class FakeContext:
    """Runs the 'network' (logits = sum of the input per image, over 3 classes) at the shape last set, within
    the profile, and records every shape TensorRT was given."""

    def __init__(self, eng: rt.TrtEngine, lo: int, hi: int, capture_fails: bool = False) -> None:
        self.eng, self.lo, self.hi, self.shapes, self.capture_fails = eng, lo, hi, [], capture_fails
        self.capturing = False

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes.append(tuple(shape))
        return self.lo <= shape[0] <= self.hi

    def execute_async_v3(self, stream: int) -> bool:
        if self.capturing and self.capture_fails:
            return False
        x = self.eng.stream.device[id(self.eng.d_in)]
        self.eng.stream.device[id(self.eng.d_out)] = np.repeat(x.reshape(len(x), -1).sum(1, keepdims=True), 3, 1)
        return True


class FakeEvent:
    def record(self, stream: object) -> None:
        pass

    def close(self) -> None:
        pass


class FakeGraph:
    """A CUDA graph that logs what the engine does with it; ``begin`` puts the fake context in capture mode."""

    def __init__(self, eng: "FakeEngine") -> None:
        self.eng = eng

    def begin(self) -> None:
        self.eng.context.capturing = True
        self.eng.events.append("begin")

    def end(self) -> None:
        self.eng.context.capturing = False
        self.eng.events.append("end")

    def abort(self) -> None:
        self.eng.events.append("abort")

    def launch(self) -> None:
        self.eng.events.append("launch")
        self.eng.context.execute_async_v3(1)

    def close(self) -> None:
        self.eng.events.append("close")


class FakeEngine(rt.TrtEngine):
    """A TrtEngine whose TensorRT context and CUDA objects are fakes; its infer logic is the real one."""

    def __init__(self, lo: int, hi: int, capture_fails: bool = False, cuda_graph: bool = False,
                 in_dtype: type = np.float32) -> None:
        self.path, self.cuda_graph, self.graphs, self.device_ms = Path("model.int8.engine"), cuda_graph, {}, []
        self.min_shape, self.max_shape, self.num_classes, self.input_name = (lo, 3, 2, 2), (hi, 3, 2, 2), 3, "input"
        self.stream, self.d_in, self.d_out = FakeStream(), object(), object()
        self.in_dtype = in_dtype
        self.h_in = SimpleNamespace(array=np.zeros(self.max_shape, in_dtype))
        self.h_out = SimpleNamespace(array=np.zeros((hi, 3), np.float32))
        self.ev_start, self.ev_end = FakeEvent(), FakeEvent()
        self.context = FakeContext(self, lo, hi, capture_fails)
        self.events: list[str] = []

    def _elapsed_ms(self) -> float:
        return 0.5

    def _new_graph(self) -> FakeGraph:
        return FakeGraph(self)


def test_a_uint8_input_engine_gets_uint8_pixels() -> None:
    """An engine of a graph exported with --input raw --input-dtype uint8: the pixels reach the device as uint8
    (no float conversion on the host), padded and chunked like any other batch."""
    eng = FakeEngine(2, 4, in_dtype=np.uint8)
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 2, 2)).astype(np.uint8)
    y = eng.infer(x)
    assert eng.h_in.array.dtype == np.uint8
    np.testing.assert_array_equal(y[:, 0], x.reshape(5, -1).sum(1))  # uint8 rows summed by the fake network
    assert eng.context.shapes == [(4, 3, 2, 2), (2, 3, 2, 2)]


def test_any_batch_is_split_and_padded_to_the_profile() -> None:
    eng = FakeEngine(2, 8)
    x = np.random.default_rng(0).standard_normal((19, 3, 2, 2)).astype(np.float32)
    y = eng.infer(x)
    np.testing.assert_allclose(y[:, 0], x.reshape(19, -1).sum(1), rtol=1e-5)
    assert eng.context.shapes == [(8, 3, 2, 2), (8, 3, 2, 2), (3, 3, 2, 2)]
    y1 = eng.infer(x[:1])  # below the minimum: padded to 2, one row returned
    assert y1.shape == (1, 3) and eng.context.shapes[-1] == (2, 3, 2, 2)
    np.testing.assert_allclose(y1, y[:1], rtol=1e-6)
    assert eng.device_ms == [1.5, 0.5]  # one figure per call, the chunks' device times added
    with pytest.raises(rt.EngineError, match="does not fit"):
        eng.infer(np.zeros((2, 3, 4, 4), np.float32))


def test_a_shape_refused_by_tensorrt_is_an_engine_error() -> None:
    eng = FakeEngine(2, 8)
    eng.context.hi = 4  # the context refuses what the profile read from the engine allows
    with pytest.raises(rt.EngineError, match="refused input shape"):
        eng.infer(np.zeros((8, 3, 2, 2), np.float32))


def test_cuda_graph_capture_failure_falls_back() -> None:
    eng = FakeEngine(1, 4, capture_fails=True, cuda_graph=True)
    x = np.ones((4, 3, 2, 2), np.float32)
    for _ in range(3):
        np.testing.assert_allclose(eng.infer(x)[:, 0], 12.0)
    assert eng.events == ["begin", "end", "abort"]  # captured once, failed, cleaned up; then ordinary launches
    assert eng.graphs == {(4, 3, 2, 2): None}
    ok = FakeEngine(1, 4, cuda_graph=True)
    for _ in range(3):
        np.testing.assert_allclose(ok.infer(x)[:, 0], 12.0)
    ok.infer(x[:2])
    assert ok.events == ["begin", "end", "launch", "launch", "begin", "end"]  # one graph per shape, replayed
    assert set(ok.graphs) == {(4, 3, 2, 2), (2, 3, 2, 2)}


def test_runner_errors_are_tledge_errors() -> None:
    from tledge.runtimes.tensorrt import TrtRunner

    class Broken:
        device_ms: list[float] = []

        def infer(self, x: np.ndarray) -> np.ndarray:
            raise cuda.CudaError("cudaMemcpyAsync H2D failed with CUDA error 700 an illegal memory access")

        def close(self) -> None:
            raise rt.EngineError("already gone")

    r = TrtRunner("model.int8.engine")
    r.engine = Broken()
    with pytest.raises(GpuError, match="illegal memory access") as exc:
        r.infer(np.zeros((1, 3, 2, 2), np.float32))
    assert isinstance(exc.value, TledgeError)
    with pytest.raises(rt.EngineError):
        r.deactivate()
    assert r.engine is None


def test_require_tensorrt_names_jetpack() -> None:
    if trtb.tensorrt_available()[0]:
        pytest.skip("TensorRT is present")
    with pytest.raises(MissingDependency, match="JetPack"):
        trtb.require_tensorrt()
    from tledge.runtimes.tensorrt import TrtRunner
    with pytest.raises(MissingDependency, match="TensorRT"):
        TrtRunner("model.int8.engine").activate()


def test_onnxruntime_provider_fallback_is_reported(tmp_path: Path) -> None:
    """onnxruntime asked for CUDA on a build without it falls back to the CPU, as it does when the CUDA or
    TensorRT provider fails: the row must be skipped, not labelled 'cuda'."""
    import onnx
    import onnxruntime as ort

    from tledge.runtimes.onnxruntime import ProviderFallback, is_quantized, provider_list, require_active
    from tests.unit.test_ort_exact_int8 import _saturating_conv

    p = tmp_path / "q.onnx"
    onnx.save(_saturating_conv(), p)
    sess = ort.InferenceSession(str(p), providers=provider_list("cuda", p, False))
    with pytest.raises(ProviderFallback, match="did not run the graph on CUDAExecutionProvider"):
        require_active(sess, "cuda")
    require_active(ort.InferenceSession(str(p), providers=provider_list("cpu", p, False)), "cpu")
    trt = provider_list("tensorrt", p, is_quantized(p))
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[0][1]["trt_int8_enable"] == "True"
    assert trt[0][1]["trt_engine_cache_enable"] == "True" and trt[1:] == ["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"]
