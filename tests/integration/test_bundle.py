"""`tledge bundle` and the torch-free runtime: a fresh virtual environment with only numpy, Pillow and
onnxruntime predicts like `tledge predict`; preprocessing parity; fingerprint rebuild logic; tar safety;
tamper detection."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tledge.deploy.bundle import make_bundle
from tledge.deploy.tledge_runtime import bundle_io
from tledge.deploy.tledge_runtime.__main__ import engine_dir, engine_path, engine_status
from tledge.errors import RunDirError
from tledge.export.pipeline import run_export
from tests.conftest import export_cfg, FASHION, copy_run


@pytest.fixture(scope="module")
def bundled(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("bundle") / "run")
    run_export(run, export_cfg(fp16=True))
    res = make_bundle(run)
    return run, Path(res["folder"])


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with only the runtime's needs (no torch, no tledge)."""
    venv = tmp_path_factory.mktemp("venv") / "rt"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy", "pillow", "onnxruntime"], check=True,
                   capture_output=True)
    for mod in ("torch", "tledge", "torchvision"):
        r = subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True, cwd=venv)
        assert r.returncode != 0, f"{mod} must not be importable in the runtime venv"
    return py


def _runtime(py: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), "-m", "tledge_runtime", *args], cwd=bundle, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TLEDGE_RUNTIME_CPU": "1"})


@pytest.mark.slow
def test_runtime_in_fresh_venv_agrees_with_tledge_predict(bundled: tuple[Path, Path], fresh_venv: Path) -> None:
    from tledge.fsutil import read_json
    from tledge.predict import predict_files

    run, bundle = bundled
    val = FASHION / "val"
    r = _runtime(fresh_venv, bundle, "predict", str(val), "--json", "--precision", "fp32", "--batch", "64")
    assert r.returncode == 0, r.stderr
    assert "cold start to first prediction" in r.stderr
    rt = {row["image"]: row["top"][0]["class"] for row in map(json.loads, r.stdout.splitlines())}
    ours = {row["image"]: row["top"][0]["class"] for row in predict_files(run, [str(val)], 1)}
    assert len(rt) == len(ours) == 1000
    agree = np.mean([rt[k] == ours[k] for k in ours])
    assert agree == 1.0
    # INT8 (CPU form in onnxruntime): its accuracy equals what export measured on the same val images
    r8 = _runtime(fresh_venv, bundle, "predict", str(val), "--json", "--precision", "int8", "--batch", "64")
    assert r8.returncode == 0, r8.stderr and "model.int8.cpu.onnx" in r8.stderr
    rows = list(map(json.loads, r8.stdout.splitlines()))
    acc = np.mean([row["top"][0]["class"] == Path(row["image"]).parent.name for row in rows])
    measured = read_json(run / "export_manifest.json")["checks"]["int8-cpu"]["final"]["top1"]
    assert acc == pytest.approx(measured, abs=1e-9)
    b = _runtime(fresh_venv, bundle, "bench", "--batch", "1,4", "--budget", "0.2", "--precision", "fp32")
    assert b.returncode == 0, b.stderr
    assert "batch   1: p50" in b.stdout and "batch   4: p50" in b.stdout


@pytest.mark.slow
def test_runtime_preprocessing_matches_training_pipeline(bundled: tuple[Path, Path], fresh_venv: Path,
                                                         tmp_path: Path) -> None:
    from torchvision import transforms as T

    from tledge import card as card_mod
    from tledge.preprocess import Preprocess

    run, bundle = bundled
    files = sorted((FASHION / "val").rglob("*.png"))[::97][:10]
    code = ("import sys, json, numpy as np; from tledge_runtime.preprocess import Preprocess; "
            "m = json.load(open('bundle.json')); p = Preprocess.from_dict(m['preprocess']); "
            "np.save(sys.argv[1], np.stack([p(f) for f in sys.argv[2:]]))")
    out = tmp_path / "x.npy"
    r = subprocess.run([str(fresh_venv), "-c", code, str(out), *map(str, files)], cwd=bundle, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    pre = Preprocess.from_dict(card_mod.read(run)["preprocess"])
    np.testing.assert_array_equal(got, np.stack([pre(f) for f in files]))
    from PIL import Image
    tv = T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)), T.CenterCrop(pre.crop),
                    T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    ref = np.stack([tv(Image.open(f).convert("RGB")).numpy() for f in files])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_fingerprint_keys_and_rebuild_decisions(bundled: tuple[Path, Path]) -> None:
    _, bundle = bundled
    manifest = bundle_io.read_manifest(bundle)
    orin = {"tensorrt": "8.6.2", "gpu": "Orin", "compute_capability": "8.7", "l4t": "36.3"}
    xavier = {**orin, "gpu": "Xavier", "compute_capability": "7.2", "l4t": "35.4"}
    assert engine_dir(bundle, orin) != engine_dir(bundle, xavier)
    assert engine_dir(bundle, orin) == engine_dir(bundle, dict(orin))
    dest = engine_path(bundle, "int8", orin)
    ok, why = engine_status(dest, manifest, "int8", [1, 8, 32], None, orin)
    assert not ok and "no engine" in why
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"engine")
    side = {"onnx_sha256": manifest["files"]["model.int8.trt.onnx"], "profile": {"min": 1, "opt": 8, "max": 32},
            "dla_core": None, "fingerprint": orin}
    Path(str(dest) + ".json").write_text(json.dumps(side))
    assert engine_status(dest, manifest, "int8", [1, 8, 32], None, orin) == (True, "built for this device from this graph")
    ok, why = engine_status(dest, manifest, "int8", [1, 8, 32], None, {**orin, "tensorrt": "10.3.0"})
    assert not ok and "TensorRT 8.6.2" in why
    ok, why = engine_status(dest, manifest, "int8", [1, 8, 64], None, orin)
    assert not ok and "batch profile" in why
    Path(str(dest) + ".json").write_text(json.dumps({**side, "onnx_sha256": "0" * 64}))
    ok, why = engine_status(dest, manifest, "int8", [1, 8, 32], None, orin)
    assert not ok and "another graph" in why
    import shutil
    shutil.rmtree(bundle / "engines")


def _tar_with(tmp: Path, name: str, kind: str = "file") -> Path:
    p = tmp / f"evil-{kind}.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
        else:
            data = b"x"
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return p


@pytest.mark.parametrize("name,kind", [("../evil.txt", "file"), ("/tmp/evil.txt", "file"),
                                       ("bundle/../../evil.txt", "file"), ("bundle/link", "symlink")])
def test_extraction_never_writes_outside(tmp_path: Path, name: str, kind: str) -> None:
    archive = _tar_with(tmp_path, name, kind)
    dest = tmp_path / "dest"
    with pytest.raises(bundle_io.BundleError, match="refusing to extract|Refusing to extract"):
        bundle_io.safe_extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not dest.exists()


def test_archive_extracts_and_verifies(bundled: tuple[Path, Path], tmp_path: Path, fresh_venv: Path) -> None:
    _, bundle = bundled
    folder = bundle_io.safe_extract(bundle.parent / "deploy.tar.gz", tmp_path / "x")
    assert folder.name == "deploy"
    assert len(bundle_io.verify(folder)["files"]) >= 10
    r = _runtime(fresh_venv, folder, "verify")
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_tampered_file_is_refused(bundled: tuple[Path, Path], tmp_path: Path, fresh_venv: Path) -> None:
    _, bundle = bundled
    folder = bundle_io.safe_extract(bundle.parent / "deploy.tar.gz", tmp_path / "x")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(bundle_io.BundleError, match="model.onnx does not match"):
        bundle_io.verify(folder)
    r = _runtime(fresh_venv, folder, "predict", str(FASHION / "val" / "Bag"), "--precision", "fp32")
    assert r.returncode == 2 and "model.onnx does not match the bundle manifest" in r.stderr and not r.stdout


def test_bundle_needs_an_export(default_run_64: Path, tmp_path: Path) -> None:
    run = copy_run(default_run_64, tmp_path / "run")
    with pytest.raises(RunDirError, match="tledge export"):
        make_bundle(run)
