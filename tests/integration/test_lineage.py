"""Issue 15 item 1: artefacts that belong together. Before: `tune --overwrite` kept the old graphs and bench
compared them with the new checkpoint (agreement 0.5, no warning); an export killed half-way left new and
old graphs side by side and `bundle` shipped the mix; a bundle killed half-way left the new folder beside
the old archive and its staging folders for ever."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tledge import card as card_mod
from tledge.bench.run import BenchConfig, run_bench
from tledge.deploy.bundle import make_bundle
from tledge.deploy.tledge_runtime import bundle_io
from tledge.errors import RunDirError
from tledge.export import artefacts
from tledge.export.pipeline import run_export
from tests.conftest import FASHION, copy_run, export_cfg, tledge_env

QUICK_BENCH = BenchConfig(batches=(1,), budget_s=0.01, warmup=1, min_iters=2, threads=2, end_to_end=False,
                          max_images=40)


@pytest.fixture(scope="module")
def exported(default_run_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(default_run_64, tmp_path_factory.mktemp("lineage") / "run")
    run_export(run, export_cfg())
    return run


def _tledge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tledge", *args], capture_output=True, text=True,
                          env={**tledge_env(), **(env or {})})


def test_manifest_records_the_checkpoint_and_every_file(exported: Path) -> None:
    card = card_mod.read(exported)
    m = artefacts.lineage(exported, card)
    assert card["checkpoint_sha256"] == m.checkpoint_sha256 == m.manifest["checkpoint_sha256"]
    assert set(m.ok) == {"fp32", "int8-tensorrt", "int8-cpu", "calibration"} and not m.stale
    assert set(m.manifest["files"]) == {"model.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx",
                                        "calib/calibration.json"}
    assert not (exported / artefacts.STAGING).exists()


def test_retune_removes_everything_made_from_the_old_checkpoint(exported: Path, tmp_path: Path) -> None:
    from tledge.tune import TuneConfig, run_tune

    run = copy_run(exported, tmp_path / "run")
    make_bundle(run)
    (run / "bench.json").write_text("{}")
    cache = card_mod.read(run)["training"]["config"]["cache_dir"]
    run_tune(FASHION, run, TuneConfig(backbone="mobilenet_v2", image_size=64, workers=0, epochs=3, cache_dir=cache),
             overwrite=True)
    left = sorted(p.name for p in run.iterdir())
    for gone in ("model.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx", "export_manifest.json", "bench.json",
                 "deploy", "deploy.tar.gz"):
        assert gone not in left, left
    assert not (run / artefacts.CALIBRATION).exists()
    with pytest.raises(RunDirError, match="tledge export"):
        make_bundle(run)
    res = run_bench(run, QUICK_BENCH)
    assert [r["artefact"] for r in res["results"]] == ["pytorch"]


def test_an_artefact_that_does_not_descend_is_refused_and_named(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    shutil.copy(run / "model.onnx", run / "model.int8.cpu.onnx")  # e.g. copied in from elsewhere
    with pytest.raises(RunDirError, match=r"model\.int8\.cpu\.onnx: its SHA-256 differs"):
        make_bundle(run)
    res = run_bench(run, QUICK_BENCH)
    names = [r["artefact"] for r in res["results"]]
    assert "onnx-int8-cpu" not in names and "onnx-int8-tensorrt" in names
    skipped = {s["artefact"]: s["reason"] for s in res["skipped"]}
    assert "model.int8.cpu.onnx refused" in skipped["onnx-int8-cpu"]


def test_a_replaced_checkpoint_is_refused_everywhere(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    data = bytearray((run / "checkpoint.safetensors").read_bytes())
    data[-10] ^= 0x01
    (run / "checkpoint.safetensors").write_bytes(bytes(data))
    for call in (lambda: make_bundle(run), lambda: run_bench(run, QUICK_BENCH),
                 lambda: run_export(run, export_cfg(int8=False))):
        with pytest.raises(RunDirError, match="not the checkpoint this run's model card describes"):
            call()


def test_a_failed_export_leaves_the_previous_one_whole(exported: Path, tmp_path: Path) -> None:
    from tledge.errors import DataError
    from tledge.fsutil import sha256_file

    run = copy_run(exported, tmp_path / "run")
    before = {p.name: sha256_file(p) for p in run.iterdir() if p.is_file()}
    with pytest.raises(DataError, match="is not a folder"):
        run_export(run, export_cfg(calib={"source": str(tmp_path / "missing")}))  # fails after FP32 is staged
    assert {p.name: sha256_file(p) for p in run.iterdir() if p.is_file()} == before
    assert not (run / artefacts.STAGING).exists()
    make_bundle(run)


@pytest.mark.slow
def test_export_killed_while_swapping_in_is_never_bundled(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    args = ["export", str(run), "--int8", "--method", "minmax", "--escalate", "off", "--max-drop", "100",
            "--threads", "2"]
    r = _tledge(*args, env={"TLEDGE_KILL_AT": "export:commit"})  # SIGKILL after the first file is swapped in
    assert r.returncode == -9, r.stderr
    assert not (run / artefacts.MANIFEST).exists()
    r = _tledge("bundle", str(run))
    assert r.returncode != 0 and "do not descend from the current checkpoint" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (run / "deploy").exists()
    assert _tledge(*args).returncode == 0
    assert not (run / artefacts.STAGING).exists()
    folder = Path(make_bundle(run)["folder"])
    assert bundle_io.verify(folder)["checkpoint_sha256"] == card_mod.read(run)["checkpoint_sha256"]


@pytest.mark.slow
def test_bundle_killed_half_way_leaves_no_mismatched_pair(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path / "run")
    make_bundle(run)
    r = _tledge("bundle", str(run), env={"TLEDGE_KILL_AT": "bundle:archive"})  # after the folder, before the tar
    assert r.returncode == -9, r.stderr
    assert (run / "deploy").is_dir() and not (run / "deploy.tar.gz").exists()
    assert [p.name for p in run.glob(".deploy.*")], "the killed bundle left its staging folder (the case to clean)"
    res = make_bundle(run)
    assert not list(run.glob(".deploy*")), "staging folders of the killed bundle are cleaned up"
    folder = bundle_io.safe_extract(res["archive"], tmp_path / "x")
    assert bundle_io.verify(folder)["files"] == bundle_io.verify(run / "deploy")["files"]
    assert oct(os.stat(res["archive"]).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_signed_bundle_detects_a_file_changed_together_with_its_hash(exported: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """Issue 15 item 10: a hash list cannot detect a file changed together with its hash (an edited
    tledge_runtime/classify.py ran); a signed bundle.json can."""
    import json

    from tledge.deploy.bundle import keygen
    from tledge.deploy.tledge_runtime.__main__ import main as runtime_main

    run = copy_run(exported, tmp_path / "run")
    priv, pub = keygen(tmp_path / "fleet")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    res = make_bundle(run, sign=priv, archive=False)
    folder = Path(res["folder"])
    assert res["signed"] and runtime_main(["--bundle", str(folder), "--key", str(pub), "verify"]) == 0
    assert "signed by" in capsys.readouterr().out
    evil = folder / "tledge_runtime" / "classify.py"
    evil.write_text(evil.read_text() + "\nprint('pwned')\n")
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["files"]["tledge_runtime/classify.py"] = bundle_io.sha256(evil)  # the hash updated with it
    (folder / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert runtime_main(["--bundle", str(folder), "verify"]) == 0  # the hash list alone is fooled
    capsys.readouterr()
    assert runtime_main(["--bundle", str(folder), "--key", str(pub), "verify"]) == 2
    assert "does not match its signature" in capsys.readouterr().err
    other_priv, other_pub = keygen(tmp_path / "other")
    unsigned = Path(make_bundle(run, out_dir=tmp_path / "unsigned", archive=False)["folder"])
    assert runtime_main(["--bundle", str(unsigned), "--key", str(other_pub), "verify"]) == 2
    assert "is not signed" in capsys.readouterr().err
