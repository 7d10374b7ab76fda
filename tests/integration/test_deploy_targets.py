"""Issue 13: graphs that take raw pixels (`export --input raw`), DeepStream nvinfer configs and a Triton model
repository (`bundle --target deepstream --target triton`), on the real 64 px mobilenet_v2 run."""
from __future__ import annotations

import configparser
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tledge import card as card_mod
from tledge.data import scan
from tledge.deploy import deepstream
from tledge.deploy.bundle import make_bundle
from tledge.deploy.tledge_runtime import bundle_io
from tledge.errors import UsageError
from tledge.export import ort, raw_input
from tledge.export.artefacts import FILES
from tledge.export.pipeline import run_export
from tledge.preprocess import Preprocess, load_image
from tests.conftest import FASHION, copy_run, export_cfg

# Every key Gst-nvinfer's config parser knows (DeepStream 6.x sources/gst-plugins/gst-nvinfer/
# gstnvinfer_property_parser.h, CONFIG_GROUP_INFER_*), copied here so the check does not use tledge's own list.
NVINFER_KEYS = {
    "gie-unique-id", "process-mode", "interval", "labelfile-path", "gpu-id", "secondary-reinfer-interval",
    "output-tensor-meta", "enable-dla", "use-dla-core", "batch-size", "tensor-meta-pool-size", "network-mode",
    "model-engine-file", "int8-calib-file", "workspace-size", "output-blob-names", "is-classifier", "network-type",
    "force-implicit-batch-dim", "infer-dims", "output-io-formats", "layer-device-precision", "model-color-format",
    "net-scale-factor", "offsets", "mean-file", "maintain-aspect-ratio", "symmetric-padding", "scaling-filter",
    "scaling-compute-hw", "network-input-order", "input-tensor-from-meta", "custom-lib-path", "parse-bbox-func-name",
    "parse-bbox-instance-mask-func-name", "engine-create-func-name", "parse-classifier-func-name",
    "custom-network-config", "model-file", "proto-file", "uff-file", "uff-input-order", "input-dims",
    "uff-input-dims", "uff-input-blob-name", "tlt-encoded-model", "tlt-model-key", "onnx-file",
    "num-detected-classes", "enable-dbscan", "cluster-mode", "classifier-type", "classifier-threshold",
    "classifier-async-mode", "segmentation-threshold", "segmentation-output-order", "output-instance-mask",
    "input-object-min-width", "input-object-min-height", "input-object-max-width", "input-object-max-height",
    "operate-on-gie-id", "operate-on-class-ids", "filter-out-class-ids",
}


@pytest.fixture(scope="module")
def normal_run(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("normal") / "run")
    run_export(run, export_cfg(fp16=True))
    return run


@pytest.fixture(scope="module")
def raw_run(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("raw") / "run")
    run_export(run, dataclasses.replace(export_cfg(fp16=True), input="raw"))
    return run


def _val(n: int | None = None) -> tuple[list[str], np.ndarray]:
    rep = scan(FASHION)
    val = rep.val[:n] if n else rep.val
    return [s.path for s in val], np.array([s.label for s in val])


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.session(onnx.load(str(path)))
    return np.concatenate([sess.run(None, {"input": x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def test_raw_graphs_agree_with_the_normal_graphs_on_real_images(normal_run: Path, raw_run: Path) -> None:
    pre = card_mod.preprocess_of(card_mod.read(normal_run))
    files, labels = _val()
    pixels = np.stack([pre.pixels(load_image(f)) for f in files])
    x_norm, x_raw = pre.normalize(pixels).astype(np.float32), pixels.astype(np.float32)
    a = _logits(normal_run / FILES["fp32"], x_norm)
    b = _logits(raw_run / FILES["fp32"], x_raw)
    assert np.abs(a - b).max() <= 1e-4
    for key in ("int8-tensorrt", "int8-cpu"):
        top_n = (_logits(normal_run / FILES[key], x_norm).argmax(1) == labels).mean()
        top_r = (_logits(raw_run / FILES[key], x_raw).argmax(1) == labels).mean()
        assert abs(top_n - top_r) * 100 <= 0.1, (key, top_n, top_r)
    # the uint8 form of the same graph: identical logits from uint8 pixels
    u8 = raw_input.wrap(onnx.load(str(normal_run / FILES["fp32"])), pre.mean, pre.std, "uint8")
    sess = ort.session(u8)
    c = np.concatenate([sess.run(None, {"input": pixels[i:i + 64]})[0] for i in range(0, 256, 64)])
    assert np.abs(c - a[:256]).max() <= 1e-4


def test_raw_export_records_its_input_contract(raw_run: Path) -> None:
    m = json.loads((raw_run / "export_manifest.json").read_text())
    assert m["input"]["kind"] == "raw" and m["input"]["dtype"] == "float32"
    assert set(m["input"]["checks"]) == {"fp32", "fp16", "int8-tensorrt", "int8-cpu"}
    assert m["input"]["checks"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    for key in m["input"]["checks"]:
        g = onnx.load(str(raw_run / FILES[key]), load_external_data=False)
        props = {p.key: p.value for p in g.metadata_props}
        assert props["tledge.input"] == "raw-float32"
        assert json.loads(props["tledge.preprocess"])["input"] == "raw"
        assert [n.op_type for n in g.graph.node[:3]] == ["Div", "Sub", "Div"]
        assert m["artefacts"][key]["sha256"]  # the manifest hashes the wrapped file (lineage checks it)
    q = onnx.load(str(raw_run / FILES["int8-tensorrt"]))
    first_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    assert first_q.input[0] == raw_input.NORMALIZED  # the first quantizer sees the normalised tensor


def test_bench_feeds_raw_graphs_raw_pixels(raw_run: Path, tmp_path: Path) -> None:
    from tledge.bench.run import BenchConfig, run_bench
    run = copy_run(raw_run, tmp_path / "run")
    r = run_bench(run, BenchConfig(batches=(1,), budget_s=0.05, min_iters=2, warmup=1, end_to_end=True,
                                   max_images=120, providers=("cpu",), resize_mode="stretch"))
    assert r["resize_mode"] == {"measured": "stretch", "tuned": "shorter-side+center-crop"}
    fp32 = next(x for x in r["results"] if x["artefact"] == "onnx-fp32")
    assert fp32["input"] == "raw" and fp32["accuracy"]["top1_agreement"] == 1.0  # normalised input would collapse it


def _property(path: Path) -> dict[str, str]:
    cp = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str  # keep the keys' case
    cp.read(path)
    assert cp.sections() == ["property"]
    return dict(cp["property"])


@pytest.fixture(scope="module")
def raw_bundle(raw_run: Path) -> Path:
    return Path(make_bundle(raw_run, raw_run / "deploy", targets=("deepstream", "triton"),
                            deepstream_resize="stretch")["folder"])


def test_nvinfer_formula_on_the_config_reproduces_the_input_tensor(raw_bundle: Path) -> None:
    manifest = bundle_io.verify(raw_bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    files, _ = _val(16)
    for cfg in (deepstream.PRIMARY, deepstream.SECONDARY):
        p = _property(raw_bundle / "deepstream" / cfg)
        scale = float(p["net-scale-factor"])
        offsets = np.array([float(v) for v in p["offsets"].split(";")], np.float32)[:, None, None]
        for f in files:
            x = pre.pixels(load_image(f)).astype(np.float32)  # nvinfer's x: the fitted 0-255 pixels
            y = scale * (x - offsets)
            np.testing.assert_allclose(y, pre(f), atol=1e-5, rtol=0)


def test_nvinfer_formula_for_a_shared_std_and_refusal_otherwise() -> None:
    pre = Preprocess(73, 64, mean=(0.498, 0.5, 0.502), std=(0.5, 0.5, 0.5), resize_mode="stretch")
    scale, offsets = deepstream.scale_and_offsets(pre)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64)).astype(np.float32)
    y = np.float32(scale) * (x - np.array(offsets, np.float32)[:, None, None])
    np.testing.assert_allclose(y, pre.normalize(x.astype(np.uint8)), atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="one net-scale-factor") as e:
        deepstream.scale_and_offsets(Preprocess(73, 64))  # ImageNet std differs per channel
    assert "--input raw" in e.value.fix


def test_deepstream_configs_use_documented_keys_and_right_values(raw_bundle: Path, raw_run: Path) -> None:
    ds = raw_bundle / "deepstream"
    classes = card_mod.read(raw_run)["classes"]
    for cfg, mode, batch in ((deepstream.PRIMARY, "1", "1"), (deepstream.SECONDARY, "2", "32")):
        p = _property(ds / cfg)
        assert set(p) <= NVINFER_KEYS, set(p) - NVINFER_KEYS
        assert p["network-type"] == "1" and p["network-mode"] == "1" and p["process-mode"] == mode
        assert p["batch-size"] == batch and p["infer-dims"] == "3;64;64" and p["model-color-format"] == "0"
        assert (p["maintain-aspect-ratio"], p["symmetric-padding"]) == ("0", "0")  # stretch
        assert (ds / p["onnx-file"]).is_file() and (ds / p["labelfile-path"]).is_file()
        assert p["model-engine-file"] == f"{p['onnx-file']}_b{batch}_gpu0_int8.engine"
    assert (ds / "labels.txt").read_text() == ";".join(classes) + "\n"
    g = onnx.load(str(ds / _property(ds / deepstream.PRIMARY)["onnx-file"]))
    assert [o.name for o in g.graph.output] == ["probs"]
    files, _ = _val(64)
    pre = card_mod.preprocess_of(card_mod.read(raw_run)).with_input("raw")
    x = np.stack([pre(f) for f in files])
    probs = ort.session(g).run(None, {"input": x})[0]
    logits = _logits(raw_run / FILES["int8-tensorrt"], x)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()


def _model_config_pb2():
    """Triton's own ModelConfig schema from the tritonclient wheel. Loaded from its file: the package's
    tritonclient.grpc/__init__ needs grpcio, which the schema does not."""
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None, "tritonclient is not installed: `make setup` installs it (pip install --no-deps tritonclient)"
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    s = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def test_triton_configs_parse_with_tritons_schema(raw_bundle: Path, raw_run: Path) -> None:
    from google.protobuf import text_format
    mc = _model_config_pb2()
    repo = raw_bundle / "triton"
    n_classes = len(card_mod.read(raw_run)["classes"])
    configs = {}
    for p in sorted(repo.glob("*/config.pbtxt")):
        c = text_format.Parse(p.read_text(), mc.ModelConfig())  # strict: an unknown field fails
        assert c.name == p.parent.name and c.max_batch_size == 32
        configs[c.name] = c
    name = json.loads((raw_bundle / "bundle.json").read_text())["targets"]["triton"]["model"]
    assert set(configs) == {name, f"{name}_onnx", f"{name}_trt", f"{name}_preprocess"}
    for m in (f"{name}_onnx", f"{name}_trt"):
        c = configs[m]
        assert c.HasField("dynamic_batching")
        assert [tuple(i.dims) for i in c.input] == [(3, 64, 64)] and c.input[0].data_type == mc.TYPE_FP32
        assert [tuple(o.dims) for o in c.output] == [(n_classes,)]
        assert (repo / m / c.output[0].label_filename).is_file()
    assert configs[f"{name}_onnx"].platform == "onnxruntime_onnx" and (repo / f"{name}_onnx/1/model.onnx").is_file()
    assert configs[f"{name}_trt"].platform == "tensorrt_plan"
    assert configs[f"{name}_preprocess"].backend == "python" and configs[f"{name}_preprocess"].input[0].data_type == mc.TYPE_STRING
    steps = configs[name].ensemble_scheduling.step
    assert [s.model_name for s in steps] == [f"{name}_preprocess", f"{name}_trt"]


def test_triton_preprocess_model_computes_tledges_tensor(raw_bundle: Path, raw_run: Path) -> None:
    name = json.loads((raw_bundle / "bundle.json").read_text())["targets"]["triton"]["model"]
    d = raw_bundle / "triton" / f"{name}_preprocess" / "1"
    spec = importlib.util.spec_from_file_location("triton_tledge_model", d / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files, _ = _val(8)
    batch = np.array([[Path(f).read_bytes()] for f in files], dtype=object)  # Triton's (N, 1) TYPE_STRING
    got = mod.preprocess_batch(mod.load_recipe(), batch)
    want = np.stack([card_mod.preprocess_of(card_mod.read(raw_run)).with_input("raw")(f) for f in files])
    np.testing.assert_array_equal(got, want)


def test_one_bundle_serves_every_target_and_the_runtime_still_predicts(raw_bundle: Path) -> None:
    m = bundle_io.verify(raw_bundle)
    assert set(m["targets"]) == {"python", "deepstream", "triton"}
    assert any(f.startswith("deepstream/") for f in m["files"]) and any(f.startswith("triton/") for f in m["files"])
    files, _ = _val(4)
    out = subprocess.run([sys.executable, "-m", "tledge_runtime", "predict", *files, "--json", "--backend", "onnxruntime"],
                         cwd=raw_bundle, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 4 and all(r["top"][0]["prob"] > 0.3 for r in rows)


def test_deepstream_refuses_what_nvinfer_cannot_reproduce(normal_run: Path, raw_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="one net-scale-factor"):
        make_bundle(normal_run, tmp_path / "a", targets=("deepstream",), deepstream_resize="stretch")
    with pytest.raises(UsageError, match="nvinfer cannot do") as e:
        make_bundle(raw_run, tmp_path / "b", targets=("deepstream",))
    assert "--resize-mode stretch" in e.value.fix
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tune_records_the_resize_mode_and_trains_with_it(tiny_data: Path, tmp_path: Path) -> None:
    from tledge.tune import TuneConfig, run_tune
    cfg = TuneConfig(backbone="mobilenet_v2", image_size=64, epochs=2, workers=0, resize_mode="letterbox",
                     cache_dir=str(tmp_path / "cache"))
    card = run_tune(tiny_data, tmp_path / "run", cfg)
    assert card_mod.read(tmp_path / "run")["preprocess"]["resize_mode"] == "letterbox"
    assert card["preprocess"]["resize_mode"] == "letterbox"
    with pytest.raises(UsageError, match="unknown resize mode 'crop'"):
        run_tune(tiny_data, tmp_path / "run2", dataclasses.replace(cfg, resize_mode="crop"))
    assert not (tmp_path / "run2").exists()
